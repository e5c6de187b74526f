"""Dropout in train() and residual skips in the spectral norm and the large-margin rows (issue 31), in
float64: the spectral norm (power iteration, exact, second_order, wrt, warm starts, hidden layers)
against torch.func (vmap(jacrev) of the network written as a plain function with the masks the call
drew: the same seed draws the same masks), the margin distances and loss (both engine paths,
layers at the input and at hidden block boundaries, top_k, dist_norm 1 / 2 / inf) against plain
autograd on the user's own module under the same seed (reference.large_margin_loss_ref, its
representations hooked by name); values and gradients w.r.t. x and every parameter; y == model(x)
under the same seed; the layers inside a residual block and the factors the paths do not take,
refused; the planner's margin costs and the plans."""
import math
import warnings

import pytest
import torch
from torch import nn

import jacext
from jacext._route import _warned
from jacext.frontend import FACTOR_NAMES, lower
from jacext.functional import JACOBIAN_FAMILY
from jacext.margin import MARGIN_FACTORS
from jacext.planner import margin_costs
from jacext.reference import large_margin_loss_ref, margin_classes_ref, margin_gradient_norms_ref, representations
from jacext.spectral import BELOW_LAYER
from test_residual import Block, TwoLayerBlock
from test_residual_jacobian import node_jacobian

TOL = dict(rtol=1e-9, atol=1e-10)


class DropBlock(nn.Module):
    """h + Dropout(tanh(W h + b)): a mask inside a residual block."""

    def __init__(self, n, p):
        super().__init__()
        self.lin, self.drop = nn.Linear(n, n), nn.Dropout(p)

    def forward(self, h):
        return h + self.drop(torch.tanh(self.lin(h)))


def build(name):
    """(model in float64 and train(), {engine layer: the submodule whose output is h_layer} for the
    block boundaries, [layers inside a block])."""
    torch.manual_seed(3)
    if name == "dropout":
        # h_2 narrower than the output: the exact path's J^T J
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3), nn.Softplus(),
                              nn.Dropout(0.2), nn.Linear(3, 4))
        points, inside = {1: "2", 2: "5"}, []
    elif name == "input-block":  # a skip leaves x; h_2 narrower than the output
        model = nn.Sequential(Block(5), nn.Linear(5, 3), nn.Softplus(), nn.Linear(3, 4))
        points, inside = {1: "0", 2: "2"}, []
    elif name == "middle-blocks":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), Block(6), TwoLayerBlock(6, 7), nn.Linear(6, 4))
        points, inside = {1: "1", 2: "2", 4: "3"}, [3]
    elif name == "output-block":  # the last block ends in the logits
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), TwoLayerBlock(4, 6))
        points, inside = {1: "1"}, [2]
    else:  # "dropout-residual": a mask before a block and one inside it
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.25), DropBlock(6, 0.4), nn.Linear(6, 6),
                              nn.Softplus(), nn.Linear(6, 4))
        points, inside = {1: "2", 2: "3", 3: "5"}, []
    return model.double().train(), points, inside


MODELS = ["dropout", "input-block", "middle-blocks", "output-block", "dropout-residual"]
def data(model, seed=1, batch=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (batch,), generator=g)
    return x, target


def on_engine(call):
    """call() with the generic path's warning (and the power iteration's) turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return call()


def seeded(call, seed=11):
    torch.manual_seed(seed)
    return call()


def random_grads(outputs, inputs, seed=7):
    """The gradients of a random combination of the outputs w.r.t. the inputs (zeros where unused)."""
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [torch.zeros_like(i) if gr is None else gr for gr, i in zip(grads, inputs)]


def assert_all_close(got, want, **tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **(tol or TOL))


def jacobian_ref(model, x, layer):
    """(y, J = dy/dh_layer) per sample by vmap(jacrev) of the network written as a plain function
    (test_residual_jacobian.node_jacobian) with the masks that a call under the same seed draws."""
    spec = seeded(lambda: lower(model, x, supports=frozenset(FACTOR_NAMES)).spec)
    return node_jacobian(spec, x, layer, spec.masks)


SPECTRAL_CASES = [(name, method, layer) for name in MODELS for method in ("exact", "power", "second_order")
                  for layer in [0] + sorted(build(name)[1])]


@pytest.mark.parametrize("name, method, layer", SPECTRAL_CASES)
def test_spectral_norm_values_and_gradients(name, method, layer):
    model, _, _ = build(name)
    x, _ = data(model)
    x.requires_grad_()
    options = dict(second_order=True) if method == "second_order" else dict(method=method, n_iter=5000, tol=1e-11)
    y, s = on_engine(lambda: seeded(lambda: jacext.jacobian_spectral_norm(model, x, layer, **options)))
    y_ref, jac = jacobian_ref(model, x, layer)
    s_ref = torch.linalg.matrix_norm(jac, 2)
    torch.testing.assert_close(y, seeded(lambda: model(x)), **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)
    inputs = [x, *model.parameters()]
    tol = dict(rtol=1e-7, atol=1e-9) if method == "power" else TOL  # u within tol of the top vector
    assert_all_close(random_grads([y, s], inputs), random_grads([y_ref, s_ref], inputs), **tol)


@pytest.mark.parametrize("name", MODELS)
def test_spectral_norm_second_derivative(name):
    """second_order=True: s is sqrt of the differentiable Gram's top eigenvalue, so its gradient's
    own derivative is that of ||J||_2."""
    model, _, _ = build(name)
    x, _ = data(model, seed=2)
    x.requires_grad_()
    _, s = on_engine(lambda: seeded(lambda: jacext.jacobian_spectral_norm(model, x, second_order=True)))
    s_ref = torch.linalg.matrix_norm(jacobian_ref(model, x, 0)[1], 2)
    (g,) = torch.autograd.grad(s.square().sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(s_ref.square().sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_ref, **TOL)
    params = list(model.parameters())
    assert_all_close(random_grads([g], params), random_grads([g_ref], params))


@pytest.mark.parametrize("name", MODELS)
def test_spectral_norm_over_chosen_features(name):
    model, _, _ = build(name)
    x, _ = data(model)
    x.requires_grad_()
    wrt = [4, 0, 2]
    y, s = on_engine(lambda: seeded(lambda: jacext.jacobian_spectral_norm(model, x, wrt=wrt)))
    y_ref, jac = jacobian_ref(model, x, 0)
    s_ref = torch.linalg.matrix_norm(jac[:, :, wrt], 2)
    torch.testing.assert_close(s, s_ref, **TOL)
    inputs = [x, *model.parameters()]
    assert_all_close(random_grads([y, s], inputs), random_grads([y_ref, s_ref], inputs))


@pytest.mark.parametrize("name", MODELS)
def test_spectral_norm_warm_start(name):
    """The vectors of one call (return_vectors) start the next: converged in a round or two."""
    model, _, _ = build(name)
    x, _ = data(model)
    _, _, u = on_engine(lambda: seeded(lambda: jacext.jacobian_spectral_norm(model, x, method="power", n_iter=5000,
                                                                              tol=1e-11, return_vectors=True)))
    _, s = on_engine(lambda: seeded(lambda: jacext.jacobian_spectral_norm(model, x, method="power", n_iter=2,
                                                                           tol=1e-9, init=u)))
    torch.testing.assert_close(s, torch.linalg.matrix_norm(jacobian_ref(model, x, 0)[1], 2), **TOL)


@pytest.mark.parametrize("name", ["middle-blocks", "output-block"])
@pytest.mark.parametrize("method", ["auto", "exact", "power"])
def test_spectral_norm_refuses_a_layer_inside_a_block(name, method):
    model, _, inside = build(name)
    x, _ = data(model)
    for layer in inside:
        with pytest.raises(ValueError, match=f"layer {layer}: h_{layer} is inside a residual block"):
            jacext.jacobian_spectral_norm(model, x, layer, method=method)
        with pytest.raises(ValueError, match="inside a residual block"):
            jacext.explain(model, x, quantity="spectral_norm", layer=layer)


class HiddenConcat(nn.Module):
    """t concatenated into the second Linear: a per-sample bias inside the network."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(7, 4)

    def forward(self, x, t):
        return self.b(torch.cat([torch.tanh(self.a(x)), t], 1))


class InputConcat(nn.Module):
    """t concatenated with x at the input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 7), nn.Linear(7, 7), nn.Linear(7, 4)

    def forward(self, x, t):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(torch.cat([x, t], 1))))))


@pytest.mark.parametrize("method", ["exact", "power"])
def test_spectral_norm_at_a_hidden_layer_of_a_model_with_conditioning_inputs(method):
    """The concatenation with x is the input's business: at a hidden layer J = dy/dh_1, on the engine."""
    torch.manual_seed(0)
    model = InputConcat().double()
    x, _ = data(model)
    t = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    y, s = on_engine(lambda: jacext.jacobian_spectral_norm(model, x, 1, cond=t, method=method, n_iter=5000,
                                                           tol=1e-11))
    h1 = torch.tanh(model.a(torch.cat([x, t], 1)))
    jac = torch.func.vmap(torch.func.jacrev(lambda h: model.c(torch.tanh(model.b(h)))))(h1)
    s_ref = torch.linalg.matrix_norm(jac, 2)
    torch.testing.assert_close(y, model(x, t), **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)
    inputs = [t, *model.parameters()]
    assert_all_close(random_grads([s], inputs), random_grads([s_ref], inputs), rtol=1e-7, atol=1e-9)
    assert "columns" not in repr(jacext.explain(model, x, quantity="spectral_norm", layer=1))
    assert "SVD of J's columns over x's features" in repr(jacext.explain(model, x, quantity="spectral_norm"))


def test_spectral_norm_factors_by_layer():
    """Layer 0 takes every factor of the Jacobian family (its paths call the ops and Linearization
    alone); a layer above it, only those the forward below it applies (no conditioning)."""
    from jacext.spectral import _supports
    assert _supports(0) is JACOBIAN_FAMILY
    assert _supports(1) == BELOW_LAYER <= JACOBIAN_FAMILY
    assert not BELOW_LAYER & {"sample_bias", "gate", "dropout_with_conditioning"}
    assert {"dropout", "residual", "dropout_with_residual"} <= BELOW_LAYER


def test_spectral_norm_conditioned_inside_runs_generic_or_refuses():
    """A per-sample bias the hidden layers' path does not take: not dropped, the call runs the generic
    path (layer 0) or refuses (a hidden layer, which the generic path does not take; an engine method)."""
    model = HiddenConcat().double()
    x, _ = data(model)
    t = torch.randn(6, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer=1"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            jacext.jacobian_spectral_norm(model, x, 1, cond=t)
    with pytest.raises(TypeError, match="per-sample bias"):
        jacext.jacobian_spectral_norm(model, x, 1, cond=t, method="power")


@pytest.mark.parametrize("name", ["dropout", "middle-blocks"])
def test_spectral_plan_names_the_factors(name):
    model, _, _ = build(name)
    x, _ = data(model)
    state = torch.random.get_rng_state()
    plan = repr(jacext.explain(model, x, quantity="spectral_norm", layer=1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the plan draws no mask
    if name == "dropout":
        assert "dropout masks" in plan and "layer 0: 2 (Dropout, p=0.3)" in plan and "layer 1: 5" in plan
        assert "residual" not in plan
    else:
        assert "residual skips (i, j)" in plan and "(1, 1), (3, 2)" in plan and "dropout" not in plan


# --- the margin -------------------------------------------------------------------------------------


def layer_sets(name):
    """(0,) and every block boundary, as engine layers and as the reference's points."""
    _, points, _ = build(name)
    every = (0,) + tuple(sorted(points))
    return [(0,), every]


def reference_points(name, layers):
    _, points, _ = build(name)
    return tuple("input" if l == 0 else points[l] for l in layers)


MARGIN_CASES = [(name, dist_norm, approx, method, layers)
                for name in MODELS for dist_norm in (1, 2, math.inf) for approx in (True, False)
                for method in ("rows", "jacobian") for layers in layer_sets(name)]


@pytest.mark.parametrize("name, dist_norm, use_approximation, method, layers", MARGIN_CASES)
def test_margin_loss_values_and_gradients(name, dist_norm, use_approximation, method, layers):
    model, _, _ = build(name)
    x, target = data(model)
    options = dict(gamma=0.3, alpha_factor=1.5, top_k=2, dist_norm=dist_norm, epsilon=1e-8,
                   use_approximation=use_approximation, worst_case_loss=False, on="probs",
                   layers_weights=[1.0 + 0.5 * i for i in range(len(layers))])
    params = list(model.parameters())
    xg = x.clone().requires_grad_()
    loss = on_engine(lambda: seeded(lambda: jacext.large_margin_loss(model, xg, target, layers=layers, method=method,
                                                                     **options)))
    grads = torch.autograd.grad(loss, [xg] + params)
    x_ref, points = x.clone().requires_grad_(), reference_points(name, layers)
    loss_ref = seeded(lambda: large_margin_loss_ref(model, x_ref, target, layers=points, **options))
    grads_ref = torch.autograd.grad(loss_ref, [x_ref] + params)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert_all_close(grads, grads_ref)


@pytest.mark.parametrize("method", ["rows", "jacobian"])
@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("dist_norm", [1, 2, math.inf])
@pytest.mark.parametrize("name", MODELS)
def test_margin_distances_values_and_gradients(name, dist_norm, top_k, method):
    model, _, _ = build(name)
    x, target = data(model, seed=4)
    layers = layer_sets(name)[1]
    xg = x.clone().requires_grad_()
    logits, dist = on_engine(lambda: seeded(lambda: jacext.margin_distances(
        model, xg, target, layers=layers, dist_norm=dist_norm, on="logits", top_k=top_k, method=method)))
    x_ref, points = x.clone().requires_grad_(), reference_points(name, layers)
    logits_ref, hs = seeded(lambda: representations(model, x_ref, points))
    classes, diff = margin_classes_ref(logits_ref, target, top_k)
    norms = margin_gradient_norms_ref(logits_ref, hs, target, classes, range(len(layers)),
                                      {1: math.inf, 2: 2, math.inf: 1}[dist_norm], create_graph=True)
    expected = torch.stack([diff / (1e-8 + n) for n in norms], dim=1)
    finite = torch.ones_like(expected, dtype=torch.bool)
    if top_k is None:
        finite[torch.arange(len(target)), :, target] = False
        expected = expected.masked_fill(~finite, math.inf)
    torch.testing.assert_close(logits, seeded(lambda: model(x)), **TOL)
    torch.testing.assert_close(dist, expected, **TOL)
    params = list(model.parameters())
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((dist[finite] * weights[finite]).sum() + logits.sin().sum(), [xg] + params)
    grads_ref = torch.autograd.grad((expected[finite] * weights[finite]).sum() + logits_ref.sin().sum(),
                                    [x_ref] + params)
    assert_all_close(grads, grads_ref)


@pytest.mark.parametrize("method", ["auto", "rows", "jacobian"])
@pytest.mark.parametrize("name", ["dropout", "dropout-residual"])
def test_margin_logits_are_the_models_under_the_same_seed(name, method):
    """Both paths' logits, with norms held constant (the jacobian path's own forward with the
    Jacobians' masks) or not."""
    model, _, _ = build(name)
    x, target = data(model)
    for approx in (True, False):
        logits, _ = seeded(lambda: jacext.margin_distances(model, x, target, method=method, top_k=1))
        torch.testing.assert_close(logits, seeded(lambda: model(x)), **TOL)
        loss = seeded(lambda: jacext.large_margin_loss(model, x, target, method=method, use_approximation=approx))
        ref = seeded(lambda: large_margin_loss_ref(model, x.clone().requires_grad_(), target, ("input",), 10000.0,
                                                   2.0, 1, 2, 1e-8, approx, True, None, "probs"))
        torch.testing.assert_close(loss, ref, **TOL)
    assert not torch.equal(seeded(lambda: model(x), 1), seeded(lambda: model(x), 2))  # the masks do change


@pytest.mark.parametrize("name", ["middle-blocks", "output-block"])
def test_margin_refuses_a_layer_inside_a_block(name):
    model, _, inside = build(name)
    x, target = data(model)
    for layer in inside:
        for method in ("auto", "rows", "jacobian"):
            with pytest.raises(ValueError, match=f"large_margin_loss at layer {layer}: h_{layer} is inside"):
                jacext.large_margin_loss(model, x, target, layers=(0, layer), method=method)
            with pytest.raises(ValueError, match=f"margin_distances at layer {layer}"):
                jacext.margin_distances(model, x, target, layers=(layer,), method=method)
        with pytest.raises(ValueError, match="inside a residual block"):
            jacext.explain(model, x, quantity="margin", layers=(layer,))


def test_margin_factors():
    """Masks and skips on the engine; not conditioning (the input layer's norms would run over the
    concatenated columns, the rows path carries no per-sample bias or gate)."""
    assert MARGIN_FACTORS == {"dropout", "residual", "dropout_with_residual"} and MARGIN_FACTORS <= JACOBIAN_FAMILY




@pytest.mark.parametrize("model", [InputConcat(), HiddenConcat()], ids=["input-concat", "hidden-concat"])
def test_margin_with_conditioning_runs_the_generic_path(model):
    model = model.double()
    x, target = data(model)
    t = torch.randn(6, 1, dtype=torch.float64)
    _warned.clear()  # one warning per model class and node: another test may have had it
    with pytest.warns(RuntimeWarning, match="large_margin_loss runs the generic autograd path"):
        loss = jacext.large_margin_loss(model, x, target, cond=t, dist_norm=math.inf)
    x_ref = x.clone().requires_grad_()

    class Bound(nn.Module):  # the model with t bound, for the reference's representations
        def forward(self, x):
            return model(x, t)

    ref = large_margin_loss_ref(Bound(), x_ref, target, ("input",), 10000.0, 2.0, 1, math.inf, 1e-8, True, True,
                                None, "probs")
    torch.testing.assert_close(loss, ref, **TOL)
    with pytest.raises(TypeError, match="method='rows' runs on the fused engine only"):
        jacext.large_margin_loss(model, x, target, cond=t, method="rows")


def test_margin_costs_with_skips():
    """The input-layer forms that factor J_0 through W_1 leave the costs where a skip is in the way."""
    widths, batch, k = [64, 16, 16, 10], 32, 1
    plain = {q: {c: margin_costs(widths, batch, (0,), k, q, c) for c in (True, False)} for q in (1, 2, math.inf)}
    inside = [-1, 1, -1]  # a block on h_1: no skip leaves x
    for c in (True, False):
        # q = 2: no Gram epilogue in a net with skips (J_0 formed, then J_0 J_0^T)
        assert margin_costs(widths, batch, (0,), k, 2, c, inside)["jacobian"][0] > plain[2][c]["jacobian"][0]
        # q = inf, q = 1: no skip leaves x, so the same costs
        for q in (1, math.inf):
            assert margin_costs(widths, batch, (0,), k, q, c, inside) == plain[q][c]
        assert margin_costs(widths, batch, (0,), k, 2, c, [-1, -1, -1]) == plain[2][c]  # no skip at all
    square = [16, 16, 16, 10]
    for c in (True, False):
        base = margin_costs(square, batch, (0,), k, math.inf, c)
        skip = margin_costs(square, batch, (0,), k, math.inf, c, [0, -1, -1])
        assert skip["jacobian"][0] > base["jacobian"][0]  # the factors (u^T S) W_1 do not apply
        # the rows path's one-column backward of the last product, likewise (with a graph only)
        assert (skip["rows"][0] > base["rows"][0]) == (not c)


@pytest.mark.parametrize("name", ["dropout", "input-block"])
def test_margin_plan_names_the_factors(name):
    model, _, _ = build(name)
    x, target = data(model)
    state = torch.random.get_rng_state()
    plan = jacext.explain(model, x, quantity="margin", dist_norm=1, layers=(0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the plan draws no mask
    assert plan.costs is not None and plan.residual == lower(model, supports=frozenset(FACTOR_NAMES)).spec.residual
    text = repr(plan)
    if name == "dropout":
        assert "dropout masks" in text and "2 (Dropout, p=0.3)" in text and "residual" not in text
    else:
        assert "residual skips (i, j)" in text and "(0, 0)" in text
        assert "the factors (u^T S) W_1 do not apply" in text  # q = inf from a skip that leaves x
