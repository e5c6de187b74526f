"""Large-margin distances and loss against a plain autograd reference (one autograd.grad per
class and layer, create_graph=True), in float64."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

import jacext
from jacext.reference import (hidden_states, large_margin_loss_ref, margin_classes_ref,
                              margin_gradient_norms_ref, representations)
from helpers import make_mlp

WIDTHS = (6, 7, 5, 4)
TOL = dict(rtol=1e-9, atol=1e-10)


def model_and_data(device, seed=0):
    model = make_mlp(WIDTHS, nn.Tanh, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(9, WIDTHS[0], generator=g, dtype=torch.float64).to(device)
    target = torch.randint(0, WIDTHS[-1], (9,), generator=g).to(device)
    return model, x, target


OPTIONS = list(itertools.product(["probs", "logits"], [1, 2, math.inf], [1, 3], [True, False], [True, False]))


@pytest.mark.parametrize("layers, layers_weights", [((0,), None), ((0, 1, 2), [1.0, 0.5, 2.0])], ids=["input", "all"])
@pytest.mark.parametrize("on, dist_norm, top_k, worst_case_loss, use_approximation", OPTIONS,
                         ids=["-".join(map(str, o)) for o in OPTIONS])
def test_loss_and_gradients_match_autograd(on, dist_norm, top_k, worst_case_loss, use_approximation, layers,
                                           layers_weights, device):
    model, x, target = model_and_data(device)
    # gamma in the range of the distances, so that both clips and the slope between them are hit
    options = dict(layers=layers, gamma=0.3, alpha_factor=1.5, top_k=top_k, dist_norm=dist_norm, epsilon=1e-8,
                   use_approximation=use_approximation, worst_case_loss=worst_case_loss,
                   layers_weights=layers_weights, on=on)
    params = list(model.parameters())
    xg = x.clone().requires_grad_()
    loss = jacext.large_margin_loss(model, xg, target, **options)
    grads = torch.autograd.grad(loss, [xg] + params)
    x_ref = x.clone().requires_grad_()
    loss_ref = large_margin_loss_ref(model, x_ref, target, **options)
    grads_ref = torch.autograd.grad(loss_ref, [x_ref] + params)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("dist_norm", [1, 2, math.inf])
@pytest.mark.parametrize("on", ["probs", "logits"])
def test_distances_match_autograd(on, dist_norm, top_k, device):
    model, x, target = model_and_data(device, seed=3)
    layers = (0, 2, 1)
    logits, dist = jacext.margin_distances(model, x, target, layers=layers, dist_norm=dist_norm, on=on, top_k=top_k)
    x_ref = x.clone().requires_grad_()
    logits_ref, hs = hidden_states(model, x_ref)
    score = torch.softmax(logits_ref, 1) if on == "probs" else logits_ref
    classes, diff = margin_classes_ref(score, target, top_k)
    q = {1: math.inf, 2: 2, math.inf: 1}[dist_norm]
    norms = margin_gradient_norms_ref(score, hs, target, classes, layers, q, create_graph=False)
    expected = torch.stack([diff / (1e-8 + n) for n in norms], dim=1)
    if top_k is None:
        rows = torch.arange(len(target))
        expected[rows, :, target] = math.inf
    m = WIDTHS[-1]
    assert dist.shape == (len(target), len(layers), m if top_k is None else top_k)
    torch.testing.assert_close(logits, logits_ref, **TOL)
    torch.testing.assert_close(dist, expected.detach(), **TOL)


def test_distances_are_differentiable_everywhere(device):
    """The target's own column is inf; the other columns still pass finite gradients."""
    model, x, target = model_and_data(device)
    xg = x.clone().requires_grad_()
    _, dist = jacext.margin_distances(model, xg, target, layers=(0, 1))
    finite = dist[torch.isfinite(dist)]
    (grad,) = torch.autograd.grad(finite.sum(), xg)
    assert torch.isfinite(grad).all()


def test_gradcheck_without_approximation():
    model, x, target = model_and_data("cpu")
    names = [n for n, _ in model.named_parameters()]

    def loss(x, *params):
        return jacext.large_margin_loss(_with(model, names, params), x, target, layers=(0, 1), gamma=0.3,
                                        alpha_factor=1.5, top_k=2, worst_case_loss=False, use_approximation=False)

    inputs = [x.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert torch.autograd.gradcheck(loss, inputs)


def test_max_norm_differentiable_twice():
    """q = inf runs the rows (u^T S) W_1 (input layer: one W_1) and u^T J (hidden layers: one J per
    sample) through their own max-norm function, whose backward reads one column of W_1 or J per
    row: its values against torch.amax, its first and second derivatives against finite
    differences, and the whole loss's gradient by gradcheck."""
    from jacext.margin import _MaxAbsOfProduct

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for w in (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)):
        torch.testing.assert_close(_MaxAbsOfProduct.apply(a, w)[0], (a @ w).abs().amax(-1), rtol=0, atol=0)
        assert torch.autograd.gradcheck(lambda a, w: _MaxAbsOfProduct.apply(a, w)[0], (a, w))
        assert torch.autograd.gradgradcheck(lambda a, w: _MaxAbsOfProduct.apply(a, w)[0] ** 2, (a, w))

    model, x, target = model_and_data("cpu")
    names = [n for n, _ in model.named_parameters()]

    def loss(x, *params):
        return jacext.large_margin_loss(_with(model, names, params), x, target, layers=(0, 2), gamma=0.3,
                                        alpha_factor=1.5, top_k=2, dist_norm=1, worst_case_loss=False,
                                        use_approximation=False)

    inputs = [x.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert torch.autograd.gradcheck(loss, inputs)


def _with(model, names, params):
    """A copy of `model` whose parameters are the given tensors (so gradcheck can perturb them)."""
    clone = copy.deepcopy(model)
    for name, p in zip(names, params):
        module_name, attr = name.rsplit(".", 1)
        module = clone.get_submodule(module_name)
        delattr(module, attr)
        setattr(module, attr, p)
    return clone


def test_module_form_equals_the_function(device):
    model, x, target = model_and_data(device)
    criterion = jacext.LargeMarginLoss(layers=(0, 1), gamma=0.3, top_k=2)
    assert "top_k=2" in repr(criterion)
    torch.testing.assert_close(criterion(model, x, target),
                               jacext.large_margin_loss(model, x, target, layers=(0, 1), gamma=0.3, top_k=2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=(3,)), "layers must be"),
    (dict(layers=()), "layers must be"),
    (dict(layers=(0, 0)), "layers must be"),
    (dict(dist_norm=3), "dist_norm"),
    (dict(on="margins"), "on must be"),
    (dict(top_k=4), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(layers_weights=[1.0, 2.0]), "layers_weights"),
    (dict(gamma=-1.0), "gamma"),
])
def test_bad_options(kwargs, match):
    model, x, target = model_and_data("cpu")
    with pytest.raises(ValueError, match=match):
        jacext.large_margin_loss(model, x, target, **kwargs)


def test_bad_targets():  # CPU: on a GPU the range check is a device assert (no host sync), fatal to the process
    model, x, target = model_and_data("cpu")
    with pytest.raises(ValueError, match="outside"):
        jacext.large_margin_loss(model, x, target + 10)
    with pytest.raises(ValueError, match="integer tensor"):
        jacext.margin_distances(model, x, target.double())
    with pytest.raises(ValueError, match="integer tensor"):
        jacext.margin_distances(model, x, target[:3])


def test_margin_training_on_digits_widens_the_margin(device):
    """A margin-trained MLP reaches >= 95 % test accuracy with a larger mean input-space margin
    (distance to the nearest boundary of the logits, per test sample) than a cross-entropy one."""
    from jacext.data import load_digits

    x_train, y_train, x_test, y_test = load_digits(device=device)
    criteria = {"margin": jacext.LargeMarginLoss(layers=(0, 1, 2), gamma=2.0, top_k=3, use_approximation=False),
                "cross-entropy": lambda model, x, y: nn.functional.cross_entropy(model(x), y)}
    results = {}
    for name, criterion in criteria.items():
        torch.manual_seed(0)
        model = jacext.MLP([64, 128, 128, 10], activation="tanh").to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(20):
            for batch in torch.randperm(len(x_train)).to(device).split(64):
                loss = criterion(model, x_train[batch], y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        logits, dist = jacext.margin_distances(model, x_test, y_test, on="logits")
        results[name] = ((logits.argmax(1) == y_test).float().mean().item(), dist[:, 0].min(1).values.mean().item())
    print(results)
    assert results["margin"][0] >= 0.95
    assert results["margin"][1] > results["cross-entropy"][1]


# ---------------------------------------------------------------------------------------------
# Every top_k / dist_norm / approximation combination against the official formula (float64), on
# the engine's two paths (forced) and on the generic path at named layers of a small CNN.

WIDTHS10 = (6, 8, 7, 10)
GRID = list(itertools.product([1, 3, 9], [1, 2, math.inf], [True, False]))
GRID_IDS = [f"k{k}-d{d}-{'approx' if a else 'exact'}" for k, d, a in GRID]


def mlp10_and_data(seed=0, batch=7):
    model = make_mlp(WIDTHS10, nn.Tanh, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(batch, WIDTHS10[0], generator=g, dtype=torch.float64), \
        torch.randint(0, WIDTHS10[-1], (batch,), generator=g)


def small_cnn(seed=0, batch_norm=True):
    """The paper's MNIST CNN in miniature: two conv blocks (conv, batch norm in eval, ReLU, 2x2 max
    pooling), then a dense ReLU layer and the 10 logits."""
    torch.manual_seed(seed)

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out) if batch_norm else
                             nn.Identity(), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(block(1, 3), block(3, 4), nn.Flatten(), nn.Linear(4 * 2 * 2, 12), nn.ReLU(),
                          nn.Linear(12, 10)).double()
    with torch.no_grad():  # running statistics away from (0, 1), so that the normalization matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _loss_and_grads(loss_fn, model, x):
    xg = x.clone().requires_grad_()
    loss = loss_fn(model, xg)
    return [loss] + list(torch.autograd.grad(loss, [xg] + list(model.parameters())))


def _official(layers, top_k, dist_norm, use_approximation):
    return dict(layers=layers, gamma=0.3, alpha_factor=1.5, top_k=top_k, dist_norm=dist_norm, epsilon=1e-8,
                use_approximation=use_approximation, worst_case_loss=True, layers_weights=None, on="probs")


@pytest.mark.parametrize("method", ["rows", "jacobian", "auto"])
@pytest.mark.parametrize("top_k, dist_norm, use_approximation", GRID, ids=GRID_IDS)
def test_every_setting_matches_the_official_formula_on_an_mlp(top_k, dist_norm, use_approximation, method):
    model, x, target = mlp10_and_data()
    options = _official((0, 1, 2), top_k, dist_norm, use_approximation)
    got = _loss_and_grads(lambda m, x: jacext.large_margin_loss(m, x, target, method=method, **options), model, x)
    want = _loss_and_grads(lambda m, x: large_margin_loss_ref(m, x, target, **options), model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("top_k, dist_norm, use_approximation", GRID, ids=GRID_IDS)
def test_every_setting_matches_the_official_formula_on_a_cnn(top_k, dist_norm, use_approximation):
    """The generic path at the input and after each conv block (named submodules)."""
    model = small_cnn()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (5,), generator=g)
    options = _official(("input", "0", "1"), top_k, dist_norm, use_approximation)
    got = _loss_and_grads(lambda m, x: jacext.large_margin_loss(m, x, target, **options), model, x)
    want = _loss_and_grads(lambda m, x: large_margin_loss_ref(m, x, target, **options), model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("layers", [(0,), (2, 0), (1, 2)], ids=["input", "two", "hidden"])
@pytest.mark.parametrize("top_k, dist_norm, use_approximation", GRID, ids=GRID_IDS)
def test_rows_and_jacobian_paths_agree(top_k, dist_norm, use_approximation, layers):
    model, x, target = mlp10_and_data(seed=2)
    options = dict(layers=layers, gamma=0.3, alpha_factor=1.5, top_k=top_k, dist_norm=dist_norm,
                   use_approximation=use_approximation, worst_case_loss=False, on="probs")
    rows, jac = (_loss_and_grads(lambda m, x: jacext.large_margin_loss(m, x, target, method=method, **options),
                                 model, x) for method in ("rows", "jacobian"))
    for r, j in zip(rows, jac):
        torch.testing.assert_close(r, j, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dist_norm", [1, 2, math.inf])
def test_distances_on_both_paths_agree(dist_norm):
    model, x, target = mlp10_and_data(seed=4)
    results = [jacext.margin_distances(model, x, target, layers=(0, 1), dist_norm=dist_norm, method=method)
               for method in ("rows", "jacobian")]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)


def _nodes_named(tensor, *names):
    """The nodes of tensor's autograd graph whose class name holds one of `names`."""
    seen, stack, found = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += any(name in type(node).__name__ for name in names)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _matmul_nodes(tensor):
    """The matrix-product nodes of tensor's autograd graph."""
    return _nodes_named(tensor, "Mm", "Addmm", "Bmm", "Matmul", "Linear")


def test_rows_path_with_approximation_reuses_the_sweep_in_the_backward():
    """Held-constant norms down to the input: the loss's graph holds no matrix product, only the
    differences' reused-rows node (its backward runs the weight gradients alone); above the input,
    the logits' three products and nothing of the sweep."""
    model, x, target = mlp10_and_data()
    loss = jacext.large_margin_loss(model, x, target, layers=(0, 1, 2), top_k=3, dist_norm=math.inf,
                                    use_approximation=True, method="rows")
    assert _matmul_nodes(loss) == 0 and _nodes_named(loss, "_ReusedRows") == 1
    hidden = jacext.large_margin_loss(model, x, target, layers=(1, 2), top_k=3, dist_norm=math.inf,
                                      use_approximation=True, method="rows")
    assert _matmul_nodes(hidden) == 3 and _nodes_named(hidden, "_ReusedRows") == 0
    exact = jacext.large_margin_loss(model, x, target, layers=(0, 1, 2), top_k=3, dist_norm=math.inf,
                                     use_approximation=False, method="rows")
    assert _matmul_nodes(exact) > 3


@pytest.mark.parametrize("dist_norm", [1, 2, math.inf])
def test_rows_path_gradgradcheck(dist_norm):
    """The exact rows path is differentiable twice (the loss's gradient is itself differentiable)."""
    model, x, target = mlp10_and_data(batch=3)
    for p in model.parameters():
        p.requires_grad_(False)

    def distances(x):
        return jacext.margin_distances(model, x, target, layers=(0, 1), dist_norm=dist_norm, top_k=2,
                                       method="rows")[1]

    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(distances, (xg,))
    assert torch.autograd.gradgradcheck(distances, (xg,))


@pytest.mark.parametrize("method", ["rows", "jacobian", "autograd"])
def test_empty_batch(method):
    """The loss refuses an empty batch (its batch mean is undefined); the distances are empty."""
    model, x, target = mlp10_and_data()
    layers = (0, "1") if method == "autograd" else (0, 1)  # the first Tanh's output, named or counted
    with pytest.raises(ValueError, match="no samples"):
        jacext.large_margin_loss(model, x[:0], target[:0], layers=layers, method=method)
    logits, dist = jacext.margin_distances(model, x[:0], target[:0], layers=layers, top_k=2, method=method)
    assert logits.shape == (0, 10) and dist.shape == (0, 2, 2)


def test_cnn_margins_at_the_paper_layers():
    """The paper's CNN (28x28, two 5x5 conv blocks of 32 and 64 filters, batch norm in eval, a 512
    dense layer) at its settings, margins at the input and after each conv block: the distances
    against the reference's, and the loss trains (finite gradient for every parameter)."""
    torch.manual_seed(0)

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(block(1, 32), block(32, 64), nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
                          nn.Linear(512, 10)).eval()
    x = torch.randn(4, 1, 28, 28)
    target = torch.tensor([0, 3, 7, 9])
    layers = (0, "0", "1")
    logits, dist = jacext.margin_distances(model, x, target, layers=layers, dist_norm=math.inf, top_k=1)
    x_ref = x.clone().requires_grad_()
    logits_ref, hs = representations(model, x_ref, layers)
    score = torch.softmax(logits_ref, 1)
    classes, diff = margin_classes_ref(score, target, 1)
    norms = margin_gradient_norms_ref(score, dict(zip(layers, hs)), target, classes, layers, 1, create_graph=False)
    torch.testing.assert_close(dist, torch.stack([diff / (1e-8 + n) for n in norms], 1).detach(),
                               rtol=1e-4, atol=1e-6)
    loss = jacext.large_margin_loss(model, x, target, layers=layers, top_k=1, dist_norm=math.inf,
                                    use_approximation=True)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("layers, match", [
    ((0, "nope"), "names no submodule"),
    ((0, 1), "integer hidden layers"),
    (("0", "0"), "distinct"),
])
def test_bad_named_layers(layers, match):
    model = small_cnn()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        jacext.large_margin_loss(model, x, torch.tensor([1, 2]), layers=layers)


def test_named_layers_on_an_mlp_run_the_generic_path():
    """Names route an MLP to the generic path: the outputs of its Tanh modules "1" and "3" are the
    engine's layers 1 and 2."""
    model, x, target = mlp10_and_data()
    by_name = jacext.large_margin_loss(model, x, target, layers=("input", "1", "3"), top_k=3, use_approximation=False)
    by_index = jacext.large_margin_loss(model, x, target, layers=(0, 1, 2), top_k=3, use_approximation=False)
    torch.testing.assert_close(by_name, by_index, **TOL)
    with pytest.raises(ValueError, match="name submodules"):
        jacext.large_margin_loss(model, x, target, layers=("input", "1"), method="rows")


def test_explain_shows_the_margin_plan():
    model = jacext.MLP([784, 512, 512, 10], activation="tanh")
    x = torch.randn(128, 784)
    official = jacext.explain(model, x, quantity="margin", layers=(0, 1, 2), top_k=1, dist_norm=math.inf,
                              use_approximation=True)
    assert official.choice == "rows" and "<- chosen" in repr(official) and "jacobian: all 10 rows" in repr(official)
    rows_cost, jacobian_cost = official.costs["rows"][1], official.costs["jacobian"][1]
    assert rows_cost < jacobian_cost
    forced = jacext.explain(model, x, quantity="margin", layers=(0, 1, 2), top_k=9, method="jacobian")
    assert forced.choice == "jacobian"
    cnn = jacext.explain(small_cnn(), torch.randn(2, 1, 8, 8, dtype=torch.float64), quantity="margin",
                         layers=(0, "0"), top_k=3)
    assert cnn.costs is None and "generic path" in repr(cnn) and "name submodules" in repr(cnn)
    with pytest.raises(ValueError, match="top_k"):
        jacext.explain(model, x, quantity="margin", top_k=10)


@pytest.mark.parametrize("on", ["probs", "logits"])
def test_reused_rows_backward_without_biases_and_through_folded_batchnorm(on):
    """The reused-rows backward (norms held constant, margins down to the input) reaches x, the
    weights and, through the folding, BatchNorm's affine parameters; no bias to skip over. Against
    the Jacobian path (whose gradient is the logits' own backward; both match the official
    transcription on plain MLPs above)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4, bias=False),
                          nn.Softplus(), nn.Linear(5 - 1, 3)).double().eval()
    model[1].weight.data.uniform_(0.5, 1.5)
    model[1].bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(7, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (7,))
    options = dict(layers=(0, 1), gamma=50.0, alpha_factor=1.5, top_k=2, dist_norm=math.inf, epsilon=1e-8,
                   use_approximation=True, worst_case_loss=True, layers_weights=None, on=on)
    got = _loss_and_grads(lambda m, x: jacext.large_margin_loss(m, x, target, method="rows", **options), model, x)
    want = _loss_and_grads(lambda m, x: jacext.large_margin_loss(m, x, target, method="jacobian", **options), model, x)
    assert all(g.abs().max() > 1e-3 for g in got)  # the loss is on its slope, not on a clip
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
