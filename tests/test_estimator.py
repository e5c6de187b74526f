"""method="hutchinson": exact with orthogonal projections at n_proj = m, orthogonal rows unbiased
and of lower variance, gradients, errors (the properties every estimator shares: test_estimators.py)."""
import pytest
import torch
from torch import nn

import jacext
from jacext.reference import jacobian_frobenius_ref
from helpers import make_mlp

# (widths, whether "reverse" uses the Gram epilogue there): both reverse strategies are covered.
NETS = [((9, 4, 6, 5), True), ((3, 8, 7, 5), False)]


@pytest.mark.parametrize("widths", [w for w, _ in NETS], ids=str)
def test_orthogonal_projections_are_exact_at_n_proj_equal_m(widths, device):
    model = make_mlp(widths, nn.Tanh, output_activation=nn.Sigmoid, device=device)
    x = torch.randn(6, widths[0], dtype=torch.float64, device=device)
    _, exact = jacobian_frobenius_ref(model, x)
    _, sq = jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=widths[-1], orthogonal=True)
    torch.testing.assert_close(sq, exact, rtol=1e-10, atol=1e-12)


def test_both_reverse_strategies_are_exercised():
    from jacext.planner import REVERSE, REVERSE_GRAM, resolve_strategy
    for widths, gram in NETS:
        expected = REVERSE_GRAM if gram else REVERSE
        assert resolve_strategy("hutchinson", widths, batch=6, projections=2) == expected


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("widths", [w for w, _ in NETS], ids=str)
def test_orthogonal_rows_are_unbiased(widths, distribution, device):
    """Many independent draws of orthogonal rows for one sample (the batch repeats it): their mean
    lies within a few standard errors of the exact value (independent rows: test_estimators.py)."""
    orthogonal = True
    model = make_mlp(widths, nn.Tanh, device=device)
    x = torch.randn(1, widths[0], dtype=torch.float64, device=device).expand(4000, -1)
    _, exact = jacobian_frobenius_ref(model, x[:1])
    g = torch.Generator(device=device).manual_seed(0)
    _, draws = jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=2, generator=g,
                                         distribution=distribution, orthogonal=orthogonal)
    standard_error = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - exact[0]) < 4 * standard_error, (draws.mean().item(), exact.item())
    assert draws.std() > 0


def test_orthogonal_lowers_the_variance(device):
    model = make_mlp((9, 4, 6, 5), nn.Tanh, device=device)
    x = torch.randn(1, 9, dtype=torch.float64, device=device).expand(4000, -1)
    spread = {}
    for orthogonal in (False, True):
        g = torch.Generator(device=device).manual_seed(1)
        _, draws = jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=3, generator=g,
                                             distribution="gaussian", orthogonal=orthogonal)
        spread[orthogonal] = draws.var()
    assert spread[True] < spread[False]


@pytest.mark.parametrize("widths", [w for w, _ in NETS], ids=str)
def test_gradient_equals_the_gradient_of_the_estimate(widths, device):
    """With the projections fixed, the estimate and its gradient equal the composite formula."""
    model = make_mlp(widths, nn.SiLU, output_activation=nn.Tanh, device=device)
    x = torch.randn(4, widths[0], dtype=torch.float64, device=device, requires_grad=True)
    v = jacext.random_projections(4, 3, widths[-1], generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64, device=device)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    strategy = jacext.ops.resolve_strategy("hutchinson", widths, batch=4, projections=3)
    _, terms, _ = torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations,
                                                          spec.act_params, strategy, v)
    from jacext._composites import mlp_composite
    _, vjac = mlp_composite(x, spec.weights, spec.biases, spec.activations, spec.act_params, projections=v)
    torch.testing.assert_close(terms, vjac.pow(2).sum(2), rtol=1e-10, atol=1e-12)
    params = [x] + list(model.parameters())
    grads = torch.autograd.grad(terms.sum(), params)
    grads_ref = torch.autograd.grad(vjac.pow(2).sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", [jacext.ops.REVERSE, jacext.ops.REVERSE_GRAM], ids=["reverse", "reverse_gram"])
def test_gradcheck_gradgradcheck_and_opcheck_with_projections(strategy, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w1 = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w2 = torch.randn(6, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b1 = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(3, 2, 6, generator=g, dtype=torch.float64).to(device)
    empty = w2.new_empty(0)

    def fn(x, w1, w2, b1):
        return torch.ops.jacext.mlp_jacobian_frobenius(x, [w1, w2], [b1, empty], [3, 4], [0.0] * 4, strategy, v)[:2]

    assert torch.autograd.gradcheck(fn, (x, w1, w2, b1))
    assert torch.autograd.gradgradcheck(fn, (x, w1, w2, b1))
    torch.library.opcheck(torch.ops.jacext.mlp_jacobian_frobenius.default,
                          (x, [w1, w2], [b1, empty], [3, 4], [0.0] * 4, strategy, v))
    with torch.no_grad():
        y, terms, saved = torch.ops.jacext.mlp_jacobian_frobenius(x, [w1, w2], [b1, empty], [3, 4], [0.0] * 4,
                                                                  strategy, v)
    torch.library.opcheck(torch.ops.jacext.mlp_jacobian_backward.default,
                          (torch.randn_like(y), torch.randn_like(terms), None, x, [w1, w2], [b1, empty],
                           [3, 4], [0.0] * 4, 0, strategy, list(saved), [], v))


def test_errors():
    model = make_mlp((5, 7, 3), nn.Tanh)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_proj <= 3"):
        jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=4, orthogonal=True)
    with pytest.raises(ValueError, match="return_variance needs n_proj >= 2"):
        jacext.jacobian_frobenius(model, x, method="hutchinson", return_variance=True)
    with pytest.raises(ValueError, match="positive integer"):
        jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=0)
    with pytest.raises(ValueError, match="unknown distribution"):
        jacext.jacobian_frobenius(model, x, method="hutchinson", distribution="uniform")
    with pytest.raises(ValueError, match="apply to method='hutchinson' only"):
        jacext.jacobian_frobenius(model, x, orthogonal=True)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    with pytest.raises(RuntimeError, match="strategy must be 0 or 2"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations, spec.act_params,
                                                jacext.ops.FORWARD, torch.ones(2, 1, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="projections must have shape"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations, spec.act_params,
                                                jacext.ops.REVERSE, torch.ones(2, 1, 4, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 7, 40])
def test_orthonormal_frames_of_gaussian_matrices(k):
    """CholeskyQR2 (no per-sample QR, no host sync): Q^T Q = I, and a = Q R with R upper triangular
    with a positive diagonal, as the QR whose Q is uniformly distributed."""
    from jacext.estimators import orthonormal_columns

    a = torch.randn(6, 40, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    q = orthonormal_columns(a)
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(k, dtype=torch.float64).expand(6, k, k),
                               rtol=0, atol=1e-12)
    r = q.transpose(1, 2) @ a
    torch.testing.assert_close(r, r.triu(), rtol=0, atol=1e-10)
    assert (torch.diagonal(r, dim1=1, dim2=2) > 0).all()
