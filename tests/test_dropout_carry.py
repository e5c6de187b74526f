"""Dropout masks on the forward-carry engine (csrc/mlp_laplacian.h): a mask m after layer i's activation
scales every carried row of that layer (h, the tangent rows, Delta), and the backward the adjoints of
those rows. The ops' values and gradients (w.r.t. x and every parameter) in float64 against torch.func
on the masked network written as a plain function, with residual skips and conditioning inside the
net, gradcheck and gradgradcheck; then models with Dropout in train() through jacext.laplacian,
divergence and jacobian_diagonal against torch.func on the model with the same masks, and
y == model(x) under the same seed."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext
from jacext import ops
from jacext._library import normalize_activations
from jacext.estimators import random_projections
from jacext.frontend import FACTORS, NotLowerable, lower
from jacext.laplacian import FORWARD_CARRY

from helpers import factored_mlp

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


# --- the ops ---------------------------------------------------------------------------------------

# (widths, activations, masked layers, residual, layers with a per-sample bias, layers with a gate);
# square nets, so that the diagonal ops apply too
NETS = [
    ([3, 5, 4, 3], ["tanh", "softplus", "identity"], (0, 1), None, (), ()),      # the Laplacian's thin top
    ([3, 5, 4, 3], ["tanh", "gelu", "sigmoid"], (0, 2), None, (), ()),          # a mask on the output
    ([3, 5, 4, 3], ["identity", "tanh", "identity"], (0, 2), None, (), ()),     # masked identity layers
    ([3, 4, 4, 4, 3], ["tanh", "softplus", "sigmoid", "identity"], (1, 2), [-1, 1, 1, -1], (), ()),
    ([3, 3, 4, 3], ["silu", "tanh", "tanh"], (0, 1, 2), [0, -1, 0], (), ()),    # a skip into the output
    ([3, 5, 4, 3], ["tanh", "softplus", "identity"], (0, 1), None, (1,), (0, 1)),
]
IDS = [f"{w}-{''.join(a[0] for a in names)}-m{m}-r{r}-s{s}-g{g}" for w, names, m, r, s, g in NETS]


def random_net(widths, names, masked, shifted=(), gated=(), batch=5, seed=0, p=0.4):
    """x, weights, biases (None for some), masks (0 or 1/(1-p)), per-sample biases, gates, codes,
    params; every tensor a leaf, the masks constants."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    outs = widths[1:]
    x = rand(batch, widths[0])
    weights = [rand(n, m) * 0.8 for m, n in zip(widths[:-1], outs)]
    biases = [rand(n) * 0.3 if i % 2 == 0 else None for i, n in enumerate(outs)]
    masks = [(torch.rand(batch, n, generator=g, dtype=DT) > p).to(DT) / (1 - p) if i in masked else None
             for i, n in enumerate(outs)]
    shifts = [rand(batch, n) * 0.5 if i in shifted else None for i, n in enumerate(outs)]
    gates = [torch.sigmoid(rand(batch, n)) + 0.2 if i in gated else None for i, n in enumerate(outs)]
    codes, params = normalize_activations(names, None, len(names))
    leaf = lambda ts: [t.requires_grad_() if t is not None else None for t in ts]  # noqa: E731
    return (x.requires_grad_(), leaf(weights), leaf(biases), masks, leaf(shifts), leaf(gates), codes, params)


def per_sample(what, f, x, *lists):
    """vmap of what(x_b -> f(x_b, *lists_b)) over the batch; lists: per-layer lists with None entries."""
    dims = tuple([None if t is None else 0 for t in ts] for ts in lists)
    return vmap(lambda x, *ls: what(lambda x: f(x, *ls))(x), in_dims=(0, *dims))(x, *lists)


def present(ts):
    return [t for t in ts if t is not None]


def assert_values_and_gradients(ours, theirs, inputs, seed=3):
    """ours == theirs, and the gradients of a random weighting of each w.r.t. every input."""
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
    weights = [torch.randn(o.shape, generator=g, dtype=DT) for o in theirs]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs, retain_graph=True,
                                 allow_unused=True, materialize_grads=True) for outs in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("widths, names, masked, residual, shifted, gated", NETS, ids=IDS)
def test_laplacian_op_against_torch_func(widths, names, masked, residual, shifted, gated):
    x, weights, biases, masks, shifts, gates, codes, params = random_net(widths, names, masked, shifted, gated)
    f = factored_mlp(weights, biases, codes, params, residual)
    inputs = [x, *weights, *present(biases), *present(shifts), *present(gates)]
    factors = dict(masks=masks, residual=residual, sample_biases=shifts, gates=gates)
    y_ref = per_sample(lambda g: g, f, x, shifts, gates, masks)
    jac = per_sample(jacrev, f, x, shifts, gates, masks)
    hess = per_sample(hessian, f, x, shifts, gates, masks)
    lap = hess.diagonal(dim1=2, dim2=3).sum(2)
    ours = ops.mlp_laplacian(x, weights, biases, codes, params, return_gradient=True, **factors)
    assert_values_and_gradients(ours, (y_ref, jac, lap), inputs)
    ours = ops.mlp_laplacian(x, weights, biases, codes, params, **factors)
    assert_values_and_gradients(ours, (y_ref, lap), inputs)
    # chosen directions (wrt): features 2 and 0 summed, the gradient over every feature in that order
    directions = torch.eye(widths[0], dtype=DT)[[2, 0, 1]].unsqueeze(0)
    chosen = hess[:, :, 2, 2] + hess[:, :, 0, 0]
    ours = ops.mlp_laplacian(x, weights, biases, codes, params, return_gradient=True, directions=directions,
                             laplacian_rows=2, **factors)
    assert_values_and_gradients(ours, (y_ref, jac[:, :, [2, 0, 1]], chosen), inputs)
    ours = ops.mlp_laplacian(x, weights, biases, codes, params, directions=directions[:, :2], laplacian_rows=2,
                             **factors)
    assert_values_and_gradients(ours, (y_ref, chosen), inputs)


@pytest.mark.parametrize("widths, names, masked, residual, shifted, gated", NETS, ids=IDS)
def test_diagonal_op_against_torch_func(widths, names, masked, residual, shifted, gated):
    x, weights, biases, masks, shifts, gates, codes, params = random_net(widths, names, masked, shifted, gated)
    f = factored_mlp(weights, biases, codes, params, residual)
    inputs = [x, *weights, *present(biases), *present(shifts), *present(gates)]
    factors = dict(masks=masks, residual=residual, sample_biases=shifts, gates=gates)
    y_ref = per_sample(lambda g: g, f, x, shifts, gates, masks)
    jac = per_sample(jacrev, f, x, shifts, gates, masks)
    diag = jac.diagonal(dim1=1, dim2=2)
    for method in ("auto", "forward"):
        assert_values_and_gradients(ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, method=method,
                                                              **factors), (y_ref, diag), inputs)
        assert_values_and_gradients(ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, method=method,
                                                              trace=True, **factors), (y_ref, diag.sum(1)), inputs)
    v = torch.randn(x.shape[0], 4, widths[0], generator=torch.Generator().manual_seed(7), dtype=DT)
    terms = torch.einsum("bki,bij,bkj->bk", v, jac, v)
    ours = ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, method="hutchinson", projections=v, **factors)
    assert_values_and_gradients(ours, (y_ref, terms), inputs)


def _op_function(op, widths, names, masked, residual=None, **kwargs):
    """(fn(x, *weights, *biases) -> the op's differentiable outputs, inputs) on a small batch."""
    x, weights, biases, masks, _, _, codes, params = random_net(widths, names, masked, batch=3, seed=4)
    biases = [torch.zeros(w.shape[0], dtype=DT, requires_grad=True) if b is None else b
              for w, b in zip(weights, biases)]
    L = len(weights)

    def fn(x, *p):
        return op(x, p[:L], p[L:], codes, params, masks=masks, residual=residual, **kwargs)

    return fn, (x, *weights, *biases)


@pytest.mark.parametrize("case", [
    (ops.mlp_laplacian, dict(return_gradient=True)),
    (ops.mlp_laplacian, {}),  # the thin linear top
    (ops.mlp_jacobian_diagonal, dict(method="forward")),
    (ops.mlp_jacobian_diagonal, dict(method="forward", trace=True)),
], ids=["laplacian-gradient", "laplacian", "diagonal", "trace"])
@pytest.mark.parametrize("residual", [None, [-1, 1, 0]], ids=["plain", "residual"])
def test_gradcheck_and_gradgradcheck_with_masks(case, residual):
    op, kwargs = case
    fn, inputs = _op_function(op, [3, 3, 3, 3], ["tanh", "softplus", "identity"], (0, 1), residual, **kwargs)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_hutchinson_gradcheck_and_a_masked_top():
    v = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    fn, inputs = _op_function(ops.mlp_jacobian_diagonal, [3, 4, 3], ["tanh", "sigmoid"], (0, 1), method="hutchinson",
                              projections=v)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    fn, inputs = _op_function(ops.mlp_laplacian, [3, 4, 2], ["tanh", "identity"], (1,))
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_tiles_give_the_whole_batchs_results():
    x, weights, biases, masks, _, _, codes, params = random_net([3, 5, 4, 3], ["tanh", "gelu", "identity"], (0, 1),
                                                                batch=7)
    op_biases = [x.new_empty(0) if b is None else b for b in biases]
    op_masks = [x.new_empty(0) if m is None else m for m in masks]
    for name, args in (("mlp_laplacian", (True, None, -1, None, None, op_masks)),
                       ("mlp_jacobian_diagonal", (0, None, None, None, op_masks))):
        op = getattr(torch.ops.jacext, name)
        whole, tiled = (op(x, weights, op_biases, codes, params, *args, tile=tile) for tile in (0, 3))
        for a, b in zip(whole[:-1], tiled[:-1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_closed_forms_refuse_masks_and_the_planner_never_picks_them():
    x, weights, biases, masks, _, _, codes, params = random_net([3, 5, 3], ["tanh", "identity"], (0,))
    op_biases = [x.new_empty(0) if b is None else b for b in biases]
    op_masks = [x.new_empty(0) if m is None else m for m in masks]
    with pytest.raises(RuntimeError, match="closed forms .* dropout masks"):
        torch.ops.jacext.mlp_jacobian_diagonal(x, weights, op_biases, codes, params, 1, None, None, None, op_masks)
    with pytest.raises(ValueError, match="dropout mask"):
        ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, method="gram", masks=masks)
    f = factored_mlp(weights, biases, codes, params)
    diag = per_sample(jacrev, f, x, [None] * 2, [None] * 2, masks).diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, masks=masks)[1], diag,
                               **TOL)


def test_masks_are_constants_and_checked():
    x, weights, biases, masks, _, _, codes, params = random_net([3, 5, 3], ["tanh", "identity"], (0,))
    with pytest.raises(ValueError, match="masks are constants"):
        ops.mlp_laplacian(x, weights, biases, codes, params, masks=[masks[0].requires_grad_(), None])
    with pytest.raises(RuntimeError, match=r"masks\[0\] must have shape"):
        ops.mlp_laplacian(x, weights, biases, codes, params, masks=[masks[0][:, :2].detach(), None])
    with pytest.raises(RuntimeError, match="masks"):
        ops.mlp_jacobian_diagonal(x, weights, biases, codes, params, masks=[masks[0].detach()])


# --- models with Dropout in train() ---------------------------------------------------------------

class ConcatSquashLinear(nn.Module):
    """FFJORD's ConcatSquashLinear (t first)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(-1, 1))) + self._hyper_bias(t.view(-1, 1))


class ResidualDropout(nn.Module):
    """3 -> 6, a block h + drop(tanh(W h + b)) (the mask before the skip's sum), -> 3."""

    def __init__(self):
        super().__init__()
        self.inp, self.lin, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.drop_in, self.drop_block = nn.Dropout(0.3), nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop_in(torch.tanh(self.inp(x)))
        h = h + self.drop_block(torch.tanh(self.lin(h)))
        return self.out(h)


class HiddenConcatDropout(nn.Module):
    """f(x, t): t concatenated into a hidden Linear (a per-sample bias), Dropout after both hidden layers."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 6), nn.Linear(7, 5), nn.Linear(5, 3)
        self.d1, self.d2 = nn.Dropout(0.3), nn.Dropout(0.4)

    def forward(self, x, t):
        h = self.d1(torch.tanh(self.l1(x)))
        h = self.d2(torch.nn.functional.softplus(self.l2(torch.cat([h, t], 1))))
        return self.l3(h)


class SquashDropout(nn.Module):
    """f(x, t) of two ConcatSquash layers (a per-sample gate and bias each), Dropout between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.drop = ConcatSquashLinear(3, 6), ConcatSquashLinear(6, 3), nn.Dropout(0.3)

    def forward(self, x, t):
        return self.second(t, self.drop(torch.tanh(self.first(t, x))))


def models():
    yield "sequential", nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 5), nn.Softplus(),
                                      nn.Dropout(0.5), nn.Linear(5, 3)), False
    yield "masked-output", nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Dropout(0.4)), False
    yield "residual", ResidualDropout(), False
    yield "hidden-concat", HiddenConcatDropout(), True
    yield "concatsquash", SquashDropout(), True


MODELS = list(models())
MODEL_IDS = [name for name, _, _ in MODELS]


def model_inputs(model, conditioned, batch=6, seed=0):
    torch.manual_seed(seed)
    model = model.double().train()
    x = torch.randn(batch, 3, dtype=DT, requires_grad=True)
    cond = (torch.rand(batch, 1, dtype=DT, requires_grad=True),) if conditioned else ()
    return model, x, cond


def masked_model(model, x, cond, seed):
    """(f, masks): the model as a function of one sample, its masks and conditioning inputs, each Dropout
    (in the order the model calls them, one per layer here) replaced by the mask the front-end draws
    under `seed` (that they are the model's own draw: test_y_equals_model_under_the_same_seed)."""
    torch.manual_seed(seed)
    spec = lower(model, x, *cond, supports=FORWARD_CARRY).spec
    masks = [m for m in spec.masks if m is not None]

    def f(xi, mi, *ci):
        queue = list(mi)
        handles = [m.register_forward_hook(lambda module, inputs, output: inputs[0] * queue.pop(0))
                   for m in model.modules() if isinstance(m, nn.Dropout)]
        try:
            return model(xi[None], *[c[None] for c in ci])[0]
        finally:
            for h in handles:
                h.remove()
    return f, masks


def model_reference(model, x, cond, seed, what):
    """what(x_b -> f(x_b, masks_b, cond_b)) per sample, the model in eval() (its Dropouts replaced by the masks)."""
    f, masks = masked_model(model, x, cond, seed)
    model.eval()
    try:
        return vmap(lambda xi, mi, *ci: what(lambda xi: f(xi, mi, *ci))(xi))(x, masks, *cond)
    finally:
        model.train()


def on_engine(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the engine runs it
        return call()


@pytest.mark.parametrize("name, model, conditioned", MODELS, ids=MODEL_IDS)
def test_y_equals_model_under_the_same_seed(name, model, conditioned):
    model, x, cond = model_inputs(model, conditioned)
    torch.manual_seed(7)
    want = model(x, *cond)
    for quantity in (jacext.laplacian, jacext.divergence, jacext.jacobian_diagonal,
                     lambda m, x, cond: jacext.laplacian(m, x, True, cond=cond, wrt=[1])):
        torch.manual_seed(7)
        torch.testing.assert_close(on_engine(lambda: quantity(model, x, cond=cond))[0], want, **TOL)
    torch.manual_seed(7)
    assert any(m is not None for m in lower(model, x, *cond, supports=FORWARD_CARRY).spec.masks)


@pytest.mark.parametrize("name, model, conditioned", MODELS, ids=MODEL_IDS)
def test_laplacian_of_the_masked_model(name, model, conditioned):
    model, x, cond = model_inputs(model, conditioned)
    inputs = [x, *cond, *model.parameters()]
    y_ref = model_reference(model, x, cond, 3, lambda g: g)
    jac = model_reference(model, x, cond, 3, jacrev)
    hess = model_reference(model, x, cond, 3, hessian)
    lap = hess.diagonal(dim1=2, dim2=3).sum(2)
    torch.manual_seed(3)
    assert_values_and_gradients(on_engine(lambda: jacext.laplacian(model, x, cond=cond)), (y_ref, lap), inputs)
    torch.manual_seed(3)
    ours = on_engine(lambda: jacext.laplacian(model, x, return_gradient=True, cond=cond, wrt=[2, 0]))
    assert_values_and_gradients(ours, (y_ref, jac, hess[:, :, 2, 2] + hess[:, :, 0, 0]), inputs)


@pytest.mark.parametrize("name, model, conditioned", MODELS, ids=MODEL_IDS)
def test_divergence_and_diagonal_of_the_masked_model(name, model, conditioned):
    model, x, cond = model_inputs(model, conditioned)
    inputs = [x, *cond, *model.parameters()]
    y_ref = model_reference(model, x, cond, 4, lambda g: g)
    jac = model_reference(model, x, cond, 4, jacrev)
    diag = jac.diagonal(dim1=1, dim2=2)
    for method in ("auto", "forward"):
        torch.manual_seed(4)
        ours = on_engine(lambda: jacext.divergence(model, x, method, cond=cond))
        assert_values_and_gradients(ours, (y_ref, diag.sum(1)), inputs)
        torch.manual_seed(4)
        ours = on_engine(lambda: jacext.jacobian_diagonal(model, x, method, cond=cond))
        assert_values_and_gradients(ours, (y_ref, diag), inputs)
    torch.manual_seed(4)
    ours = on_engine(lambda: jacext.jacobian_diagonal(model, x, cond=cond, wrt=[2, 0, 1]))
    assert_values_and_gradients(ours, (y_ref, jac[:, [0, 1, 2], [2, 0, 1]]), inputs)
    # Hutchinson: the masks from torch's generator, the projections from the caller's (the same draws here)
    v = random_projections(x.shape[0], 4, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.manual_seed(4)
    ours = on_engine(lambda: jacext.divergence(model, x, "hutchinson", n_proj=4, cond=cond,
                                               generator=torch.Generator().manual_seed(0)))
    assert_values_and_gradients(ours, (y_ref, torch.einsum("bki,bij,bkj->b", v, jac, v) / 4), inputs)


def test_combinations_run_on_the_engine_and_lower_names_them_elsewhere():
    """FORWARD_CARRY names Dropout with skips and with conditioning; FACTORS (no combination) refuses them,
    naming the Dropout or the conditioning node."""
    model, x, _ = model_inputs(ResidualDropout(), False)
    with pytest.raises(NotLowerable, match=r"drop_in \(Dropout\) .* Dropout in train\(\) in a model with residual"):
        lower(model, x, supports=FACTORS)
    model, x, cond = model_inputs(SquashDropout(), True)
    with pytest.raises(NotLowerable, match="Dropout in train\\(\\) in a model conditioned inside"):
        lower(model, x, *cond, supports=FACTORS)


@pytest.mark.parametrize("name, model, conditioned", MODELS, ids=MODEL_IDS)
def test_explain_names_the_masks_and_draws_none(name, model, conditioned):
    model, x, cond = model_inputs(model, conditioned)
    torch.manual_seed(1)
    for quantity in ("laplacian", "divergence", "jacobian_diagonal"):
        text = repr(jacext.explain(model, x, quantity=quantity, cond=cond))
        assert "dropout masks, drawn per call" in text and "(Dropout, p=" in text
        assert "scales every row" in text
        if quantity != "laplacian":
            assert "closed forms" in text and "runs forward columns" in text
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.testing.assert_close(after, torch.rand(3))  # explain drew nothing from torch's generator


def test_vmap_refuses_the_masks():
    x, weights, biases, masks, _, _, codes, params = random_net([3, 5, 3], ["tanh", "identity"], (0,))
    one = [masks[0][:1], None]  # a batch of one inside vmap
    for op in (ops.mlp_laplacian, ops.mlp_jacobian_diagonal):
        with pytest.raises(NotImplementedError, match="dropout masks are not supported under torch.vmap"):
            vmap(lambda xi: op(xi[None], weights, biases, codes, params, masks=one)[1])(x.detach())
