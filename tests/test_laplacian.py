"""The forward-carry functionals (jacext.laplacian, divergence, jacobian_diagonal) against
torch.func in float64: values and gradients for every activation, depths 1-4, n_0 in {1, 2, 3, 10},
m in {1, 3}, with and without bias; gradcheck, gradgradcheck, torch.compile (opcheck: test_contract.py); the
activation table's third derivative; the Hutchinson divergence; bad input."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import jacext
from jacext import activations as act
from jacext.planner import CARRY_FORWARD, DIAGONAL_GRAM1, TRACE_GRAM2, resolve_diagonal_strategy
from jacext.reference import jacobian_diagonal_ref, laplacian_ref
from helpers import ACTIVATIONS, ACTIVATION_IDS, make_mlp

TOL = dict(rtol=1e-10, atol=1e-10)
PARAMS = {"leaky_relu": (0.2, 0.0), "softplus": (1.5, 2.0), "elu": (0.7, 0.0), "smooth_leaky_relu": (0.3, 0.0)}
INPUTS, OUTPUTS, BATCHES = (1, 2, 3, 10), (1, 3), (1, 7)


def config(index):
    """(n_0, m, bias, batch, output activation) for case `index`: consecutive cases walk through
    every value of each, so that every activation meets each over its depths."""
    return (INPUTS[index % 4], OUTPUTS[index // 2 % 2], index % 3 != 1, BATCHES[index // 3 % 2],
            nn.Sigmoid if index % 5 == 4 else None)


def grads(scalar, leaves):
    return torch.autograd.grad(scalar, leaves, materialize_grads=True, retain_graph=True)


def weights_like(*tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in tensors]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", [a for _, a in ACTIVATIONS], ids=ACTIVATION_IDS)
def test_laplacian_matches_torch_func(activation, depth, device):
    index = ACTIVATION_IDS.index(next(n for n, a in ACTIVATIONS if a is activation)) + depth
    n0, m, bias, batch, output_activation = config(index)
    widths = [n0] + [5, 4, 6][:depth - 1] + [m]
    model = make_mlp(widths, activation, bias=bias, output_activation=output_activation, device=device)
    x = torch.randn(batch, n0, dtype=torch.float64, device=device, requires_grad=True)
    leaves = [x, *model.parameters()]
    y_ref, grad_ref, lap_ref = laplacian_ref(model, x)
    wy, wg, wl = weights_like(y_ref, grad_ref, lap_ref)
    y, lap = jacext.laplacian(model, x)
    y2, grad, lap2 = jacext.laplacian(model, x, return_gradient=True)
    for value, ref in [(y, y_ref), (lap, lap_ref), (y2, y_ref), (grad, grad_ref), (lap2, lap_ref)]:
        torch.testing.assert_close(value, ref, **TOL)
    # the gradients of a weighted objective w.r.t. x, the weights and the biases: without the
    # returned gradient (a linear output layer takes the thin last layer) and with it
    expected = grads((wy * y_ref).sum() + (wl * lap_ref).sum(), leaves)
    for g, g_ref in zip(grads((wy * y).sum() + (wl * lap).sum(), leaves), expected):
        torch.testing.assert_close(g, g_ref, **TOL)
    expected = grads((wg * grad_ref).sum() + (wl * lap_ref).sum(), leaves)
    for g, g_ref in zip(grads((wg * grad).sum() + (wl * lap2).sum(), leaves), expected):
        torch.testing.assert_close(g, g_ref, **TOL)


def square_methods(depth, output_activation, trace):
    closed = (depth == 2) or (trace and depth == 3 and output_activation is None)
    return ["forward", "auto"] + (["gram"] if closed else [])


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", [a for _, a in ACTIVATIONS], ids=ACTIVATION_IDS)
def test_divergence_and_diagonal_match_torch_func(activation, depth, device):
    index = ACTIVATION_IDS.index(next(n for n, a in ACTIVATIONS if a is activation)) + depth
    n, _, bias, batch, output_activation = config(index)
    widths = [n] + [5, 4, 6][:depth - 1] + [n]
    model = make_mlp(widths, activation, bias=bias, output_activation=output_activation, device=device)
    x = torch.randn(batch, n, dtype=torch.float64, device=device, requires_grad=True)
    leaves = [x, *model.parameters()]
    y_ref, diag_ref = jacobian_diagonal_ref(model, x)
    wy, wd = weights_like(y_ref, diag_ref)
    for trace in (False, True):
        ref = diag_ref.sum(1) if trace else diag_ref
        w = wd[:, 0] if trace else wd
        expected = grads((wy * y_ref).sum() + (w * ref).sum(), leaves)
        for method in square_methods(depth, output_activation, trace):
            y, out = (jacext.divergence if trace else jacext.jacobian_diagonal)(model, x, method=method)
            torch.testing.assert_close(y, y_ref, **TOL)
            torch.testing.assert_close(out, ref, **TOL)
            for g, g_ref in zip(grads((wy * y).sum() + (w * out).sum(), leaves), expected):
                torch.testing.assert_close(g, g_ref, **TOL)


def test_strategies_exercised():
    """auto picks the closed forms where they apply (and the tests above run them), else forward."""
    tanh, identity = act.TANH, act.IDENTITY
    assert resolve_diagonal_strategy("auto", [3, 5, 3], [tanh, identity], trace=False) == DIAGONAL_GRAM1
    assert resolve_diagonal_strategy("auto", [3, 5, 4, 3], [tanh, tanh, identity], trace=True) == TRACE_GRAM2
    assert resolve_diagonal_strategy("auto", [3, 5, 4, 3], [tanh, tanh, identity], trace=False) == CARRY_FORWARD
    assert resolve_diagonal_strategy("auto", [3, 5, 4, 3], [tanh, tanh, act.SIGMOID], trace=True) == CARRY_FORWARD
    assert resolve_diagonal_strategy("auto", [3, 5, 4, 6, 3], [tanh] * 3 + [identity], trace=True) == CARRY_FORWARD


@pytest.mark.parametrize("activation", ACTIVATION_IDS)
def test_activation_table_matches_autograd(activation, device):
    """The kernels' act, act', act'' and act''' (csrc/activations.h, as both devices evaluate them)
    and the Python act'' against autograd of the activation's value, away from kinks."""
    code = act.NAMES[activation]
    p0, p1 = PARAMS.get(activation, (0.0, 0.0))
    y = torch.linspace(-6, 6, 241, dtype=torch.float64, device=device)
    y = y[(y.abs() > 0.02) & ((y * p0 - p1).abs() > 0.02)].requires_grad_()  # off the kinks (softplus: beta y = threshold)
    table = torch.ops.jacext.activation_derivatives(y.detach(), code, p0, p1)
    derivatives = [act.activation_value(y, code, p0, p1)]
    for _ in range(3):
        last = derivatives[-1]
        derivatives.append(torch.autograd.grad(last.sum(), y, create_graph=True, materialize_grads=True)[0]
                           if last.requires_grad else torch.zeros_like(y))
    for k in range(4):
        torch.testing.assert_close(table[k], derivatives[k].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.activation_second_derivative(y, code, p0, p1), derivatives[2], rtol=1e-12, atol=1e-12)
    table32 = torch.ops.jacext.activation_derivatives(y.detach().float(), code, p0, p1)
    torch.testing.assert_close(table32, table.float(), rtol=1e-5, atol=1e-5)


def op_inputs(activation, widths, bias, device, seed=0, output=act.SIGMOID):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(o, i, generator=g, dtype=torch.float64) * 0.9).to(device).requires_grad_()
               for i, o in zip(widths[:-1], widths[1:])]
    biases = [(torch.randn(o, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_() if b else None
              for o, b in zip(widths[1:], bias)]
    codes = [act.NAMES[activation]] * (len(weights) - 1) + [output]
    params = [p for _ in range(len(weights) - 1) for p in PARAMS.get(activation, (0.0, 0.0))] + [0.0, 0.0]
    x = torch.randn(3, widths[0], generator=g, dtype=torch.float64).to(device).requires_grad_()
    return x, weights, biases, codes, params


def op_function(op, weights, biases, *config, outputs=2):
    """fn(x, *weights, *present biases) -> the op's first `outputs` outputs."""
    n, present = len(weights), [i for i, b in enumerate(biases) if b is not None]

    def fn(x, *flat):
        bs = [None] * n
        for i, b in zip(present, flat[n:]):
            bs[i] = b
        ws = list(flat[:n])
        return op(x, ws, jacext.ops.bias_tensors(bs, ws), *config)[:outputs]

    return fn


def leaves_of(x, weights, biases):
    return [x, *weights, *[b for b in biases if b is not None]]


@pytest.mark.parametrize("activation", ACTIVATION_IDS)
def test_laplacian_gradcheck_and_gradgradcheck(activation, device):
    """Every activation: the compiled backward (gradcheck) and the double backward through the
    torch-ops composite (gradgradcheck), with the thin last layer or the returned gradient."""
    gradient = ACTIVATION_IDS.index(activation) % 2 == 1
    x, weights, biases, codes, params = op_inputs(activation, (2, 4, 3, 2), (True, False, True), device,
                                                  output=act.IDENTITY if not gradient else act.SIGMOID)
    codes_and_params = (codes, params, gradient)

    def fn(x, *flat):
        y, grad, lap, _ = op_function(torch.ops.jacext.mlp_laplacian, weights, biases, *codes_and_params,
                                      outputs=4)(x, *flat)
        return (y, grad, lap) if gradient else (y, lap)

    leaves = leaves_of(x, weights, biases)
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


DIAGONAL_CASES = {"forward": ((3, 4, 5, 3), CARRY_FORWARD), "forward-L1": ((3, 3), CARRY_FORWARD),
                  "gram1": ((3, 4, 3), DIAGONAL_GRAM1), "trace2": ((3, 4, 5, 3), TRACE_GRAM2),
                  "hutchinson": ((3, 4, 5, 3), CARRY_FORWARD)}


@pytest.mark.parametrize("activation, case", [(a, c) for i, c in enumerate(DIAGONAL_CASES)
                                               for a in (["tanh", "softplus", "gelu_tanh", "relu"] * 2)[i:i + 2]])
def test_diagonal_gradcheck_and_gradgradcheck(activation, case, device):
    widths, strategy = DIAGONAL_CASES[case]
    output = act.IDENTITY if strategy == TRACE_GRAM2 else act.SIGMOID
    x, weights, biases, codes, params = op_inputs(activation, widths, [True, False, True][:len(widths) - 1], device,
                                                  output=output)
    projections = (torch.randint(0, 2, (3, 2, widths[0]), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
                   .to(device) * 2 - 1) if case == "hutchinson" else None
    fn = op_function(torch.ops.jacext.mlp_jacobian_diagonal, weights, biases, codes, params, strategy, projections)
    leaves = leaves_of(x, weights, biases)
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("fn", ["laplacian", "divergence", "jacobian_diagonal"])
def test_tiles_give_the_whole_batch_result(fn, device):
    """The CPU runs tiles of samples (planner.carry_tile_size); every tile size gives the same."""
    model = make_mlp((3, 9, 7, 3), nn.Tanh, device=device)
    x = torch.randn(23, 3, dtype=torch.float64, device=device, requires_grad=True)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    leaves = [x, *model.parameters()]
    results = []
    for tile in (0, 1, 5, 23):
        if fn == "laplacian":
            y, _, out, _ = torch.ops.jacext.mlp_laplacian(x, spec.weights, biases, spec.activations, spec.act_params,
                                                          False, tile=tile)
        else:
            strategy = TRACE_GRAM2 if fn == "divergence" else CARRY_FORWARD
            y, out, _ = torch.ops.jacext.mlp_jacobian_diagonal(x, spec.weights, biases, spec.activations,
                                                               spec.act_params, strategy, tile=tile)
        results.append((y, out, grads(y.sum() + out.square().sum(), leaves)))
    for y, out, gs in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, results[0][1], rtol=1e-12, atol=1e-12)
        for g, g_ref in zip(gs, results[0][2]):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_empty_batch(device):
    model = make_mlp((3, 6, 3), nn.Tanh, device=device)
    x = torch.empty(0, 3, dtype=torch.float64, device=device, requires_grad=True)
    y, grad, lap = jacext.laplacian(model, x, return_gradient=True)
    assert y.shape == (0, 3) and grad.shape == (0, 3, 3) and lap.shape == (0, 3)
    outputs = [jacext.divergence(model, x)[1], jacext.jacobian_diagonal(model, x)[1],
               jacext.divergence(model, x, method="hutchinson", n_proj=2)[1]]
    assert [tuple(o.shape) for o in outputs] == [(0,), (0, 3), (0,)]
    loss = lap.sum() + grad.sum() + sum(o.sum() for o in outputs)
    for g in grads(loss, [x, *model.parameters()]):
        assert not g.any()


def test_nan_propagates_per_sample():
    model = make_mlp((2, 6, 5, 2), nn.Tanh)
    x = torch.randn(3, 2, dtype=torch.float64)
    x[1, 0] = float("nan")
    _, grad, lap = jacext.laplacian(model, x, return_gradient=True)
    _, div = jacext.divergence(model, x)
    assert lap[1].isnan().all() and grad[1].isnan().all() and div[1].isnan()
    assert lap[[0, 2]].isfinite().all() and div[[0, 2]].isfinite().all()


def test_non_contiguous_input():
    model = make_mlp((3, 6, 3), nn.SiLU)
    base = torch.randn(5, 6, dtype=torch.float64)
    x = base[:, ::2]
    torch.testing.assert_close(jacext.laplacian(model, x)[1], laplacian_ref(model, x.contiguous())[2], **TOL)
    torch.testing.assert_close(jacext.divergence(model, x)[1], jacobian_diagonal_ref(model, x.contiguous())[1].sum(1),
                               **TOL)


NETS = [(3, 8, 7, 3), (4, 6, 4)]


@pytest.mark.parametrize("widths", NETS, ids=str)
def test_hutchinson_is_exact_with_orthogonal_projections_at_n_proj_n(widths, device):
    model = make_mlp(widths, nn.Tanh, output_activation=nn.Sigmoid, device=device)
    x = torch.randn(5, widths[0], dtype=torch.float64, device=device)
    _, est = jacext.divergence(model, x, method="hutchinson", n_proj=widths[0], orthogonal=True)
    torch.testing.assert_close(est, jacobian_diagonal_ref(model, x)[1].sum(1), **TOL)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("widths", NETS, ids=str)
def test_hutchinson_unbiased_and_its_variance_estimate(widths, distribution, device):
    """Many independent draws for one sample (the batch repeats it): their mean lies within a few
    standard errors of the exact divergence, and the variance estimate matches their spread."""
    model = make_mlp(widths, nn.Tanh, device=device)
    x = torch.randn(1, widths[0], dtype=torch.float64, device=device).expand(4000, -1)
    exact = jacobian_diagonal_ref(model, x[:1])[1].sum()
    g = torch.Generator(device=device).manual_seed(0)
    _, draws, variance = jacext.divergence(model, x, method="hutchinson", n_proj=3, generator=g,
                                           distribution=distribution, return_variance=True)
    assert abs(draws.mean() - exact) < 4 * draws.std() / len(draws) ** 0.5, (draws.mean().item(), exact.item())
    assert draws.std() > 0
    assert 0.85 < (variance.mean() / draws.var()).item() < 1.15


def test_hutchinson_deterministic_and_its_gradient_is_the_estimates(device):
    model = make_mlp((3, 8, 7, 3), nn.Tanh, device=device)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    runs = [jacext.divergence(model, x, method="hutchinson", n_proj=4,
                              generator=torch.Generator(device=device).manual_seed(7))[1] for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # the gradient is that of the estimate with its projections fixed: v^T J v by torch.func
    v = jacext.random_projections(6, 4, 3, generator=torch.Generator(device=device).manual_seed(7),
                                  dtype=torch.float64, device=device)
    _, jac = jacext.reference.per_sample_jacobian(model, x)
    estimate_ref = torch.einsum("bki,bij,bkj->b", v, jac, v) / 4
    params = list(model.parameters())
    torch.testing.assert_close(runs[0], estimate_ref, **TOL)
    for g, g_ref in zip(grads(runs[0].square().sum(), params), grads(estimate_ref.square().sum(), params)):
        torch.testing.assert_close(g, g_ref, **TOL)


def test_compiled_training_step_matches_eager(device, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no graphs cached by other builds
    torch.manual_seed(0)
    model = jacext.MLP([3, 16, 16, 3], activation="tanh").to(device)
    x = torch.rand(32, 3, device=device)

    def loss_fn(x):
        y, lap = jacext.laplacian(model, x)
        _, div = jacext.divergence(model, x)
        return lap.square().mean() + div.mean() + y.square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_explain_covers_the_carry_functionals():
    model = make_mlp((3, 16, 16, 16, 1), nn.Tanh, dtype=torch.float32)
    x = torch.rand(64, 3)
    plan = jacext.explain(model, x, quantity="laplacian")
    assert plan.layout.rows == 5 and plan.layout.carried == 3  # [h; 3 columns; Delta], thin last layer
    assert "forward Laplacian" in repr(plan)
    assert jacext.explain(model, x, quantity="laplacian", return_gradient=True).layout.carried == 4
    square = make_mlp((3, 16, 16, 3), nn.Tanh, dtype=torch.float32)
    plan = jacext.explain(square, x, quantity="divergence")
    assert plan.choice == "two-hidden-layer trace" and "<- chosen" in repr(plan)
    assert len(plan.candidates) == 2
    assert jacext.explain(square, x, quantity="divergence", method="hutchinson", n_proj=4).layout.columns == 4
    assert jacext.explain(square, x, quantity="jacobian_diagonal").choice.startswith("forward")
    with pytest.raises(ValueError, match="unknown quantity"):
        jacext.explain(square, x, quantity="hessian")


def test_bad_input():
    model = make_mlp((3, 6, 2), nn.Tanh)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="square net"):
        jacext.divergence(model, x)
    with pytest.raises(ValueError, match="square net"):
        jacext.jacobian_diagonal(model, x)
    with pytest.raises(ValueError, match="shape"):
        jacext.laplacian(model, torch.randn(4, 3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 features"):
        jacext.laplacian(model, torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        jacext.laplacian(model, [[0.0] * 3])
    with pytest.raises(RuntimeError, match="weight 0 has dtype Double but x has Float"):
        jacext.laplacian(model, torch.randn(4, 3))
    jacext._route._warned.clear()
    with pytest.warns(RuntimeWarning, match="Softmax.*generic autograd path"):
        jacext.laplacian(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), torch.randn(4, 3))
    with pytest.raises(TypeError, match="unsupported module.*runs on the fused engine only"):
        jacext.divergence(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), torch.randn(4, 3), method="forward")
    square = make_mlp((3, 6, 3), nn.Tanh)
    with pytest.raises(ValueError, match="unknown method"):
        jacext.divergence(square, x, method="reverse")
    with pytest.raises(ValueError, match="hutchinson"):
        jacext.divergence(square, x, n_proj=4)
    with pytest.raises(ValueError, match="n_proj >= 2"):
        jacext.divergence(square, x, method="hutchinson", return_variance=True)
    with pytest.raises(ValueError, match="exact"):
        jacext.jacobian_diagonal(square, x, method="hutchinson")
    with pytest.raises(ValueError, match="method='gram' needs"):
        jacext.jacobian_diagonal(make_mlp((3, 6, 5, 3), nn.Tanh), x, method="gram")
    with pytest.raises(RuntimeError, match="projections must have shape"):
        spec = jacext.parse_model(square)
        torch.ops.jacext.mlp_jacobian_diagonal(x, spec.weights, jacext.ops.bias_tensors(spec.biases, spec.weights),
                                               spec.activations, spec.act_params, 0, torch.randn(4, 2, 5,
                                                                                                 dtype=torch.float64))
    with pytest.raises(RuntimeError, match="needs exactly two layers"):
        spec = jacext.parse_model(make_mlp((3, 6, 5, 3), nn.Tanh))
        torch.ops.jacext.mlp_jacobian_diagonal(x, spec.weights, jacext.ops.bias_tensors(spec.biases, spec.weights),
                                               spec.activations, spec.act_params, DIAGONAL_GRAM1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16])
def test_unsupported_dtypes_on_cpu(dtype):
    model = make_mlp((3, 6, 3), nn.Tanh, dtype=dtype if dtype.is_floating_point else torch.float64)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        jacext.laplacian(model, torch.ones(2, 3, dtype=dtype))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.jacext.activation_derivatives(torch.ones(2, dtype=dtype), act.TANH, 0.0, 0.0)


def test_float32_agrees_with_float64():
    model = make_mlp((2, 32, 32, 1), nn.Tanh)
    x = torch.rand(64, 2, dtype=torch.float64)
    _, lap64 = jacext.laplacian(model, x)
    _, lap32 = jacext.laplacian(model.float(), x.float())
    torch.testing.assert_close(lap32.double(), lap64, rtol=1e-4, atol=1e-4)


def test_pinn_example_runs_quick(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "pinn_poisson.py")
    run = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path / "pinn.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "relative L2 error" in run.stdout and (tmp_path / "pinn.png").exists()

