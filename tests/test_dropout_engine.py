"""Dropout in train() on the fused engine: a mask m after a layer's activation is one more per-sample
diagonal factor (h = m * act(y), D = diag(m * act'(y))). The ops take the masks (every strategy of the
Jacobian family, values, gradients, double backward) and are checked in float64 against torch.func on
the masked network written as a plain function; the front-end draws the masks as the model does, so
that y == model(x) under the same seed; quantities whose engine path carries no masks run the
generic path instead (with a warning naming the Dropout), never ignoring them."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

import jacext
from jacext import activations as act
from jacext._route import _warned
from jacext.frontend import FACTORS, NotLowerable, lower
from jacext.layouts import FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM

OPS = torch.ops.jacext
DT = torch.float64


def net(widths, names, seed=0, batch=5, masked=None, p=0.4):
    """(x, weights, biases (None for none), codes, params, masks): float64, parameters and x requiring
    grad; masks (0 or 1/(1-p)) on the layers `masked` names (default: every hidden layer)."""
    g = torch.Generator().manual_seed(seed)
    depth = len(widths) - 1
    weights = [(torch.randn(o, i, generator=g, dtype=DT) * 0.8).requires_grad_() for i, o in zip(widths, widths[1:])]
    biases = [(torch.randn(o, generator=g, dtype=DT) * 0.3).requires_grad_() if i != 1 else None
              for i, o in enumerate(widths[1:])]
    codes = [act.NAMES[n] for n in names]
    params = [p for c in codes for p in ((1.5, 2.0) if c == act.SOFTPLUS else (0.0, 0.0))]
    masked = range(depth - 1) if masked is None else masked
    masks = [(torch.rand(batch, widths[i + 1], generator=g, dtype=DT) > p).to(DT) / (1 - p) if i in masked else None
             for i in range(depth)]
    x = torch.randn(batch, widths[0], generator=g, dtype=DT).requires_grad_()
    return x, weights, biases, codes, params, masks


def reference(x, weights, biases, codes, params, masks):
    """(y, J (B, m, n_0)) of the masked network by vmap(jacrev) of a plain per-sample function."""
    def one(xi, mi):
        h = xi
        for i, (w, b) in enumerate(zip(weights, biases)):
            y = w @ h + (0 if b is None else b)
            h = act.activation_value(y, codes[i], params[2 * i], params[2 * i + 1])
            if mi[i] is not None:
                h = mi[i] * h
        return h, h

    jac, y = vmap(jacrev(one, has_aux=True), in_dims=(0, [0 if m is not None else None for m in masks]))(x, masks)
    return y, jac


def op_biases(biases, like):
    return [like.new_empty(0) if b is None else b for b in biases]


def op_masks(masks, like):
    return [like.new_empty(0) if m is None else m for m in masks]


def _parameters(x, weights, biases):
    return [x, *weights, *[b for b in biases if b is not None]]


def _check_value_and_gradients(got, want, inputs):
    """Values equal, and the gradients of a random combination of the outputs w.r.t. every input."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(w.shape, generator=g, dtype=DT) for w in want]
    total_got = sum((o * c).sum() for o, c in zip(got, weights))
    total_want = sum((o * c).sum() for o, c in zip(want, weights))
    for a, b in zip(torch.autograd.grad(total_got, inputs), torch.autograd.grad(total_want, inputs)):
        torch.testing.assert_close(a, b)


DEEP = ((4, 6, 5, 3), ("tanh", "softplus", "sigmoid"))
LINEAR_OUT = ((4, 6, 3), ("tanh", "identity"))


@pytest.mark.parametrize("strategy, shape", [(REVERSE, DEEP), (FORWARD, DEEP), (REVERSE_GRAM, DEEP),
                                             (GRAM1, LINEAR_OUT), (FORWARD_GRAM, ((4, 6, 5, 3), ("tanh", "gelu", "identity")))])
@pytest.mark.parametrize("tile", [0, 2])
def test_frobenius_op_every_strategy(strategy, shape, tile):
    x, weights, biases, codes, params, masks = net(*shape)
    y, sq, _ = OPS.mlp_jacobian_frobenius(x, weights, op_biases(biases, x), codes, params, strategy, tile=tile,
                                          masks=op_masks(masks, x))
    y_ref, jac = reference(x, weights, biases, codes, params, masks)
    _check_value_and_gradients((y, sq), (y_ref, jac.square().sum((1, 2))), _parameters(x, weights, biases))


@pytest.mark.parametrize("strategy", [REVERSE, FORWARD])
@pytest.mark.parametrize("masked", [(0, 2), (1,), (0, 1, 2)])
def test_jacobian_op_with_masks_on_any_layer(strategy, masked):
    # a mask on the output layer and on an identity hidden layer (d = m) too
    x, weights, biases, codes, params, masks = net((3, 5, 4, 2), ("tanh", "identity", "sigmoid"), masked=masked)
    y, jac, _ = OPS.mlp_jacobian(x, weights, op_biases(biases, x), codes, params, 0, strategy, masks=op_masks(masks, x))
    _check_value_and_gradients((y, jac), reference(x, weights, biases, codes, params, masks),
                               _parameters(x, weights, biases))


def test_hidden_layer_jacobians_and_grams_with_masks():
    x, weights, biases, codes, params, masks = net(*DEEP)
    layers = [0, 1, 2]
    y, jacs = jacext.ops.mlp_jacobians(x, weights, biases, codes, params, layers=layers, masks=masks)
    _, grams = jacext.ops.mlp_jacobian_grams(x, weights, biases, codes, params, layers=layers, masks=masks)
    for l in layers:  # dy/dh_l of the masked net: the reference on the layers above l, h_l as input
        h = x
        for i in range(l):
            h = act.activation_value(F.linear(h, weights[i], biases[i]), codes[i], *params[2 * i:2 * i + 2]) * masks[i]
        _, want = reference(h, weights[l:], biases[l:], codes[l:], params[2 * l:], masks[l:])
        torch.testing.assert_close(jacs[l], want)
        torch.testing.assert_close(grams[l], want @ want.transpose(1, 2))


def test_gram_strategies_refuse_a_mask_on_the_output_layer():
    x, weights, biases, codes, params, masks = net(*LINEAR_OUT, masked=(1,))
    with pytest.raises(RuntimeError, match="linear output layer"):
        OPS.mlp_jacobian_frobenius(x, weights, op_biases(biases, x), codes, params, GRAM1, masks=op_masks(masks, x))
    # the planner does not offer them: method="gram" finds another Gram form, "auto" is exact
    want = reference(x, weights, biases, codes, params, masks)[1].square().sum((1, 2))
    for method in ("auto", "gram", "forward"):
        _, sq = jacext.ops.mlp_jacobian_frobenius(x, weights, biases, codes, params, method=method, masks=masks)
        torch.testing.assert_close(sq, want)


def test_masks_requiring_grad_are_refused():
    x, weights, biases, codes, params, masks = net(*DEEP)
    masks[0].requires_grad_()
    with pytest.raises(ValueError, match="masks are constants"):
        jacext.ops.mlp_jacobian_frobenius(x, weights, biases, codes, params, masks=masks)
    with pytest.raises((RuntimeError, ValueError), match="masks are constants"):
        OPS.mlp_jacobian_frobenius(x, weights, op_biases(biases, x), codes, params, REVERSE, masks=op_masks(masks, x))
    with pytest.raises((RuntimeError, ValueError), match="masks are constants"):
        OPS.mlp_jacobian(x, weights, op_biases(biases, x), codes, params, 0, REVERSE, masks=op_masks(masks, x))


def test_bad_mask_shapes_raise():
    x, weights, biases, codes, params, masks = net(*DEEP)
    args = (x.detach(), [w.detach() for w in weights], op_biases([None] * 3, x), codes, params, REVERSE)
    with pytest.raises(RuntimeError, match="mask 0 must have shape"):
        OPS.mlp_jacobian_frobenius(*args, masks=[masks[0][:, :2], x.new_empty(0), x.new_empty(0)])
    with pytest.raises(RuntimeError, match="one per layer"):
        OPS.mlp_jacobian_frobenius(*args, masks=[masks[0]])


@pytest.mark.parametrize("strategy, shape", [(REVERSE, DEEP), (FORWARD, DEEP), (REVERSE_GRAM, DEEP),
                                             (GRAM1, LINEAR_OUT)])
def test_gradcheck_and_gradgradcheck_with_masks(strategy, shape):
    x, weights, biases, codes, params, masks = net(*shape, batch=3)
    present = [i for i, b in enumerate(biases) if b is not None]

    def fn(x, *flat):
        bs = [x.new_empty(0)] * len(weights)
        for i, b in zip(present, flat[len(weights):]):
            bs[i] = b
        y, sq, _ = OPS.mlp_jacobian_frobenius(x, list(flat[:len(weights)]), bs, codes, params, strategy,
                                              masks=op_masks(masks, x))
        return y, sq

    inputs = (x, *weights, *[biases[i] for i in present])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_chunked_penalty_splits_the_masks():
    x, weights, biases, codes, params, masks = net(*DEEP, batch=9)
    want = reference(x, weights, biases, codes, params, masks)[1].square().sum((1, 2))
    _, sq = jacext.ops.mlp_jacobian_frobenius(x, weights, biases, codes, params, masks=masks, max_memory=1)
    torch.testing.assert_close(sq, want)
    (g,) = torch.autograd.grad(sq.sum(), weights[0])
    (g_ref,) = torch.autograd.grad(want.sum(), weights[0])
    torch.testing.assert_close(g, g_ref)


# ---- models: the front-end draws the masks as the model does ------------------------------------

class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = F.dropout(torch.tanh(self.l1(x)), 0.3, self.training)
        h = F.dropout(F.softplus(self.l2(h)), p=0.5, training=self.training)
        return self.l3(h)


def models():
    torch.manual_seed(0)
    yield "sequential", nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.2), nn.Linear(7, 6), nn.SiLU(),
                                      nn.Dropout(0.5), nn.Linear(6, 3)).double()
    yield "functional", FunctionalDropout().double()
    # after a Linear without activation, two in a row, and on the output
    yield "stacked", nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.3), nn.Dropout(0.1), nn.Linear(6, 6), nn.GELU(),
                                   nn.Linear(6, 4), nn.Dropout(0.25)).double()


MODELS = list(models())


@pytest.mark.parametrize("name, model", MODELS, ids=[n for n, _ in MODELS])
def test_y_equals_model_under_the_same_seed(name, model):
    model.train()
    x = torch.randn(6, 5, dtype=DT)
    torch.manual_seed(3)
    want = model(x)
    for quantity in (jacext.jacobian_frobenius, lambda m, x: (None, jacext.jacobian(m, x))):
        torch.manual_seed(3)
        got = quantity(model, x)[0]
        if got is not None:
            torch.testing.assert_close(got, want)
    assert not all(m is None for m in lower(model, x, supports=FACTORS).spec.masks)


def _masked_reference(model, x, seed):
    """(y, J) of the masked network by the plain-function reference, with the masks lower() draws
    under `seed` (that they are the model's own draw: test_y_equals_model_under_the_same_seed; the
    generic path, independent of them: test_penalty_equals_the_generic_path_under_the_same_seed)."""
    torch.manual_seed(seed)
    spec = lower(model, x, supports=FACTORS).spec
    return reference(x, spec.weights, spec.biases, spec.activations, spec.act_params, spec.masks)


@pytest.mark.parametrize("name, model", MODELS, ids=[n for n, _ in MODELS])
@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "gram"])
def test_penalty_on_dropout_model_every_method(name, model, method):
    model.train()
    x = torch.randn(6, 5, dtype=DT, requires_grad=True)
    y_ref, jac = _masked_reference(model, x, 11)
    torch.manual_seed(11)
    y, sq = jacext.jacobian_frobenius(model, x, method=method)
    params = [x, *model.parameters()]
    _check_value_and_gradients((y, sq), (y_ref, jac.square().sum((1, 2))), params)


@pytest.mark.parametrize("name, model", MODELS, ids=[n for n, _ in MODELS])
def test_penalty_equals_the_generic_path_under_the_same_seed(name, model):
    model.train()
    x = torch.randn(6, 5, dtype=DT, requires_grad=True)
    torch.manual_seed(5)
    y, sq = jacext.jacobian_frobenius(model, x)
    torch.manual_seed(5)
    y_gen, sq_gen = jacext.jacobian_frobenius(model, x, method="autograd")
    torch.testing.assert_close(y, y_gen)
    torch.testing.assert_close(sq, sq_gen)
    params = [x, *model.parameters()]
    ours = torch.autograd.grad(sq.sum(), params, materialize_grads=True)
    theirs = torch.autograd.grad(sq_gen.sum(), params, materialize_grads=True)  # the last bias: unused there
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_estimators_on_dropout_model(method):
    model = MODELS[0][1].train()
    x = torch.randn(6, 5, dtype=DT)
    y_ref, jac = _masked_reference(model, x, 2)
    torch.manual_seed(2)  # the masks, then the projections from their own generator
    n_proj = 9  # hutch++ is exact at n_proj >= 3 m; orthogonal Hutchinson at n_proj = m
    options = dict(orthogonal=True, n_proj=3) if method == "hutchinson" else dict(n_proj=n_proj)
    y, sq = jacext.jacobian_frobenius(model, x, method=method, generator=torch.Generator().manual_seed(0), **options)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(sq, jac.square().sum((1, 2)))


def test_jacobian_gram_and_wrt_columns_with_dropout():
    model = MODELS[0][1].train()
    x = torch.randn(6, 5, dtype=DT)
    _, jac = _masked_reference(model, x, 4)
    torch.manual_seed(4)
    torch.testing.assert_close(jacext.jacobian(model, x, wrt=[3, 1]), jac[:, :, [3, 1]])
    torch.manual_seed(4)
    torch.testing.assert_close(jacext.jacobian_gram(model, x), jac @ jac.transpose(1, 2))
    torch.manual_seed(4)
    torch.testing.assert_close(jacext.jacobian_frobenius(model, x, wrt=slice(0, 2))[1],
                               jac[:, :, :2].square().sum((1, 2)))


def test_divergence_diagonal_and_laplacian_run_the_forward_carry_with_the_masks():
    """(tests/test_dropout_carry.py checks them in depth, with skips and conditioning.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4)).double().train()
    x = torch.randn(5, 4, dtype=DT)
    _, jac = _masked_reference(model, x, 8)
    diag = jac.diagonal(dim1=1, dim2=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the engine: no fallback warning
        for method in ("auto", "forward"):
            torch.manual_seed(8)
            torch.testing.assert_close(jacext.divergence(model, x, method)[1], diag.sum(1))
            torch.manual_seed(8)
            torch.testing.assert_close(jacext.jacobian_diagonal(model, x, method)[1], diag)
        torch.manual_seed(8)
        y, lap = jacext.laplacian(model, x)
    torch.manual_seed(8)
    y_gen, lap_gen = jacext.laplacian(model, x, method="autograd")
    torch.testing.assert_close(y, y_gen)
    torch.testing.assert_close(lap, lap_gen)
    with pytest.raises(ValueError, match="dropout mask"):  # the closed form's matrix is the same for every sample
        jacext.jacobian_diagonal(model, x, method="gram")


def test_parse_model_names_the_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2)).double().train()
    x = torch.randn(5, 3, dtype=DT)
    # (every quantity with a generic path takes the masks on the engine: the Laplacian, divergence and
    # diagonal above and tests/test_dropout_carry.py, the spectral norm and the margin in
    # tests/test_factors_spectral_margin.py)
    with pytest.raises(NotLowerable, match="Dropout"):
        jacext.parse_model(model)
    model.eval()  # identity: lowers without masks
    assert lower(model, x).spec.masks is None


def test_dropout_that_is_not_a_layer_factor_stays_off_the_engine():
    on_input = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).train()
    with pytest.raises(NotLowerable, match="on the input"):
        lower(on_input)
    before_activation = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Tanh(), nn.Linear(4, 2)).train()
    with pytest.raises(NotLowerable, match="activation after a Dropout"):
        lower(before_activation)
    assert lower(on_input.eval()).spec.masks is None


def test_dropout_one_zeroes_and_zero_is_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(1.0), nn.Linear(4, 2)).double().train()
    x = torch.randn(5, 3, dtype=DT)
    y, sq = jacext.jacobian_frobenius(model, x)
    torch.testing.assert_close(y, model[3].bias.expand(5, 2))
    torch.testing.assert_close(sq, torch.zeros(5, dtype=DT))
    model[2].p = 0.0
    assert lower(model, x).spec.masks is None


def test_explain_mentions_the_masks():
    model = MODELS[0][1].train()
    text = repr(jacext.explain(model, torch.randn(4, 5, dtype=DT)))
    assert "dropout masks" in text and "p=0.2" in text and "p=0.5" in text
    assert "dropout" not in repr(jacext.explain(model.eval(), torch.randn(4, 5, dtype=DT)))


def test_opcheck_with_masks():
    x, weights, biases, codes, params, masks = net(*DEEP, batch=3)
    bs, ms = op_biases(biases, x), op_masks(masks, x)
    for strategy in (REVERSE, FORWARD, REVERSE_GRAM):
        torch.library.opcheck(OPS.mlp_jacobian_frobenius.default, (x, weights, bs, codes, params, strategy),
                              {"masks": ms}, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(OPS.mlp_jacobian.default, (x, weights, bs, codes, params, 0, FORWARD), {"masks": ms})


def test_masks_under_vmap_are_refused():
    x, weights, biases, codes, params, masks = net(*DEEP, batch=3)
    ws = [w.detach() for w in weights]
    ms = op_masks(masks, x)
    bs = op_biases([None] * 3, x)
    with pytest.raises(NotImplementedError, match="masks are not supported under torch.vmap"):
        torch.func.vmap(lambda xi: OPS.mlp_jacobian_frobenius(xi, ws, bs, codes, params, REVERSE, None, ms)[1])(
            x.detach().unsqueeze(1))
