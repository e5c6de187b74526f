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
                              margin_gradient_norms_ref)
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
