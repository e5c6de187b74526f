"""Residual skips h + g(h) on the forward-carry ops (csrc/mlp_laplacian.h: the carry after a block
adds the carry that entered it; the backward adds the block's outgoing adjoint to its incoming one):
users' residual modules lowered by the front-end, values and gradients in float64 against
torch.func, the ops' gradcheck and gradgradcheck, the planner and explain, bad input, and the
quantities that take no skip routed to the generic path."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext
from jacext import ops
from jacext._library import normalize_activations
from jacext._route import _warned
from jacext.frontend import FACTORS, NotLowerable, lower
from jacext.layouts import CARRY_FORWARD, DIAGONAL_GRAM1, laplacian_layout
from jacext.planner import resolve_diagonal_strategy

TOL = dict(rtol=1e-9, atol=1e-10)


class Block(nn.Module):
    """h + act(W h + b), written as users write it."""

    def __init__(self, n, act=None):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.act = nn.Tanh() if act is None else act

    def forward(self, x):
        return x + self.act(self.lin(x))


class TwoLayerBlock(nn.Module):
    """g(h) + h with g two Linears (the skip spans two layers: j < i), summed by torch.add."""

    def __init__(self, n, hidden):
        super().__init__()
        self.inner = nn.Linear(n, hidden)
        self.outer = nn.Linear(hidden, n)

    def forward(self, x):
        return torch.add(self.outer(nn.functional.softplus(self.inner(x))), x)


class InPlaceBlock(nn.Module):
    """h = g(h); h += x, with a Dropout (in eval()) between the block's input and its first Linear."""

    def __init__(self, n):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.lin, self.lin2 = nn.Linear(n, n), nn.Linear(n, n)

    def forward(self, x):
        h = self.lin2(torch.sigmoid(self.lin(self.drop(x))))
        h += x
        return h


class MethodBlock(nn.Module):
    """act(W h + b).add(h)."""

    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return torch.tanh(self.lin(x)).add(x)


class ResidualPINN(nn.Module):
    """n -> width, `blocks` blocks h + tanh(W h + b), -> m."""

    def __init__(self, n, width, blocks, m):
        super().__init__()
        self.inp = nn.Linear(n, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.out = nn.Linear(width, m)

    def forward(self, x):
        return self.out(self.blocks(torch.tanh(self.inp(x))))


def models():
    """name -> (model, expected MLPSpec.residual)."""
    torch.manual_seed(0)
    return {
        "pinn-depth1": (ResidualPINN(2, 6, 1, 1), [-1, 1, -1]),
        "pinn-depth3": (ResidualPINN(3, 8, 3, 2), [-1, 1, 2, 3, -1]),
        "square-mixed": (nn.Sequential(nn.Linear(3, 5), nn.Tanh(), Block(5, nn.GELU()), TwoLayerBlock(5, 7),
                                       nn.Linear(5, 3)), [-1, 1, -1, 2, -1]),
        "input-block": (nn.Sequential(Block(2), nn.Linear(2, 6), nn.Softplus(), nn.Linear(6, 2)), [0, -1, -1]),
        "output-block": (nn.Sequential(nn.Linear(3, 3), nn.Tanh(), TwoLayerBlock(3, 4)), [-1, -1, 1]),
        "whole-net": (TwoLayerBlock(4, 9), [-1, 0]),
        "in-place": (nn.Sequential(nn.Linear(4, 4), nn.SiLU(), InPlaceBlock(4), MethodBlock(4)).eval(),
                     [-1, -1, 1, 3]),
    }


MODELS = models()
SQUARE = [name for name, (m, _) in MODELS.items() if name not in ("pinn-depth1", "pinn-depth3")]


def model_and_x(name, batch=5, seed=1):
    model, _ = MODELS[name]
    model = model.double()
    n = lower(model, supports=FACTORS).spec.widths[0]
    return model, torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_sample(model):
    return lambda x: model(x.unsqueeze(0)).squeeze(0)


def params_of(model):
    return [p for p in model.parameters()]


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_all_close(got, want):
    """Gradients; None (an input the reference does not reach, e.g. the last bias of a Laplacian)
    stands for zeros."""
    for g, w in zip(got, want):
        if g is None or w is None:
            assert (g if w is None else w) is None or not (g if w is None else w).any()
            continue
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_front_end_reads_the_skips(name):
    model, residual = MODELS[name]
    assert lower(model, supports=FACTORS).spec.residual == residual
    assert lower(model, supports=FACTORS).residual == residual


def test_no_skip_is_none():
    assert lower(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).spec.residual is None


@pytest.mark.parametrize("gradient", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_laplacian_values_and_gradients(name, gradient):
    model, x = model_and_x(name)
    x.requires_grad_()
    out = jacext.laplacian(model, x, return_gradient=gradient)
    y, lap = out[0], out[-1]
    f = per_sample(model)
    lap_ref = vmap(hessian(f))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(y, model(x), **TOL)
    torch.testing.assert_close(lap, lap_ref, **TOL)
    loss, loss_ref = lap.square().sum(), lap_ref.square().sum()
    if gradient:
        grad_ref = vmap(jacrev(f))(x)
        torch.testing.assert_close(out[1], grad_ref, **TOL)
        loss, loss_ref = loss + out[1].sin().sum(), loss_ref + grad_ref.sin().sum()
    inputs = [x] + params_of(model)
    assert_all_close(grads(loss, inputs), grads(loss_ref, inputs))


@pytest.mark.parametrize("name", ["pinn-depth3", "square-mixed", "input-block"])
def test_laplacian_over_chosen_features(name):
    """wrt runs as tangent directions on the same forward carry: skips included."""
    model, x = model_and_x(name)
    wrt = [x.shape[1] - 1, 0]
    _, grad, lap = jacext.laplacian(model, x, return_gradient=True, wrt=wrt)
    hess = vmap(hessian(per_sample(model)))(x)
    torch.testing.assert_close(lap, hess[..., wrt, wrt].sum(-1), **TOL)
    torch.testing.assert_close(grad, vmap(jacrev(per_sample(model)))(x), **TOL)


@pytest.mark.parametrize("method", ["auto", "forward"])
@pytest.mark.parametrize("name", SQUARE)
def test_divergence_and_diagonal(name, method):
    model, x = model_and_x(name)
    x.requires_grad_()
    jac = vmap(jacrev(per_sample(model)))(x)
    diag_ref = jac.diagonal(dim1=1, dim2=2)
    y, div = jacext.divergence(model, x, method=method)
    _, diag = jacext.jacobian_diagonal(model, x, method=method)
    torch.testing.assert_close(y, model(x), **TOL)
    torch.testing.assert_close(div, diag_ref.sum(1), **TOL)
    torch.testing.assert_close(diag, diag_ref, **TOL)
    inputs = [x] + params_of(model)
    assert_all_close(grads(div.square().sum() + diag.cos().sum(), inputs),
                     grads(diag_ref.sum(1).square().sum() + diag_ref.cos().sum(), inputs))


@pytest.mark.parametrize("name", SQUARE)
def test_hutchinson_fixed_projections(name):
    """The op's terms v^T J v for given projections, and the estimator exact with orthogonal rows
    scaled by sqrt(n), n of them."""
    model, x = model_and_x(name)
    x.requires_grad_()
    spec = lower(model, x, supports=FACTORS).spec
    v = torch.randn(x.shape[0], 3, x.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, terms = ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                         method="hutchinson", projections=v, residual=spec.residual)
    jac = vmap(jacrev(per_sample(model)))(x)
    terms_ref = torch.einsum("bki,bij,bkj->bk", v, jac, v)
    torch.testing.assert_close(terms, terms_ref, **TOL)
    inputs = [x] + params_of(model)
    assert_all_close(grads(terms.square().sum(), inputs), grads(terms_ref.square().sum(), inputs))
    _, div = jacext.divergence(model, x, method="hutchinson", n_proj=x.shape[1], orthogonal=True,
                               generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1), **TOL)


# --- the ops -------------------------------------------------------------------------------------

def random_net(widths, codes, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5).requires_grad_()
               for i, o in zip(widths[:-1], widths[1:])]
    biases = [(torch.randn(o, generator=g, dtype=torch.float64) * 0.3).requires_grad_() for o in widths[1:]]
    x = torch.randn(4, widths[0], generator=g, dtype=torch.float64).requires_grad_()
    return x, weights, biases, codes


# (widths, activations, residual): one- and two-layer blocks, several skips from one carry, a block
# at the input, a block into the output, every layer a block
NETS = [
    ((3, 5, 5, 3), ["tanh", "tanh", "identity"], [-1, 1, -1]),
    ((2, 2, 4, 2), ["sigmoid", "softplus", "identity"], [0, -1, 1]),
    ((3, 4, 4, 4, 3), ["tanh", "gelu", "silu", "tanh"], [-1, 1, 1, -1]),
    ((3, 3, 3, 3), ["tanh", "elu", "tanh"], [0, 1, 2]),
    ((4, 6, 4), ["softplus", "identity"], [-1, 0]),
]


@pytest.mark.parametrize("widths, codes, residual", NETS, ids=[str(r) for *_, r in NETS])
def test_ops_gradcheck_and_gradgradcheck(widths, codes, residual):
    x, weights, biases, codes = random_net(widths, codes)
    L = len(weights)
    v = torch.randn(4, 2, widths[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calls = [lambda x, *p: ops.mlp_laplacian(x, p[:L], p[L:], codes, return_gradient=True, residual=residual),
             lambda x, *p: ops.mlp_laplacian(x, p[:L], p[L:], codes, residual=residual),
             lambda x, *p: ops.mlp_laplacian(x, p[:L], p[L:], codes, directions=v, laplacian_rows=1,
                                             residual=residual)]
    if widths[0] == widths[-1]:
        calls += [lambda x, *p: ops.mlp_jacobian_diagonal(x, p[:L], p[L:], codes, residual=residual),
                  lambda x, *p: ops.mlp_jacobian_diagonal(x, p[:L], p[L:], codes, trace=True, residual=residual),
                  lambda x, *p: ops.mlp_jacobian_diagonal(x, p[:L], p[L:], codes, method="hutchinson",
                                                          projections=v, residual=residual)]
    for call in calls:
        assert torch.autograd.gradcheck(call, (x, *weights, *biases))
        assert torch.autograd.gradgradcheck(call, (x, *weights, *biases))


@pytest.mark.parametrize("widths, codes, residual", NETS, ids=[str(r) for *_, r in NETS])
def test_tiles_give_the_same_values(widths, codes, residual):
    x, weights, biases, codes = random_net(widths, codes)
    x = torch.randn(11, widths[0], dtype=torch.float64)
    codes, params = normalize_activations(codes, None, len(codes))
    args = (x, weights, biases, codes, params, True)
    whole = torch.ops.jacext.mlp_laplacian(*args, residual=residual)
    tiled = torch.ops.jacext.mlp_laplacian(*args, residual=residual, tile=3)
    for a, b in zip(whole[:3], tiled[:3]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    grads_in = [torch.randn_like(t) for t in whole[:3]]
    back = [torch.ops.jacext.mlp_laplacian_backward(*grads_in, *args, saved[3], residual=residual, tile=tile)
            for saved, tile in ((whole, 0), (tiled, 3))]
    torch.testing.assert_close(back[0][0], back[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(back[0][1] + back[0][2], back[1][1] + back[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if widths[0] != widths[-1]:
        return
    args = (x, weights, biases, codes, params, CARRY_FORWARD)
    whole = torch.ops.jacext.mlp_jacobian_diagonal(*args, residual=residual)
    tiled = torch.ops.jacext.mlp_jacobian_diagonal(*args, residual=residual, tile=3)
    torch.testing.assert_close(whole[1], tiled[1], rtol=1e-13, atol=1e-13)
    grads_in = [torch.randn_like(t) for t in whole[:2]]
    back = [torch.ops.jacext.mlp_jacobian_diagonal_backward(*grads_in, *args, saved[2], residual=residual, tile=tile)
            for saved, tile in ((whole, 0), (tiled, 3))]
    for a, b in zip([back[0][0]] + back[0][1] + back[0][2], [back[1][0]] + back[1][1] + back[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compile_and_vmap_take_the_skip():
    """The fakes build the outputs from the layout with the skip; vmap over the samples folds into
    the op's batch with the keyword passed through."""
    model, x = model_and_x("output-block", batch=6)
    spec = lower(model, x, supports=FACTORS).spec
    args = (spec.weights, spec.biases, spec.activations, spec.act_params)
    with torch.no_grad():
        want = ops.mlp_jacobian_diagonal(x, *args, residual=spec.residual)
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: ops.mlp_laplacian(x, *args, return_gradient=True, residual=spec.residual),
                                 fullgraph=True, backend="aot_eager")
        for got, eager in zip(compiled(x), ops.mlp_laplacian(x, *args, return_gradient=True, residual=spec.residual)):
            torch.testing.assert_close(got, eager, **TOL)
        mapped = vmap(lambda s: ops.mlp_jacobian_diagonal(s.unsqueeze(0), *args, residual=spec.residual))(x)
    for got, eager in zip(mapped, want):
        torch.testing.assert_close(got.squeeze(1), eager, **TOL)


def test_bad_residual_raises():
    x, weights, biases, codes = random_net((3, 4, 4, 3), ["tanh", "tanh", "identity"])
    for residual, match in [([-1, 2, -1], r"residual\[1\] must be -1 \(no skip\) or the index j <= 1"),
                            ([-1, 0, -1], r"adds the input of layer 0 \(width 3\) to the output of layer 1 "
                                          r"\(width 4\)"),
                            ([-1, 1], "one entry per layer"),
                            ([-1, -2, -1], r"residual\[1\] must be -1")]:
        with pytest.raises(ValueError, match=match):
            ops.mlp_laplacian(x, weights, biases, codes, residual=residual)
        op_codes = [jacext.activations.NAMES[c] for c in codes]
        with pytest.raises(RuntimeError, match="jacext: residual"):
            torch.ops.jacext.mlp_laplacian(x, weights, biases, op_codes, [0.0] * 6, False, residual=residual)


def test_closed_forms_refuse_a_skip():
    x, weights, biases, codes = random_net((3, 3, 3), ["tanh", "tanh"])
    with pytest.raises(ValueError, match="method='gram' needs .* and no residual skip"):
        ops.mlp_jacobian_diagonal(x, weights, biases, codes, method="gram", residual=[-1, 1])
    op_codes = [jacext.activations.NAMES[c] for c in codes]
    with pytest.raises(RuntimeError, match="closed forms .* do not apply across a residual skip"):
        torch.ops.jacext.mlp_jacobian_diagonal(x, weights, biases, op_codes, [0.0] * 4, DIAGONAL_GRAM1,
                                               residual=[-1, 1])
    # without the skip the planner takes the closed form here; with it, the forward columns
    assert resolve_diagonal_strategy("auto", [3, 3, 3], op_codes, False) == DIAGONAL_GRAM1
    assert resolve_diagonal_strategy("auto", [3, 3, 3], op_codes, False, residual=[-1, 1]) == CARRY_FORWARD
    # the Laplacian's thin last layer does not apply under a skip into the output
    linear_out = op_codes[:1] + [jacext.activations.IDENTITY]
    assert laplacian_layout([3, 3, 3], linear_out, False).carried == 1
    assert laplacian_layout([3, 3, 3], linear_out, False, residual=[-1, 0]).carried == 2


def test_explain_says_a_skip_rules_out_the_closed_form():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), Block(3)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    plan = jacext.explain(model, x, quantity="jacobian_diagonal")
    forward = "forward columns + diagonal epilogue"
    assert plan.choice == forward and list(plan.candidates) == [forward]
    assert "closed forms (which carry h alone) do not apply across a skip" in repr(plan)
    assert "residual skips (i, j), layer i's output adds layer j's input: (1, 1)" in repr(plan)
    assert "residual" not in repr(jacext.explain(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), x,
                                                 quantity="jacobian_diagonal"))
    plan = jacext.explain(MODELS["output-block"][0].double(), x, quantity="laplacian")
    assert "thin linear last layer" in repr(plan) and plan.layout.carried == 3


# --- the quantities without skips: the generic path ----------------------------------------------

# (the Jacobian family, the spectral norm and the margin take skips: tests/test_residual_jacobian.py,
# tests/test_factors_spectral_margin.py)


def test_divergence_and_diagonal_over_chosen_features_run_skips_on_the_engine():
    """wrt: the fused diagonal op on the net squared up keeps the skips (none into the output here)."""
    model, x = model_and_x("square-mixed")
    jac = vmap(jacrev(per_sample(model)))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no generic-path warning
        div = jacext.divergence(model, x, wrt=[0, 1, 2])[1]
        diag = jacext.jacobian_diagonal(model, x, wrt=[2, 0, 1], method="forward")[1]
    torch.testing.assert_close(div, jac[:, :, :3].diagonal(dim1=1, dim2=2).sum(1), **TOL)
    torch.testing.assert_close(diag, jac[:, :, [2, 0, 1]].diagonal(dim1=1, dim2=2), **TOL)


def test_other_readers_refuse_a_skip():
    model, x = model_and_x("square-mixed")
    with pytest.raises(NotLowerable, match="a residual skip"):
        jacext.parse_model(model)
    assert "the Gram forms" in repr(jacext.explain(model, x))  # the Jacobian family takes skips
    assert jacext.parse_model(model, supports=FACTORS).residual == MODELS["square-mixed"][1]
    target = torch.tensor([0, 1, 2, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, dist = jacext.margin_distances(model, x, target, on="logits")
    _, dist_ref = jacext.margin_distances(model, x, target, on="logits", method="autograd")
    torch.testing.assert_close(dist, dist_ref, **TOL)


# --- refusals of sums that are not a skip --------------------------------------------------------

class PostActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(x + self.lin(x)))


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.lin = nn.Linear(3, 1), nn.Linear(1, 3)

    def forward(self, x):
        h = self.inp(x)
        return h + torch.tanh(self.lin(h))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.add(x, torch.tanh(self.lin(x)), alpha=0.5)


class AfterBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.lin = nn.BatchNorm1d(3), nn.Linear(3, 3)

    def forward(self, x):
        h = self.bn(x)
        return h + torch.tanh(self.lin(h))


class Doubled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h + h


@pytest.mark.parametrize("model, why", [
    (PostActivation(), "an activation after a residual sum"),
    (Broadcast(), "a residual sum of widths 1 and 3"),
    (Scaled(), "a sum other than a + b"),
    (AfterBatchNorm().eval(), "it adds a value other than the input of an earlier nn.Linear"),
    (Doubled(), "a sum that is not h + g(h)"),
], ids=["post-activation", "broadcast", "alpha", "after-batchnorm", "doubled"])
def test_sums_that_are_not_skips_do_not_lower(model, why):
    with pytest.raises(NotLowerable, match="does not run on the fused engine") as info:
        lower(model, supports=FACTORS)
    assert why in info.value.why
    x = torch.randn(4, 3)
    _warned.clear()
    with pytest.warns(RuntimeWarning, match="runs the generic autograd path"):
        _, lap = jacext.laplacian(model, x)
    lap_ref = vmap(hessian(per_sample(model)))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(lap, lap_ref, rtol=1e-4, atol=1e-5)


def test_residual_pinn_example_runs_quick(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "residual_pinn.py")
    run = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path / "pinn.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "relative L2 error" in run.stdout and (tmp_path / "pinn.png").exists()
    assert "residual skips (i, j)" in run.stdout


def test_chosen_features_with_a_skip_into_the_output_are_refused_with_the_way_out():
    model, x = model_and_x("output-block")
    with pytest.raises(ValueError, match="no residual skip into the output layer on the engine; method='autograd'"):
        jacext.divergence(model, x, wrt=[1, 0, 2])
    jac = vmap(jacrev(per_sample(model)))(x)[:, :, [1, 0, 2]]
    torch.testing.assert_close(jacext.divergence(model, x, wrt=[1, 0, 2], method="autograd")[1],
                               jac.diagonal(dim1=1, dim2=2).sum(1), **TOL)
