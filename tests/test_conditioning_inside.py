"""Conditioning inside the network on the forward-carry ops (csrc/mlp_laplacian.h): a per-sample bias
s_i and a per-sample pre-activation gate g_i per layer, z = g * (h W^T) + b + s. The ops' values and
gradients (w.r.t. x, weights, biases, the per-sample biases and the gates) in float64 against
torch.func, gradcheck and gradgradcheck, tiles, the closed forms' refusal, and bad input."""
import warnings

import pytest
import torch
from torch.func import hessian, jacrev, vmap

from jacext import ops
from jacext._library import normalize_activations
from jacext.layouts import CARRY_FORWARD, DIAGONAL_GRAM1, TRACE_GRAM2, diagonal_layout
from jacext.planner import carry_macs, resolve_diagonal_strategy

TOL = dict(rtol=1e-9, atol=1e-10)

# (widths, activations, which layers have a per-sample bias, which a gate)
NETS = [
    ([3, 5, 4, 3], ["tanh", "softplus", "identity"], [1], [1]),
    ([3, 5, 3], ["tanh", "tanh"], [0, 1], [1]),           # both at the last layer (ConcatSquash's)
    ([2, 6, 6, 2], ["silu", "tanh", "identity"], [1, 2], [0, 1, 2]),
    ([4, 3, 5, 2], ["gelu", "sigmoid", "identity"], [2], []),   # a bias at the (linear) output only
]
IDS = [f"{w}-s{s}-g{g}" for w, _, s, g in NETS]


def random_net(widths, codes, shifted, gated, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(batch, widths[0])
    weights = [rand(n, m) * 0.8 for m, n in zip(widths[:-1], widths[1:])]
    biases = [rand(n) * 0.3 if i % 2 == 0 else None for i, n in enumerate(widths[1:])]
    shifts = [rand(batch, n) * 0.5 if i in shifted else None for i, n in enumerate(widths[1:])]
    gates = [torch.sigmoid(rand(batch, n)) + 0.2 if i in gated else None for i, n in enumerate(widths[1:])]
    codes, params = normalize_activations(codes, None, len(codes))
    return x, weights, biases, shifts, gates, codes, params


def reference(weights, biases, codes, params):
    """The net as a function of one sample and its per-sample biases and gates (torch ops)."""
    from jacext.activations import activation_value

    def f(x, shifts, gates):
        h = x
        for i, w in enumerate(weights):
            z = w @ h
            if gates[i] is not None:
                z = gates[i] * z
            if biases[i] is not None:
                z = z + biases[i]
            if shifts[i] is not None:
                z = z + shifts[i]
            h = activation_value(z, codes[i], params[2 * i], params[2 * i + 1])
        return h
    return f


def per_sample(f, x, shifts, gates, what):
    """vmap of what(f)(x_b, s_b, g_b) over the batch."""
    dims = ([0 if s is not None else None for s in shifts], [0 if g is not None else None for g in gates])
    return vmap(lambda x, s, g: what(lambda x: f(x, s, g))(x), in_dims=(0, *dims))(x, shifts, gates)


def leaves(*tensors):
    return [t.detach().requires_grad_() if t is not None else None for t in tensors]


def present(ts):
    return [t for t in ts if t is not None]


@pytest.mark.parametrize("widths, codes, shifted, gated", NETS, ids=IDS)
def test_laplacian_against_torch_func(widths, codes, shifted, gated):
    x, weights, biases, shifts, gates, codes, params = random_net(widths, codes, shifted, gated)
    x, *weights = leaves(x, *weights)
    biases, shifts, gates = leaves(*biases), leaves(*shifts), leaves(*gates)
    y, jac, lap = ops.mlp_laplacian(x, weights, biases, codes, params, return_gradient=True, sample_biases=shifts,
                                    gates=gates)
    _, lap_only = ops.mlp_laplacian(x, weights, biases, codes, params, sample_biases=shifts, gates=gates)
    f = reference(weights, biases, codes, params)
    y_ref = vmap(f, in_dims=(0, [0 if s is not None else None for s in shifts],
                             [0 if g is not None else None for g in gates]))(x, shifts, gates)
    jac_ref = per_sample(f, x, shifts, gates, jacrev)
    lap_ref = per_sample(f, x, shifts, gates, hessian).diagonal(dim1=2, dim2=3).sum(2)
    for got, want in ((y, y_ref), (jac, jac_ref), (lap, lap_ref), (lap_only, lap_ref)):
        torch.testing.assert_close(got, want, **TOL)
    # gradients of a loss of all three, w.r.t. everything
    wy, wj, wl = torch.randn_like(y), torch.randn_like(jac), torch.randn_like(lap)
    inputs = [x, *weights, *present(biases), *present(shifts), *present(gates)]
    got = torch.autograd.grad((wy * y).sum() + (wj * jac).sum() + (wl * lap).sum() + (wl * lap_only).sum(), inputs)
    want = torch.autograd.grad((wy * y_ref).sum() + (wj * jac_ref).sum() + 2 * (wl * lap_ref).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("widths, codes, shifted, gated", [n for n in NETS if n[0][0] == n[0][-1]],
                         ids=[i for i, n in zip(IDS, NETS) if n[0][0] == n[0][-1]])
@pytest.mark.parametrize("method", ["forward", "hutchinson"])
def test_diagonal_and_divergence_against_torch_func(widths, codes, shifted, gated, method):
    x, weights, biases, shifts, gates, codes, params = random_net(widths, codes, shifted, gated)
    x, *weights = leaves(x, *weights)
    biases, shifts, gates = leaves(*biases), leaves(*shifts), leaves(*gates)
    f = reference(weights, biases, codes, params)
    jac_ref = per_sample(f, x, shifts, gates, jacrev)
    v = torch.randn(x.shape[0], 3, x.shape[1], dtype=x.dtype) if method == "hutchinson" else None
    kw = dict(method=method, projections=v, sample_biases=shifts, gates=gates)
    y, diag = ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, **kw)
    _, div = ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, trace=True, **kw)
    if v is None:
        diag_ref = jac_ref.diagonal(dim1=1, dim2=2)
        div_ref = diag_ref.sum(1)
    else:
        diag_ref = torch.einsum("bki,bij,bkj->bk", v, jac_ref, v)
        div_ref = diag_ref if div.dim() == 2 else diag_ref.sum(1)
    torch.testing.assert_close(diag, diag_ref, **TOL)
    torch.testing.assert_close(div, div_ref, **TOL)
    w, wy = torch.randn_like(diag), torch.randn_like(y)
    y_ref = vmap(f, in_dims=(0, [0 if s is not None else None for s in shifts],
                             [0 if g is not None else None for g in gates]))(x, shifts, gates)
    torch.testing.assert_close(y, y_ref, **TOL)
    inputs = [x, *weights, *present(biases), *present(shifts), *present(gates)]
    for a, b in zip(torch.autograd.grad((w * diag).sum() + div.sum() + (wy * y).sum(), inputs),
                    torch.autograd.grad((w * diag_ref).sum() + div_ref.sum() + (wy * y_ref).sum(), inputs)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("widths, codes, shifted, gated", NETS, ids=IDS)
def test_gradcheck_and_gradgradcheck(widths, codes, shifted, gated):
    x, weights, biases, shifts, gates, codes, params = random_net(widths, codes, shifted, gated, batch=3)
    L = len(weights)
    which_s = [i for i, s in enumerate(shifts) if s is not None]
    which_g = [i for i, g in enumerate(gates) if g is not None]

    def unpack(args):
        x, rest = args[0], list(args[1:])
        ws, rest = rest[:L], rest[L:]
        s, rest = rest[:len(which_s)], rest[len(which_s):]
        full_s, full_g = [None] * L, [None] * L
        for i, t in zip(which_s, s):
            full_s[i] = t
        for i, t in zip(which_g, rest):
            full_g[i] = t
        return x, ws, full_s, full_g

    def lap(*args):
        x, ws, s, g = unpack(args)
        return ops.mlp_laplacian(x, ws, biases, codes, params, return_gradient=True, sample_biases=s, gates=g)

    args = [t.requires_grad_() for t in [x, *weights, *present(shifts), *present(gates)]]
    assert torch.autograd.gradcheck(lap, args)
    assert torch.autograd.gradgradcheck(lap, args)
    if widths[0] == widths[-1]:
        def div(*args):
            x, ws, s, g = unpack(args)
            return ops.mlp_jacobian_diagonal(x, ws, biases, codes, params, trace=True, sample_biases=s, gates=g)
        assert torch.autograd.gradcheck(div, args)
        assert torch.autograd.gradgradcheck(div, args)


@pytest.mark.parametrize("widths, codes, shifted, gated", NETS, ids=IDS)
def test_tiles_give_the_same_values(widths, codes, shifted, gated):
    x, weights, biases, shifts, gates, codes, params = random_net(widths, codes, shifted, gated, batch=11)
    bias_t = [torch.empty(0, dtype=x.dtype) if b is None else b for b in biases]
    s_t = [torch.empty(0, dtype=x.dtype) if s is None else s for s in shifts]
    g_t = [torch.empty(0, dtype=x.dtype) if g is None else g for g in gates]
    args = (x, weights, bias_t, codes, params, True, None, -1, s_t, g_t)
    whole = torch.ops.jacext.mlp_laplacian(*args)
    tiled = torch.ops.jacext.mlp_laplacian(*args, tile=3)
    for a, b in zip(whole[:3], tiled[:3]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    grads_in = [torch.randn_like(t) for t in whole[:3]]
    back = [torch.ops.jacext.mlp_laplacian_backward(*grads_in, *args[:6], saved[3], *args[6:], tile=tile)
            for saved, tile in ((whole, 0), (tiled, 3))]
    flat = [[b[0], *b[1], *b[2], *b[3], *b[4]] for b in back]
    for a, b in zip(*flat):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [t.shape for t in back[0][3]] == [s.shape for s in s_t]
    assert [t.shape for t in back[0][4]] == [g.shape for g in g_t]


def test_closed_forms_refuse_and_the_planner_never_picks_them():
    x, weights, biases, shifts, gates, codes, params = random_net([3, 5, 3], ["tanh", "identity"], [0], [])
    assert resolve_diagonal_strategy("auto", [3, 5, 3], codes, False, 64, per_sample=True) == CARRY_FORWARD
    assert resolve_diagonal_strategy("auto", [3, 5, 3], codes, False, 64) == DIAGONAL_GRAM1
    with pytest.raises(ValueError, match="per-sample bias, gate or dropout mask"):
        ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, method="gram", sample_biases=shifts)
    empty = torch.empty(0, dtype=x.dtype)
    nets = {DIAGONAL_GRAM1: weights, TRACE_GRAM2: [weights[0], torch.randn(4, 5).double(), torch.randn(3, 4).double()]}
    for strategy, ws in nets.items():
        n = len(ws)
        codes, params = normalize_activations(["tanh"] * (n - 1) + ["identity"], None, n)
        s = [torch.randn(x.shape[0], ws[0].shape[0], dtype=x.dtype)] + [empty] * (n - 1)
        with pytest.raises(RuntimeError, match="closed forms"):
            torch.ops.jacext.mlp_jacobian_diagonal(x, ws, [empty] * n, codes, params, strategy, None, s)


def test_an_empty_list_and_an_empty_batch():
    """[] stands for none (the op's double backward too); a (0, n) bias of an empty batch is one."""
    x, weights, biases, shifts, gates, codes, params = random_net([3, 5, 3], ["tanh", "identity"], [], [0])
    x, *weights = leaves(x, *weights)
    gate = leaves(gates[0])[0]
    empty = torch.empty(0, dtype=x.dtype)
    _, grad, lap, _ = torch.ops.jacext.mlp_laplacian(x, weights, [empty] * 2, codes, params, True, None, -1, [],
                                                     [gate, empty])
    _, grad_ref, lap_ref = ops.mlp_laplacian(x, weights, [None] * 2, codes, params, return_gradient=True,
                                             gates=[gate, None])
    inputs = [x, *weights, gate]
    for a, b in zip(torch.autograd.grad(lap.sum() + grad.pow(2).sum(), inputs, create_graph=True),
                    torch.autograd.grad(lap_ref.sum() + grad_ref.pow(2).sum(), inputs, create_graph=True)):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(torch.autograd.grad(a.sum(), x, retain_graph=True)[0],
                                   torch.autograd.grad(b.sum(), x, retain_graph=True)[0], **TOL)
    x0, s0 = leaves(torch.randn(0, 3, dtype=x.dtype), torch.randn(0, 5, dtype=x.dtype))
    _, lap0 = ops.mlp_laplacian(x0, weights, [None] * 2, codes, params, sample_biases=[s0, None])
    lap0.sum().backward()
    assert lap0.shape == (0, 3) and s0.grad.shape == (0, 5)


def test_vmap_refuses_them():
    x, weights, biases, shifts, gates, codes, params = random_net([3, 5, 3], ["tanh", "identity"], [0], [1])
    with pytest.raises(NotImplementedError, match="per-sample biases and gates"):
        vmap(lambda s: ops.mlp_laplacian(s[None], weights, biases, codes, params, gates=gates))(x)


def test_bad_input():
    x, weights, biases, shifts, gates, codes, params = random_net([3, 5, 3], ["tanh", "identity"], [0], [1])
    with pytest.raises(RuntimeError, match=r"sample_biases\[0\] must have shape"):
        ops.mlp_laplacian(x, weights, biases, codes, params, sample_biases=[torch.randn(5, 4).double(), None])
    with pytest.raises(RuntimeError, match=r"gates\[1\] must match x's dtype"):
        ops.mlp_laplacian(x, weights, biases, codes, params, gates=[None, torch.randn(5, 3)])
    with pytest.raises(ValueError, match="one per-sample bias / gate per layer"):
        ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, gates=[None, None, gates[1]])


# ---- the front-end: users' conditioned models -------------------------------------------------

from torch import nn  # noqa: E402

import jacext  # noqa: E402
from jacext.frontend import FACTORS, NotLowerable, lower  # noqa: E402


class HiddenConcat(nn.Module):
    """t concatenated into a hidden Linear: W [h; t] + b = W_h h + (W_t t + b)."""

    def __init__(self, n=3, hidden=7, k=1):
        super().__init__()
        self.first, self.mid, self.last = nn.Linear(n, hidden), nn.Linear(hidden + k, hidden), nn.Linear(hidden, n)

    def forward(self, x, t):
        h = torch.tanh(self.first(x))
        h = nn.functional.softplus(self.mid(torch.cat([h, t], 1)))
        return self.last(h)


class ConcatSquashLinear(nn.Module):
    """FFJORD's layers.diffeq_layers.ConcatSquashLinear, as FFJORD writes it (t first)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(-1, 1))) + self._hyper_bias(t.view(-1, 1))


class SquashField(nn.Module):
    """An FFJORD-style ODE field f(x, t) of ConcatSquash layers, tanh between them."""

    def __init__(self, d, hidden=8, depth=3):
        super().__init__()
        widths = [d] + [hidden] * (depth - 1) + [d]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x, t):
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


MODELS = {"hidden-concat": lambda d: HiddenConcat(d), "squash-2": lambda d: SquashField(d, 6, 2),
          "squash-3": lambda d: SquashField(d, 8, 3)}


def model_and_inputs(name, d, batch=5, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name](d).double()
    return model, torch.randn(batch, d, dtype=torch.float64), torch.rand(batch, 1, dtype=torch.float64)


def field_reference(model, x, t, what):
    """what(f)(x_b) per sample, f(x_b) = model(x_b, t_b), by torch.func."""
    return vmap(lambda x, t: what(lambda x: model(x[None], t[None])[0])(x))(x, t)


def _grads(model, x, t, value):
    return torch.autograd.grad(value, [x, t, *model.parameters()])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("d", [2, 4])
def test_users_conditioned_models_against_torch_func(name, d):
    model, x, t = model_and_inputs(name, d)
    x.requires_grad_()
    t.requires_grad_()
    lowered = lower(model, x, t, supports=FACTORS)
    assert lowered.spec.sample_biases is not None
    assert (lowered.spec.gates is not None) == name.startswith("squash")
    jac = field_reference(model, x, t, jacrev)
    lap_ref = field_reference(model, x, t, hessian).diagonal(dim1=2, dim2=3).sum(2)
    y_ref = model(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine, not the generic path
        y, grad, lap = jacext.laplacian(model, x, return_gradient=True, cond=t)
        _, div = jacext.divergence(model, x, cond=t)
        _, div_h = jacext.divergence(model, x, method="hutchinson", n_proj=d, orthogonal=True, cond=t,
                                     generator=torch.Generator().manual_seed(3))
        _, diag = jacext.jacobian_diagonal(model, x, cond=t)
    div_ref = jac.diagonal(dim1=1, dim2=2).sum(1)
    for got, want in ((y, y_ref), (grad, jac), (lap, lap_ref), (div, div_ref), (div_h, div_ref),
                      (diag, jac.diagonal(dim1=1, dim2=2))):
        torch.testing.assert_close(got, want, **TOL)
    w, wy = torch.randn_like(lap), torch.randn_like(y)
    got = _grads(model, x, t, (wy * y).sum() + (w * lap).sum() + (w * grad.sum(2)).sum() + div.sum() + div_h.sum()
                 + (w * diag).sum())
    want = _grads(model, x, t, (wy * y_ref).sum() + (w * lap_ref).sum() + (w * jac.sum(2)).sum() + 2 * div_ref.sum()
                  + (w * jac.diagonal(dim1=1, dim2=2)).sum())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_divergence_over_x_beside_t_at_the_input_and_inside():
    """cat([x, t]) at the input and t inside: the divergence over x's columns (the squared-up net
    spreads the last layer's gate and bias like its rows)."""

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.out = nn.Linear(3, 6), ConcatSquashLinear(6, 2)

        def forward(self, x, t):
            return self.out(t, torch.tanh(self.first(torch.cat([x, t], 1))))

    torch.manual_seed(1)
    model, x, t = Both().double(), torch.randn(4, 2, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)
    _, div = jacext.divergence(model, x, cond=t)
    _, diag = jacext.jacobian_diagonal(model, x, cond=t)
    jac = field_reference(model, x, t, jacrev)
    torch.testing.assert_close(diag, jac.diagonal(dim1=1, dim2=2), **TOL)
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1), **TOL)


def test_a_quantity_that_does_not_name_them_refuses_them_and_the_jacobian_family_takes_them():
    model, x, t = model_and_inputs("squash-2", 3)
    with pytest.raises(NotLowerable, match="per-sample"):
        lower(model, x, t, supports=frozenset(("input_concat", "dropout", "residual")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine (tests/test_conditioning_jacobian.py)
        _, sq = jacext.jacobian_frobenius(model, x, cond=t)
    torch.testing.assert_close(sq, field_reference(model, x, t, jacrev).pow(2).sum((1, 2)), **TOL)


def test_dropout_with_conditioning_inside_runs_the_forward_carry():
    """The forward-carry ops take the masks beside per-sample biases and gates; supports without the
    combination refuse it, naming it (tests/test_dropout_carry.py checks the values in depth)."""

    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.squash, self.drop, self.out = ConcatSquashLinear(3, 6), nn.Dropout(0.3), nn.Linear(6, 3)

        def forward(self, x, t):
            return self.out(self.drop(torch.tanh(self.squash(t, x))))

    torch.manual_seed(2)
    model, x, t = Dropped().double(), torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)
    with pytest.raises(NotLowerable, match="Dropout in train\\(\\) in a model conditioned inside"):
        lower(model, x, t, supports=FACTORS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the engine: no fallback warning
        torch.manual_seed(0)
        _, div = jacext.divergence(model, x, cond=t)
    torch.manual_seed(0)  # the same masks
    torch.testing.assert_close(div, jacext.divergence(model, x, cond=t, method="autograd")[1], **TOL)


def test_explain_names_the_gates_and_biases():
    model, x, t = model_and_inputs("squash-3", 2)
    text = repr(jacext.explain(model, x, quantity="divergence", cond=t))
    assert "per-sample biases at layers [0, 1, 2], gates at layers [0, 1, 2]" in text
    assert "closed forms" in text
    # the cost model counts the gate's backward GEMM (the unscaled rows, recomputed) once per gated layer
    widths = [2, 8, 8, 2]
    layout = diagonal_layout(widths, CARRY_FORWARD, per_sample_top=True)
    assert carry_macs(widths, 5, layout, gated=(0, 2)) - carry_macs(widths, 5, layout) == 5 * layout.rows * (16 + 16)


def test_patterns_that_stay_off_the_engine():
    class GateAfterActivation(nn.Module):  # the gate after the activation: not a pre-activation factor
        def __init__(self):
            super().__init__()
            self.lin, self.gate = nn.Linear(2, 2), nn.Linear(1, 2)

        def forward(self, x, t):
            return torch.tanh(self.lin(x)) * torch.sigmoid(self.gate(t))

    class ExpOfT(nn.Module):  # a function of t the reader does not compute
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, t):
            return self.lin(x) + torch.exp(t)

    x, t = torch.randn(3, 2), torch.rand(3, 1)
    with pytest.raises(NotLowerable, match="between a Linear and its activation"):
        lower(GateAfterActivation(), x, t, supports=FACTORS)
    with pytest.raises(NotLowerable, match="conditioning input"):
        lower(ExpOfT(), x, t, supports=FACTORS)


def test_cnf_example_with_concatsquash_layers_runs_on_the_engine(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", os.path.join(root, "examples", "cnf_density.py"),
                          "--quick", "--field", "concatsquash", "--out", ""], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})  # the checkout's jacext, installed or not
    assert run.returncode == 0, run.stdout + run.stderr
    assert "held-out negative log-likelihood" in run.stdout
