"""MLP flows: exact log-likelihood, inverse, the relative gradient, data loaders, training."""
import gzip
import math
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import jacext
from jacext.data import load_digits_flow, load_mnist, logit_transform
from jacext.flows import MLPFlow

TOL = dict(rtol=1e-10, atol=1e-10)


def random_flow(dim=5, n_layers=3, bias=True, device="cpu", seed=0):
    """A float64 flow moved away from its orthogonal start (random weights and biases)."""
    torch.manual_seed(seed)
    flow = MLPFlow(dim, n_layers, alpha=0.3, bias=bias).double().to(device)
    with torch.no_grad():
        for m in flow.net:
            if isinstance(m, nn.Linear):
                m.weight.add_(0.4 * torch.randn_like(m.weight))
                if m.bias is not None:
                    m.bias.normal_()
    return flow


def log_prob_ref(flow, x):
    """log N(f(x)) + log|det df/dx| from torch.func's per-sample Jacobian and slogdet."""
    jac = vmap(jacrev(flow.net))(x)
    z = flow.net(x)
    return -0.5 * (z.square().sum(1) + x.shape[1] * math.log(2 * math.pi)) + torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_log_prob_matches_torch_func_and_slogdet(n_layers, bias, device):
    flow = random_flow(n_layers=n_layers, bias=bias, device=device)
    x = 1.5 * torch.randn(9, 5, dtype=torch.float64, device=device)
    x_ref = x.clone().requires_grad_()
    ref = log_prob_ref(flow, x_ref)
    x = x.clone().requires_grad_()
    lp = flow.log_prob(x)
    torch.testing.assert_close(lp, ref, **TOL)
    z, logdet = flow(x)
    torch.testing.assert_close(z, flow.net(x), **TOL)
    torch.testing.assert_close(lp, -0.5 * (z.square().sum(1) + 5 * math.log(2 * math.pi)) + logdet, **TOL)
    # the ordinary gradient, through the fused op and slogdet, equals autodiff of the reference
    weights = torch.rand(9, dtype=torch.float64, device=device)
    params = list(flow.parameters())
    grads = torch.autograd.grad((weights * lp).sum(), [x] + params)
    grads_ref = torch.autograd.grad((weights * ref).sum(), [x_ref] + params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


def test_inverse_and_sample(device):
    flow = random_flow(device=device)
    x = 2 * torch.randn(11, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(flow.inverse(flow.net(x)), x, rtol=1e-9, atol=1e-9)
    samples = flow.sample(6, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (6, 5) and torch.isfinite(samples).all()
    flow32 = MLPFlow(7, 2).to(device)
    x32 = torch.randn(5, 7, device=device)
    torch.testing.assert_close(flow32.inverse(flow32.net(x32)), x32, rtol=1e-4, atol=1e-4)


def test_inverse_reports_non_convergence():
    flow = random_flow()
    with pytest.raises(RuntimeError, match="did not converge in 1 Newton steps"):
        flow.inverse(flow.net(3 * torch.randn(4, 5, dtype=torch.float64)), max_iter=1)


def augmented_relative(grad_w, grad_b, w, b):
    """The reference: [grad_w, grad_b] @ W~^T W~ with W~ = [[W, b], [0, 1]] (no bias: grad_w W^T W)."""
    if b is None:
        return grad_w @ w.T @ w, None
    n = w.shape[0]
    aug = torch.zeros(n + 1, n + 1, dtype=w.dtype, device=w.device)
    aug[:n, :n], aug[:n, n], aug[n, n] = w, b, 1
    grad = torch.zeros_like(aug)
    grad[:n, :n], grad[:n, n] = grad_w, grad_b
    rel = grad @ aug.T @ aug
    return rel[:n, :n], rel[:n, n]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_layers", [1, 2, 4])
@pytest.mark.parametrize("dim", [5, 37])  # 37: the rank-update kernel's full column blocks, an odd row
def test_relative_gradient_is_the_autodiff_gradient_times_wtw(n_layers, bias, dim, device):
    flow = random_flow(dim=dim, n_layers=n_layers, bias=bias, device=device, seed=n_layers)
    x = torch.randn(8, dim, dtype=torch.float64, device=device, requires_grad=True)
    linears = [m for m in flow.net if isinstance(m, nn.Linear)]
    params = [p for m in linears for p in ([m.weight] if m.bias is None else [m.weight, m.bias])]
    # the ordinary gradient against torch.func and slogdet (whose backward, inv(J)^T per sample, loses
    # about cond(J) * 1e-16: up to 1e-8 relative here)
    nll_ref = -log_prob_ref(flow, x).mean()
    grads = torch.autograd.grad(flow.nll(x), [x] + params)
    for g, want in zip(grads, torch.autograd.grad(nll_ref, [x] + params)):
        torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-7 * want.abs().max().item())
    loss = flow.nll(x, relative_gradient=True)
    relative = torch.autograd.grad(loss, [x] + params)
    torch.testing.assert_close(loss, nll_ref, **TOL)  # the value is the NLL itself
    torch.testing.assert_close(relative[0], grads[0], **TOL)  # x keeps its ordinary gradient
    auto, rel = iter(grads[1:]), iter(relative[1:])
    for m in linears:
        grad_w, rel_w = next(auto), next(rel)
        grad_b, rel_b = (None, None) if m.bias is None else (next(auto), next(rel))
        want_w, want_b = augmented_relative(grad_w, grad_b, m.weight, m.bias)
        torch.testing.assert_close(rel_w, want_w, **TOL)
        if m.bias is not None:
            torch.testing.assert_close(rel_b, want_b, **TOL)
    # logdet_value=False drops sum log|det W| from the value only
    no_logdet = flow.nll(x, relative_gradient=True, logdet_value=False)
    torch.testing.assert_close(no_logdet, loss + flow.log_abs_det_weights(), **TOL)
    for g, want in zip(torch.autograd.grad(no_logdet, [x] + params), relative):
        torch.testing.assert_close(g, want, **TOL)


@pytest.mark.parametrize("dim", [37, 260])  # 260: the small-batch x W^T loops too
@pytest.mark.parametrize("batch", [3, 20, 30])  # the small-batch rank update, and the GEMMs beyond
def test_relative_gradient_in_float32(batch, dim, device):
    """The float32 kernels against the float64 ones on the same flow (the identity above is checked in
    float64; this checks the float32 code paths)."""
    flow = random_flow(dim=dim, n_layers=2, device=device, seed=4)
    x = torch.randn(batch, dim, dtype=torch.float64, device=device)
    params = list(flow.parameters())
    want = torch.autograd.grad(flow.nll(x, relative_gradient=True), params)
    flow32 = flow.float()
    got = torch.autograd.grad(flow32.nll(x.float(), relative_gradient=True), list(flow32.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def op_inputs(device, bias=(True, False)):
    g = torch.Generator().manual_seed(0)
    weights = [(torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64))
               .to(device).requires_grad_() for _ in bias]
    biases = [torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_() if b
              else torch.empty(0, dtype=torch.float64, device=device) for b in bias]
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    codes = [jacext.activations.SMOOTH_LEAKY_RELU] * (len(bias) - 1) + [jacext.activations.IDENTITY]
    params = [0.3, 0.0] * (len(bias) - 1) + [0.0, 0.0]
    return x, weights, biases, codes, params


def test_flow_op_gradcheck_and_opcheck(device):
    x, weights, biases, codes, params = op_inputs(device)

    def fn(x, w0, w1, b0):
        return torch.ops.jacext.mlp_flow(x, [w0, w1], [b0, biases[1]], codes, params, False, True)[:3]

    assert torch.autograd.gradcheck(fn, (x, *weights, biases[0]))
    for relative in (False, True):
        for logdet_value in (False, True):
            torch.library.opcheck(torch.ops.jacext.mlp_flow.default,
                                  (x, weights, biases, codes, params, relative, logdet_value))
    with torch.no_grad():
        z, log_dact, logabsdet, saved = torch.ops.jacext.mlp_flow(x, weights, biases, codes, params, True, True)
    for relative in (False, True):
        for input_grad in (False, True):
            torch.library.opcheck(torch.ops.jacext.mlp_flow_backward.default,
                                  (torch.randn_like(z), torch.randn_like(log_dact), torch.randn_like(logabsdet),
                                   x.detach(), [w.detach() for w in weights], [b.detach() for b in biases],
                                   codes, params, list(saved), relative, input_grad))
    # grad_nll: the same gradients as the mean NLL's three seeds, and opcheck
    grad_nll = torch.tensor(0.7, dtype=torch.float64, device=device)
    B = x.shape[0]
    for relative in (False, True):
        seeded = torch.ops.jacext.mlp_flow_backward(
            grad_nll * z / B, (-grad_nll / B).expand(B), -grad_nll, x.detach(), [w.detach() for w in weights],
            [b.detach() for b in biases], codes, params, list(saved), relative, True)
        got = torch.ops.jacext.mlp_flow_backward(
            None, None, None, x.detach(), [w.detach() for w in weights], [b.detach() for b in biases], codes,
            params, list(saved), relative, True, grad_nll=grad_nll)
        for g, want in zip([got[0], *got[1], *got[2]], [seeded[0], *seeded[1], *seeded[2]]):
            torch.testing.assert_close(g, want, **TOL)
        torch.library.opcheck(torch.ops.jacext.mlp_flow_backward.default,
                              (None, None, None, x.detach(), [w.detach() for w in weights],
                               [b.detach() for b in biases], codes, params, list(saved), relative, True),
                              {"grad_nll": grad_nll})
    # once differentiable, and it says so
    z, log_dact, _, _ = torch.ops.jacext.mlp_flow(x, weights, biases, codes, params, False, True)
    (gx,) = torch.autograd.grad(z.sum() + log_dact.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        gx.sum().backward()


def test_nll_under_vmap_matches_the_loop():
    """vmap over batches of a flow's NLL (the op's vmap rule), values and gradients, against a loop."""
    flow = random_flow(dim=5, n_layers=2)
    xs = torch.randn(3, 4, 5, dtype=torch.float64)
    params = list(flow.parameters())
    got = torch.func.vmap(lambda xb: flow.nll(xb, relative_gradient=True))(xs)
    want = torch.stack([flow.nll(xb, relative_gradient=True) for xb in xs])
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(g, w, **TOL)


def test_nll_of_a_bfloat16_flow_under_autocast():
    """Under autocast the op runs in float32 (its autocast rule casts first): nll's value and gradients
    match the float32 flow's."""
    torch.manual_seed(0)
    flow16 = MLPFlow(8, 2).bfloat16()
    flow = MLPFlow(8, 2)
    flow.load_state_dict(flow16.state_dict())  # the same (bfloat16-rounded) weights in float32
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow16.nll(x.bfloat16(), relative_gradient=True)
    loss.backward()
    want = flow.nll(x.bfloat16().float(), relative_gradient=True)
    want.backward()
    torch.testing.assert_close(loss.float(), want, rtol=1e-2, atol=1e-2)
    for p16, p in zip(flow16.parameters(), flow.parameters()):
        assert p16.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p16.grad.float(), p.grad, rtol=1e-2, atol=1e-2 * p.grad.abs().max().item())


def test_flow_bad_input():
    flow = MLPFlow(4, 2)
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        flow.log_prob(torch.randn(3, 5))
    with pytest.raises(ValueError, match="alpha"):
        MLPFlow(4, 2, alpha=1.5)
    with pytest.raises(ValueError, match="positive integers"):
        MLPFlow(0, 2)
    x, weights, biases, codes, params = op_inputs("cpu")
    with pytest.raises(RuntimeError, match="must be square"):
        torch.ops.jacext.mlp_flow(x, [weights[0], torch.randn(5, 4, dtype=torch.float64)], biases, codes,
                                  params, False, True)
    with torch.no_grad():
        z, _, _, saved = torch.ops.jacext.mlp_flow(x, weights, biases, codes, params, True, True)
    detached = [w.detach() for w in weights], [b.detach() for b in biases]
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_nll or the three"):
        torch.ops.jacext.mlp_flow_backward(z, None, None, x.detach(), *detached, codes, params, list(saved), True,
                                           False, grad_nll=one)
    with pytest.raises(RuntimeError, match="0-d tensor"):
        torch.ops.jacext.mlp_flow_backward(None, None, None, x.detach(), *detached, codes, params, list(saved),
                                           True, False, grad_nll=one.reshape(1))
    with pytest.raises(RuntimeError, match="last layer is linear"):
        torch.ops.jacext.mlp_flow_backward(None, None, None, x.detach(), *detached, [codes[0]] * 2, params,
                                           list(saved), True, False, grad_nll=one)


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def test_load_mnist_from_idx_files_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    labels = {"train": rng.integers(0, 10, 6), "t10k": rng.integers(0, 10, 4)}
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images["train"])  # gzipped and plain
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels["train"])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images["t10k"])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels["t10k"])
    x_train, y_train, x_test, y_test = load_mnist(str(tmp_path))
    assert x_train.shape == (6, 784) and x_test.shape == (4, 784) and x_train.dtype == torch.uint8
    assert torch.equal(x_train, torch.from_numpy(images["train"].reshape(6, -1).astype(np.uint8)))
    assert torch.equal(y_test, torch.from_numpy(labels["t10k"]).long())

    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=images["train"].astype(np.uint8), y_train=labels["train"],
             x_test=images["t10k"].astype(np.uint8), y_test=labels["t10k"])
    for a, b in zip(load_mnist(str(npz)), (x_train, y_train, x_test, y_test)):
        assert torch.equal(a, b)

    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(str(tmp_path))
    (tmp_path / "bad").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / "bad" / name).write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_mnist(str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="neither"):
        load_mnist(str(tmp_path / "missing.npz"))


def test_logit_transform_log_det():
    pixels = torch.tensor([[0, 255, 17], [128, 3, 250]])
    x, logdet = logit_transform(pixels, levels=256, generator=torch.Generator().manual_seed(0))
    u = (torch.sigmoid(x) - 1e-6) / (1 - 2e-6)  # back to [0, 1]
    assert ((u * 256).floor() == pixels).all()
    # logdet = sum log|dx/du|, against autograd of the map u -> x
    for b in range(2):
        ui = u[b].clone().requires_grad_()
        xi = torch.logit(1e-6 + (1 - 2e-6) * ui)
        jac = torch.autograd.functional.jacobian(lambda v: torch.logit(1e-6 + (1 - 2e-6) * v), ui)
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(xi.detach(), x[b], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        logit_transform(torch.tensor([[256]]), levels=256)


def train_flow(relative, x_train, x_test, epochs, lr=1e-3, batch=10):
    """Adam on the mean NLL; the held-out mean log-likelihood before and after every epoch."""
    torch.manual_seed(0)
    flow = MLPFlow(x_train.shape[1], 2).double().to(x_train.device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1)
    with torch.no_grad():
        curve = [flow.log_prob(x_test).mean().item()]
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order).to(x_train.device)
        for i in range(0, len(x_train), batch):
            optimizer.zero_grad()
            flow.nll(x_train[perm[i:i + batch]], relative_gradient=relative, logdet_value=False).backward()
            optimizer.step()
        with torch.no_grad():
            curve.append(flow.log_prob(x_test).mean().item())
    return curve


def test_relative_gradient_training_on_digits_matches_autodiff(device):
    x_train, x_test = (x.to(device) for x in load_digits_flow(dtype=torch.float64))
    relative = train_flow(True, x_train, x_test, epochs=4)
    autodiff = train_flow(False, x_train, x_test, epochs=4)
    print("held-out log-likelihood per epoch: relative", [round(v, 2) for v in relative],
          "autodiff", [round(v, 2) for v in autodiff])
    assert all(b > a for a, b in zip(relative, relative[1:])), relative  # improves every epoch
    assert relative[-1] > relative[0] + 100  # from about -268 nats to about -120
    assert abs(relative[-1] - autodiff[-1]) < 1.0, (relative[-1], autodiff[-1])
