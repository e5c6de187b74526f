"""Conditioning inside the network on the Jacobian ops (csrc/mlp_jacobian.h): a per-sample bias s_i and
a per-sample pre-activation gate g_i per layer, z = g * (h W^T) + b + s, so that the layer's factor of J
is diag(m * g * act'(z)) W. The ops' values and gradients (w.r.t. x, weights, biases, the per-sample
biases and the gates) in float64 against torch.func for every strategy, with residual skips and dropout
masks, gradcheck and gradgradcheck, the refusal of the forms that need a linear output; and users'
conditioned models (t concatenated into a hidden Linear, FFJORD's ConcatSquash) through the penalty
(every method), the Jacobians at layers and the Gram, against torch.func."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import jacext
from jacext import ops
from jacext.activations import IDENTITY
from jacext.functional import Linearization
from jacext.frontend import NotLowerable, lower
from jacext.layouts import FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM
from jacext.planner import resolve_strategy

from helpers import factored_mlp
from test_conditioning_inside import ConcatSquashLinear, MODELS, field_reference, model_and_inputs, random_net

TOL = dict(rtol=1e-9, atol=1e-10)
OPS = torch.ops.jacext

# (widths, activations, layers with a per-sample bias, layers with a gate, residual or None)
NETS = [
    ([3, 5, 4, 3], ["tanh", "softplus", "identity"], [1], [1], None),
    ([3, 5, 3], ["tanh", "tanh"], [0, 1], [1], None),                       # ConcatSquash's: both at the top
    ([2, 6, 6, 2], ["silu", "identity", "identity"], [1, 2], [0, 1, 2], None),  # gated identity layers: d = g
    ([4, 3, 5, 2], ["relu", "sigmoid", "identity"], [2], [0], None),         # a gated piecewise-linear layer
    ([3, 4, 4, 4, 3], ["tanh", "softplus", "tanh", "identity"], [1, 2], [1, 3], [-1, 1, 1, 0]),  # with skips
]
IDS = [f"{w}-s{s}-g{g}" + ("-skips" if r else "") for w, _, s, g, r in NETS]


def dims(ts):
    return [0 if t is not None else None for t in ts]


def jacobian_reference(f, x, shifts, gates, masks):
    """(y, J) per sample by torch.func."""
    y = vmap(f, in_dims=(0, dims(shifts), dims(gates), dims(masks)))(x, shifts, gates, masks)
    jac = vmap(lambda x, s, g, m: jacrev(lambda x: f(x, s, g, m))(x),
               in_dims=(0, dims(shifts), dims(gates), dims(masks)))(x, shifts, gates, masks)
    return y, jac


def leaves(*tensors):
    return [t.detach().requires_grad_() if t is not None else None for t in tensors]


def present(ts):
    return [t for t in ts if t is not None]


def op_list(ts, like):
    """The ops' form of a per-layer list: an empty tensor for none (None for no entry at all)."""
    return None if all(t is None for t in ts) else [like.new_empty(0) if t is None else t for t in ts]


def masks_for(widths, layers, batch=5, p=0.4, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, n, generator=g, dtype=torch.float64) > p).double() / (1 - p) if i in layers else None
            for i, n in enumerate(widths[1:])]


def setup(widths, codes, shifted, gated, residual, masked=()):
    x, weights, biases, shifts, gates, codes, params = random_net(widths, codes, shifted, gated)
    x, *weights = leaves(x, *weights)
    biases, shifts, gates = leaves(*biases), leaves(*shifts), leaves(*gates)
    masks = masks_for(widths, masked)
    f = factored_mlp(weights, biases, codes, params, residual)
    return x, weights, biases, shifts, gates, masks, codes, params, f


def op_args(x, weights, biases, codes, params):
    return x, weights, [x.new_empty(0) if b is None else b for b in biases], codes, params


def strategies_for(widths, codes, gated, residual, masked):
    """The frobenius op's strategies that apply: 0 and 1 always; 2 without skips; 3 and 4 for a linear
    output layer without a gate or mask (3: one hidden layer), without skips."""
    out = [REVERSE, FORWARD]
    if residual is None:
        out.append(REVERSE_GRAM)
        last = len(widths) - 2
        if codes[-1] == IDENTITY and last not in gated and last not in masked:
            out.append(FORWARD_GRAM if len(widths) > 3 else GRAM1)
    return out


def check_gradients(got_outputs, want_outputs, inputs):
    weights = [torch.randn_like(o) for o in want_outputs]
    # (a per-sample bias of a layer whose d is constant does not reach J: zeros)
    got = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, got_outputs)), inputs,
                              materialize_grads=True)
    want = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, want_outputs)), inputs, retain_graph=True,
                               materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


# ---- the ops ------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [(), (0,)], ids=["", "masked"])
@pytest.mark.parametrize("widths, codes, shifted, gated, residual", NETS, ids=IDS)
def test_frobenius_op_every_strategy(widths, codes, shifted, gated, residual, masked):
    x, weights, biases, shifts, gates, masks, codes, params, f = setup(widths, codes, shifted, gated, residual, masked)
    y_ref, jac = jacobian_reference(f, x, shifts, gates, masks)
    sq_ref = jac.square().sum((1, 2))
    inputs = [x, *weights, *present(biases), *present(shifts), *present(gates)]
    for strategy in strategies_for(widths, codes, gated, residual, masked):
        for tile in (0, 2):
            y, sq, _ = OPS.mlp_jacobian_frobenius(*op_args(x, weights, biases, codes, params), strategy, None,
                                                  op_list(masks, x), op_list(shifts, x), op_list(gates, x), tile=tile,
                                                  residual=residual)
            torch.testing.assert_close(y, y_ref, **TOL)
            torch.testing.assert_close(sq, sq_ref, **TOL)
            check_gradients((y, sq), (y_ref, sq_ref), inputs)


@pytest.mark.parametrize("widths, codes, shifted, gated, residual", NETS, ids=IDS)
def test_hutchinson_terms_with_fixed_projections(widths, codes, shifted, gated, residual):
    x, weights, biases, shifts, gates, masks, codes, params, f = setup(widths, codes, shifted, gated, residual, (0,))
    v = torch.randn(x.shape[0], 3, widths[-1], dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    y_ref, jac = jacobian_reference(f, x, shifts, gates, masks)
    terms_ref = (v @ jac).square().sum(2)
    _, terms = ops.mlp_jacobian_frobenius(x, weights, biases, codes, params, method="hutchinson", projections=v,
                                          masks=masks, residual=residual, sample_biases=shifts, gates=gates)
    torch.testing.assert_close(terms, terms_ref, **TOL)
    check_gradients((terms,), (terms_ref,), [x, *weights, *present(shifts), *present(gates)])


@pytest.mark.parametrize("widths, codes, shifted, gated, residual", NETS, ids=IDS)
def test_jacobian_op_at_every_layer_and_the_grams(widths, codes, shifted, gated, residual):
    x, weights, biases, shifts, gates, masks, codes, params, f = setup(widths, codes, shifted, gated, residual, (0,))
    factors = dict(masks=masks, residual=residual, sample_biases=shifts, gates=gates)
    inputs = [x, *weights, *present(biases), *present(shifts), *present(gates)]
    y_ref, jac_ref = jacobian_reference(f, x, shifts, gates, masks)
    for method in ("reverse", "forward"):
        y, jac = ops.mlp_jacobian(x, weights, biases, codes, params, method=method, **factors)
        torch.testing.assert_close(jac, jac_ref, **TOL)
        check_gradients((y, jac), (y_ref, jac_ref), inputs)
    # hidden layers: dy/dh_l of the net above l (its own biases and gates), h_l the net's
    L = len(weights)
    layers = list(range(L))
    _, jacs = ops.mlp_jacobians(x, weights, biases, codes, params, layers=layers, **factors)
    _, grams = ops.mlp_jacobian_grams(x, weights, biases, codes, params, layers=layers, **factors)
    got, want = [], []
    for l in layers:
        top = factored_mlp(weights[l:], biases[l:], codes[l:], params[2 * l:],
                        None if residual is None else [j - l if j >= l else -1 for j in residual[l:]])
        h = x
        if l > 0:
            below = factored_mlp(weights[:l], biases[:l], codes[:l], params[:2 * l],
                              None if residual is None else residual[:l])
            h = vmap(below, in_dims=(0, dims(shifts[:l]), dims(gates[:l]), dims(masks[:l])))(
                x, shifts[:l], gates[:l], masks[:l])
        if residual is not None and any(j < l <= i for i, j in enumerate(residual) if j >= 0):
            continue  # a skip across h_l: J at the node h_l is not the sub-net's (test_residual_jacobian's)
        _, jac_l = jacobian_reference(top, h, shifts[l:], gates[l:], masks[l:])
        got += [jacs[l], grams[l]]
        want += [jac_l, jac_l @ jac_l.transpose(1, 2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    check_gradients(got, want, inputs)
    if residual is None:  # J J^T at the input by the Gram epilogue (strategy 2)
        _, gram, _ = OPS.mlp_jacobian(*op_args(x, weights, biases, codes, params), 0, REVERSE_GRAM, op_list(masks, x),
                                      op_list(shifts, x), op_list(gates, x), gram=True)
        gram_ref = jac_ref @ jac_ref.transpose(1, 2)
        torch.testing.assert_close(gram, gram_ref, **TOL)
        check_gradients((gram,), (gram_ref,), inputs)


def _gradcheck_function(widths, codes, shifted, gated, residual, op):
    x, weights, biases, shifts, gates, masks, codes, params, _ = setup(widths, codes, shifted, gated, residual, (0,))
    L = len(weights)
    s_at, g_at = [i for i in range(L) if shifts[i] is not None], [i for i in range(L) if gates[i] is not None]

    def fn(x, *flat):
        ws = list(flat[:L])
        s, g = [x.new_empty(0)] * L, [x.new_empty(0)] * L
        for i, t in zip(s_at, flat[L:L + len(s_at)]):
            s[i] = t
        for i, t in zip(g_at, flat[L + len(s_at):]):
            g[i] = t
        args = (x, ws, [x.new_empty(0) if b is None else b for b in biases], codes, params)
        if op == "frobenius":
            return OPS.mlp_jacobian_frobenius(*args, REVERSE, None, op_list(masks, x), s, g, residual=residual)[:2]
        return OPS.mlp_jacobian(*args, 1, FORWARD if residual is None else REVERSE, op_list(masks, x), s, g,
                                residual=residual)[:2]

    return fn, (x, *weights, *present(shifts), *present(gates))


@pytest.mark.parametrize("op", ["frobenius", "jacobian"])
@pytest.mark.parametrize("widths, codes, shifted, gated, residual", [NETS[0], NETS[2], NETS[4]],
                         ids=[IDS[0], IDS[2], IDS[4]])
def test_gradcheck_and_gradgradcheck(widths, codes, shifted, gated, residual, op):
    fn, inputs = _gradcheck_function(widths, codes, shifted, gated, residual, op)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_a_gate_on_the_output_refuses_the_linear_output_forms():
    widths, codes = [3, 6, 4], ["tanh", "identity"]
    x, weights, biases, shifts, gates, masks, codes, params, f = setup(widths, codes, [1], [1], None)
    for strategy in (GRAM1, FORWARD_GRAM):
        with pytest.raises(RuntimeError, match="gate on the last layer"):
            OPS.mlp_jacobian_frobenius(*op_args(x, weights, biases, codes, params), strategy, None, None,
                                       op_list(shifts, x), op_list(gates, x))
    # the planner never picks them then: "gram" takes the reverse Gram epilogue or a split
    assert resolve_strategy("gram", widths, batch=5, output_linear=False) not in (GRAM1, FORWARD_GRAM)
    _, jac = jacobian_reference(f, x, shifts, gates, masks)
    for method in ("auto", "gram"):
        _, sq = ops.mlp_jacobian_frobenius(x, weights, biases, codes, params, method=method, sample_biases=shifts,
                                           gates=gates)
        torch.testing.assert_close(sq, jac.square().sum((1, 2)), **TOL)


def test_bad_conditioning_is_refused():
    x, weights, biases, shifts, gates, masks, codes, params, _ = setup([3, 5, 4, 3], ["tanh", "tanh", "identity"],
                                                                       [1], [1], None)
    args = op_args(x, weights, biases, codes, params)
    with pytest.raises(RuntimeError, match=r"gates\[1\] must have shape"):
        OPS.mlp_jacobian_frobenius(*args, REVERSE, None, None, None, [x.new_empty(0), gates[1][:, :2], x.new_empty(0)])
    with pytest.raises(RuntimeError, match="expected no sample_biases or one per layer"):
        OPS.mlp_jacobian(*args, 0, REVERSE, None, [shifts[1]])
    with pytest.raises(RuntimeError, match="must match x's dtype"):
        OPS.mlp_jacobian(*args, 0, REVERSE, None, None, [x.new_empty(0), gates[1].float(), x.new_empty(0)])


def test_vmap_refuses_them():
    x, weights, biases, shifts, gates, masks, codes, params, _ = setup([3, 5, 4, 3], ["tanh", "tanh", "identity"],
                                                                       [1], [1], None)
    args = op_args(x.detach(), [w.detach() for w in weights], biases, codes, params)
    g = [x.new_empty(0), gates[1].detach(), x.new_empty(0)]
    with pytest.raises(NotImplementedError, match="per-sample biases and gates"):
        vmap(lambda xb: OPS.mlp_jacobian_frobenius(xb, *args[1:], REVERSE, None, None, None, g)[1])(args[0][None])


def test_linearization_applies_them():
    widths, codes, shifted, gated, residual = NETS[4]
    x, weights, biases, shifts, gates, masks, codes, params, f = setup(widths, codes, shifted, gated, residual, (1,))
    spec = jacext.frontend.MLPSpec(weights, biases, codes, params, masks=masks, residual=residual,
                                   sample_biases=shifts, gates=gates)
    _, jac = jacobian_reference(f, x, shifts, gates, masks)
    lin = Linearization(spec, x)
    t = torch.randn(x.shape[0], 2, widths[0], dtype=x.dtype)
    u = torch.randn(x.shape[0], 2, widths[-1], dtype=x.dtype)
    torch.testing.assert_close(lin.forward_product(t), t @ jac.transpose(1, 2), **TOL)
    torch.testing.assert_close(lin.reverse_product(u), u @ jac, **TOL)


# ---- users' conditioned models ------------------------------------------------------------------

class ResidualSquashField(nn.Module):
    """ConcatSquash layers with residual blocks h + tanh(squash(t, h)) between the first and the last."""

    def __init__(self, d, hidden=6):
        super().__init__()
        self.first, self.mid, self.last = (ConcatSquashLinear(d, hidden), ConcatSquashLinear(hidden, hidden),
                                           ConcatSquashLinear(hidden, d))

    def forward(self, x, t):
        h = torch.tanh(self.first(t, x))
        h = h + torch.tanh(self.mid(t, h))
        return self.last(t, h)


class DroppedHiddenConcat(nn.Module):
    """t concatenated into a hidden Linear, with Dropout after the first activation."""

    def __init__(self, d, hidden=7):
        super().__init__()
        self.first, self.mid, self.last = nn.Linear(d, hidden), nn.Linear(hidden + 1, hidden), nn.Linear(hidden, d)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, t):
        h = self.drop(torch.tanh(self.first(x)))
        h = torch.tanh(self.mid(torch.cat([h, t], 1)))
        return self.last(h)


USERS = dict(MODELS, **{"residual-squash": lambda d: ResidualSquashField(d),
                        "dropout-hidden-concat": lambda d: DroppedHiddenConcat(d)})


def users_model(name, d=3, batch=5, seed=0):
    torch.manual_seed(seed)
    model = USERS[name](d).double()
    x = torch.randn(batch, d, dtype=torch.float64, requires_grad=True)
    t = torch.rand(batch, 1, dtype=torch.float64, requires_grad=True)
    return model, x, t


def engine(fn):
    """fn() on the engine: a warning would name the generic path."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def seeded(fn, seed=5):
    """fn() with the model's Dropout masks drawn from one seed (every call the same masks)."""
    torch.manual_seed(seed)
    return fn()


PENALTY_METHODS = ["auto", "reverse", "forward", "gram", "hutchinson", "hutch++"]


@pytest.mark.parametrize("method", PENALTY_METHODS)
@pytest.mark.parametrize("name", list(USERS))
def test_penalty_of_users_models_every_method(name, method):
    model, x, t = users_model(name)
    if method == "gram" and name == "residual-squash":
        with pytest.raises(ValueError):
            jacext.jacobian_frobenius(model, x, method="gram", cond=t)
        return
    params = [x, t, *model.parameters()]
    m = 3
    # exact estimates: orthogonal rows at n_proj = m, Hutch++ at n_proj = 3 m (its sketch spans J's rows)
    options = {"hutchinson": dict(n_proj=m, orthogonal=True, generator=torch.Generator().manual_seed(2)),
               "hutch++": dict(n_proj=3 * m, generator=torch.Generator().manual_seed(2))}.get(method, {})
    y, sq = engine(lambda: seeded(lambda: jacext.jacobian_frobenius(model, x, method=method, cond=t, **options)))
    y_ref, sq_ref = seeded(lambda: jacext.jacobian_frobenius(model, x, method="autograd", cond=t))
    if "dropout" not in name:  # and against torch.func, independently of the generic path
        jac = field_reference(model, x, t, jacrev)
        torch.testing.assert_close(sq_ref, jac.square().sum((1, 2)), **TOL)
        torch.testing.assert_close(y, model(x, t), **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(sq, sq_ref, **TOL)
    w = torch.randn_like(y)
    got = torch.autograd.grad((w * y).sum() + sq.sum(), params)
    want = torch.autograd.grad((w * y_ref).sum() + sq_ref.sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", list(USERS))
def test_jacobians_and_grams_of_users_models(name):
    model, x, t = users_model(name)
    params = [x, t, *model.parameters()]
    jac = engine(lambda: seeded(lambda: jacext.jacobian(model, x, cond=t)))
    gram = engine(lambda: seeded(lambda: jacext.jacobian_gram(model, x, cond=t)))
    jac_ref = seeded(lambda: jacext.jacobian(model, x, cond=t, method="autograd"))
    if "dropout" not in name:
        torch.testing.assert_close(jac_ref, field_reference(model, x, t, jacrev), **TOL)
    torch.testing.assert_close(jac, jac_ref, **TOL)
    torch.testing.assert_close(gram, jac_ref @ jac_ref.transpose(1, 2), **TOL)
    w = torch.randn_like(jac)
    got = torch.autograd.grad((w * jac).sum() + gram.sum(), params, materialize_grads=True)
    want = torch.autograd.grad((w * jac_ref).sum() + (jac_ref @ jac_ref.transpose(1, 2)).sum(), params,
                               materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    # the Jacobians at every layer: the engine's lowered net, against its reference with the same factors
    spec = seeded(lambda: lower(model, x, t, supports=jacext.functional.JACOBIAN_FAMILY)).spec
    layers = list(range(len(spec.weights)))
    jacs = engine(lambda: seeded(lambda: jacext.jacobian(model, x, layers, cond=t)))
    torch.testing.assert_close(jacs[0], jac_ref, **TOL)
    none = [None] * len(spec.weights)
    for l in layers[1:]:
        if spec.residual is not None and any(j < l <= i for i, j in enumerate(spec.residual) if j >= 0):
            continue
        top = factored_mlp(spec.weights[l:], spec.biases[l:], spec.activations[l:], spec.act_params[2 * l:],
                        None if spec.residual is None else [j - l if j >= l else -1 for j in spec.residual[l:]])
        below = factored_mlp(spec.weights[:l], spec.biases[:l], spec.activations[:l], spec.act_params[:2 * l],
                          None if spec.residual is None else spec.residual[:l])
        lists = [spec.sample_biases or none, spec.gates or none, spec.masks or none]
        h = vmap(below, in_dims=(0, *[dims(ts[:l]) for ts in lists]))(x, *[ts[:l] for ts in lists])
        _, want_l = jacobian_reference(top, h, *[ts[l:] for ts in lists])
        torch.testing.assert_close(jacs[l], want_l, **TOL)


def test_dropout_with_conditioning_draws_the_models_masks():
    """y == model(x, t) under the same seed, with Dropout in train() and t inside the network."""
    model, x, t = users_model("dropout-hidden-concat")
    y, _ = seeded(lambda: engine(lambda: jacext.jacobian_frobenius(model, x, cond=t)))
    torch.testing.assert_close(y, seeded(lambda: model(x, t)), **TOL)


def test_explain_says_what_the_gates_do():
    model, x, t = users_model("squash-2")
    text = repr(jacext.explain(model, x, cond=t))
    assert "gates at layers [0, 1]" in text and "per-sample diagonal of J" in text
    assert "linear output" in text  # the gate on the output layer rules out strategies 3 and 4


def test_explain_plans_the_spectral_norm_of_a_conditioned_model():
    """The spectral norm takes the conditioning inside the network at the input (the plan lowers
    with cond, without consuming the caller's random numbers); at a hidden layer its own forward
    does not, and the plan says so (NotLowerable, as the call's generic path)."""
    model, x, t = users_model("squash-2")
    state = torch.get_rng_state()
    text = repr(jacext.explain(model, x, quantity="spectral_norm", cond=t))
    assert torch.equal(state, torch.get_rng_state())
    assert "spectral norm of dy/dh_0" in text and "<- chosen" in text
    _, s = engine(lambda: jacext.jacobian_spectral_norm(model, x, cond=t, method="exact"))
    want = torch.linalg.matrix_norm(field_reference(model, x, t, jacrev), ord=2)
    torch.testing.assert_close(s, want, **TOL)
    with pytest.raises(NotLowerable, match="per-sample"):
        jacext.explain(model, x, quantity="spectral_norm", cond=t, layer=1)


@pytest.mark.parametrize("name", ["hidden-concat", "squash-3", "residual-squash"])
def test_double_backward_of_the_penalty(name):
    """The gradient of a loss on the penalty's input gradient (a double backward through the
    composites) w.r.t. t and every parameter, against the generic path's."""
    model, x, t = users_model(name)
    params = [t, *model.parameters()]

    def second_order(method):
        _, sq = jacext.jacobian_frobenius(model, x, method=method, cond=t)
        gx, = torch.autograd.grad(sq.sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), params, materialize_grads=True)

    for a, b in zip(engine(lambda: second_order("auto")), second_order("autograd")):
        torch.testing.assert_close(a, b, **TOL)
