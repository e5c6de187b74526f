"""gradcheck, gradgradcheck and torch.compile of the Jacobian ops for every activation, strategy and
layer (every op's opcheck and samples: test_contract.py)."""
import pytest
import torch
import torch.nn.functional as F

import jacext
from jacext import activations as act
from helpers import ACTIVATION_IDS

WIDTHS = (3, 4, 5, 2)
PARAMS = {"leaky_relu": (0.2, 0.0), "softplus": (1.5, 2.0), "elu": (0.7, 0.0), "smooth_leaky_relu": (0.3, 0.0)}


def random_mlp(activation, device, widths=WIDTHS, bias=(True, False, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for (n_in, n_out), has_bias in zip(zip(widths[:-1], widths[1:]), bias):
        weights.append((torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.9).to(device))
        biases.append((torch.randn(n_out, generator=g, dtype=torch.float64) * 0.5).to(device) if has_bias else None)
    code = act.NAMES[activation]
    codes = [code] * (len(weights) - 1) + [act.SIGMOID]  # a non-identity output activation too
    params = [p for _ in range(len(weights) - 1) for p in PARAMS.get(activation, (0.0, 0.0))] + [0.0, 0.0]
    x = torch.randn(4, widths[0], generator=g, dtype=torch.float64).to(device)
    return x, weights, biases, codes, params


def leaves(x, weights, biases):
    return [t.requires_grad_() for t in [x, *weights, *[b for b in biases if b is not None]]]


STRATEGIES = {"reverse": jacext.ops.REVERSE, "forward": jacext.ops.FORWARD, "reverse_gram": jacext.ops.REVERSE_GRAM}


def op_fn(op, weights, biases, codes, params, *config):
    """fn(x, *weights, *present biases) -> (y, sq or jac), calling the registered op directly."""
    n = len(weights)
    present = [i for i, b in enumerate(biases) if b is not None]

    def fn(x, *flat):
        ws, bs = list(flat[:n]), [None] * n
        for i, b in zip(present, flat[n:]):
            bs[i] = b
        return op(x, ws, jacext.ops.bias_tensors(bs, ws), codes, params, *config)[:2]

    return fn


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("activation", ACTIVATION_IDS)
def test_gradcheck_and_gradgradcheck_penalty(activation, strategy, device):
    x, weights, biases, codes, params = random_mlp(activation, device)
    inputs = leaves(x, weights, biases)
    fn = op_fn(torch.ops.jacext.mlp_jacobian_frobenius, weights, biases, codes, params, STRATEGIES[strategy])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("method", ["reverse", "forward", "hutchinson"])
def test_gradcheck_and_gradgradcheck_eager_path(method, device):
    """The public function records the op's C++ autograd node (csrc/frobenius_autograd.cpp): first
    and second derivatives, with and without bias and projections."""
    x, weights, biases, codes, params = random_mlp("tanh", device)
    inputs = leaves(x, weights, biases)
    n, present = len(weights), [i for i, b in enumerate(biases) if b is not None]
    v = torch.randn(x.shape[0], 2, WIDTHS[-1], dtype=torch.float64, device=device) if method == "hutchinson" else None

    def fn(x, *flat):
        bs = [None] * n
        for i, b in zip(present, flat[n:]):
            bs[i] = b
        return jacext.ops.mlp_jacobian_frobenius(x, list(flat[:n]), bs, codes, params, method=method, projections=v)

    assert "FrobeniusFunction" in fn(*inputs)[1].grad_fn.name()
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation", ACTIVATION_IDS)
def test_gradcheck_and_gradgradcheck_one_hidden_layer_gram(activation, device):
    x, weights, biases, codes, params = random_mlp(activation, device, widths=(3, 6, 4), bias=(True, False))
    codes[-1], params[-2:] = act.IDENTITY, [0.0, 0.0]  # the formula needs a linear output layer
    inputs = leaves(x, weights, biases)
    fn = op_fn(torch.ops.jacext.mlp_jacobian_frobenius, weights, biases, codes, params, jacext.ops.GRAM1)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("widths", [(3, 6, 4), WIDTHS], ids=str)
@pytest.mark.parametrize("activation", ACTIVATION_IDS)
def test_gradcheck_and_gradgradcheck_forward_gram(activation, widths, device):
    x, weights, biases, codes, params = random_mlp(activation, device, widths=widths)
    codes[-1], params[-2:] = act.IDENTITY, [0.0, 0.0]  # the epilogue needs a linear output layer
    inputs = leaves(x, weights, biases)
    fn = op_fn(torch.ops.jacext.mlp_jacobian_frobenius, weights, biases, codes, params, jacext.ops.FORWARD_GRAM)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("gram", [True, False], ids=["grams", "product"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "smooth_leaky_relu"])
def test_gradcheck_and_gradgradcheck_split(activation, gram, device):
    x, weights, biases, codes, params = random_mlp(activation, device)
    inputs = leaves(x, weights, biases)
    split = jacext.planner.Split(2, jacext.ops.FORWARD, jacext.ops.REVERSE, gram)
    fn = op_fn(lambda x, w, b, c, p: jacext._jacobian_ops._split_frobenius(x, w, b, c, p, split), weights, biases, codes, params)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("strategy", ["reverse", "forward"])
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("activation", ["tanh", "gelu", "softplus", "smooth_leaky_relu"])
def test_gradcheck_and_gradgradcheck_layer_jacobian(activation, layer, strategy, device):
    x, weights, biases, codes, params = random_mlp(activation, device)
    inputs = leaves(x, weights, biases)
    fn = op_fn(torch.ops.jacext.mlp_jacobian, weights, biases, codes, params, layer, STRATEGIES[strategy])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def op_args(device, strategy, layer=None):
    x, weights, biases, codes, params = random_mlp("tanh", device)
    biases = jacext.ops.bias_tensors(biases, weights)
    for t in [x, *weights, biases[0], biases[2]]:
        t.requires_grad_()
    if layer is None:
        return (x, weights, biases, codes, params, strategy)
    return (x, weights, biases, codes, params, layer, strategy)


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 2), (0, 2)], ids=str)
def test_gradcheck_gradgradcheck_and_opcheck_with_carry_gradients(layers, device):
    """The reverse carries (the Jacobians above the lowest layer) are differentiable outputs:
    mlp_jacobian_backward takes their gradients (grad_carries), twice differentiable too."""
    x, weights, biases, codes, params = random_mlp("softplus", device)

    def fn(x, *flat):
        y, jacs = jacext.ops.mlp_jacobians(x, list(flat[:3]), [flat[3], None, flat[4]], codes, params, layers)
        return (y, *jacs)

    inputs = leaves(x, weights, biases)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    low = min(layers)
    args = (x, weights, jacext.ops.bias_tensors(biases, weights), codes, params, low, jacext.ops.REVERSE)
    with torch.no_grad():
        y, jac, saved = torch.ops.jacext.mlp_jacobian(*args)
    carries = saved[jacext.layouts.first_carry_index(len(weights)):]  # dy/dh_i, i = L-1 down to low
    grad_carries = [torch.randn_like(c).requires_grad_() if len(weights) - 1 - j in layers else x.new_empty(0)
                    for j, c in enumerate(carries)]
    torch.library.opcheck(torch.ops.jacext.mlp_jacobian_backward.default,
                          (torch.randn_like(y), None, None, *args[:5], low, jacext.ops.REVERSE, list(saved),
                           grad_carries))
    with pytest.raises(RuntimeError, match="carry gradients"):
        torch.ops.jacext.mlp_jacobian_backward(None, None, None, *args[:5], low, jacext.ops.REVERSE, list(saved),
                                               grad_carries[:-1])


def test_compiled_training_step_matches_eager(device, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no graphs cached by other builds
    torch.manual_seed(0)
    model = jacext.MLP([12, 16, 16, 5], activation="tanh").to(device)
    x = torch.randn(32, 12, device=device)
    target = torch.randint(0, 5, (32,), device=device)

    def loss_fn(x, target):
        y, sq = jacext.jacobian_frobenius(model, x)
        return F.cross_entropy(y, target) + 0.05 * sq.mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(x, target)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled_loss = compiled(x, target)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    optimizer.step()
    assert compiled(x, target).item() < compiled_loss.item()


def test_compiled_ops_with_a_non_contiguous_input(device, tmp_path, monkeypatch):
    """torch.compile checks the real outputs' strides against the fake kernels': both must be
    contiguous whatever x's layout (here a transposed x), for every op."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from jacext.flows import MLPFlow

    torch.manual_seed(0)
    model = jacext.MLP([6, 8, 4], activation="tanh").to(device)
    flow = MLPFlow(6, 2).to(device)
    x = torch.randn(6, 5, device=device).t()  # (5, 6), strides (1, 5)
    assert not x.is_contiguous()

    def objective(x):
        y, sq = jacext.jacobian_frobenius(model, x)
        jac = jacext.jacobian(model, x, layer=0)
        flows = flow.log_prob(x).sum() + flow.nll(x, relative_gradient=True)  # nll: its own autograd.Function
        return y.sum() + sq.sum() + jac.square().sum() + flows

    compiled = torch.compile(objective, fullgraph=True)
    torch.testing.assert_close(compiled(x), objective(x), rtol=1e-5, atol=1e-5)


def test_the_gram_strategy_returns_no_jacobian(device):
    with pytest.raises(RuntimeError, match="Frobenius norm only"):
        torch.ops.jacext.mlp_jacobian(*op_args(device, jacext.ops.REVERSE_GRAM, layer=0))
