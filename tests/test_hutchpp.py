"""method="hutch++": exact once the sketch spans the outputs, unbiased (value and gradient) over
seeded draws, a lower variance than Hutchinson's at equal products where the spectrum decays, errors
(the properties every estimator shares: test_estimators.py)."""
import pytest
import torch
from torch import nn

import jacext
from jacext.reference import jacobian_frobenius_ref
from helpers import make_mlp, weighted_objective

DRAWS = 4000  # one sample repeated: every row of the batch is an independent draw


def decaying_spectrum_net(device, n=12, decay=0.5, seed=0):
    """12-12-12 tanh with weights U diag(decay^i) V^T: J's singular values fall off geometrically."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, n), nn.Tanh(), nn.Linear(n, n)).double()
    with torch.no_grad():
        for linear in (model[0], model[2]):
            u, v = (torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q for _ in range(2))
            linear.weight.copy_(2 * u @ torch.diag(decay ** torch.arange(n, dtype=torch.float64)) @ v.T)
            linear.bias.copy_(0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    return model.to(device)


def repeated_sample(model, n_in, device, seed=0):
    x = torch.randn(1, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    return x, x.expand(DRAWS, -1)


@pytest.mark.parametrize("widths", [(9, 4, 6, 5), (3, 8, 7, 5)], ids=str)
def test_exact_when_the_sketch_spans_the_outputs(widths, device):
    """n_proj >= 3m: Q is a basis of the m outputs, ||Q^T J||^2 = ||J||^2; value and gradients."""
    model = make_mlp(widths, nn.Tanh, output_activation=nn.Sigmoid, device=device)
    x = torch.randn(6, widths[0], dtype=torch.float64, device=device, requires_grad=True)
    params = [x] + list(model.parameters())
    y, sq = jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=3 * widths[-1],
                                      generator=torch.Generator(device=device).manual_seed(0))
    y_ref, sq_ref = jacobian_frobenius_ref(model, x)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(weighted_objective(y, sq), params)
    grads_ref = torch.autograd.grad(weighted_objective(y_ref, sq_ref), params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("n_proj", [3, 7])
def test_unbiased_value_and_gradient(n_proj, distribution, device):
    """Over DRAWS seeded draws for one sample, the mean estimate and the mean gradient w.r.t. x
    lie within a few standard errors of the exact ones."""
    model = make_mlp((6, 10, 9, 8), nn.Tanh, device=device)
    x1, x = repeated_sample(model, 6, device)
    x = x.clone().requires_grad_()
    _, exact = jacobian_frobenius_ref(model, x1)
    x1g = x1.clone().requires_grad_()
    (grad_exact,) = torch.autograd.grad(jacobian_frobenius_ref(model, x1g)[1].sum(), [x1g])
    _, draws = jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=n_proj, distribution=distribution,
                                         generator=torch.Generator(device=device).manual_seed(1))
    (grads,) = torch.autograd.grad(draws.sum(), [x])  # row b: the gradient of draw b
    assert draws.std() > 0
    assert abs(draws.mean() - exact[0]) < 4 * draws.std() / DRAWS ** 0.5, (draws.mean().item(), exact.item())
    standard_error = grads.std(0) / DRAWS ** 0.5
    assert ((grads.mean(0) - grad_exact[0]).abs() < 4.5 * standard_error).all()


@pytest.mark.parametrize("n_proj", [6, 9])
def test_variance_below_hutchinson_at_equal_products(n_proj, device):
    model = decaying_spectrum_net(device)
    _, x = repeated_sample(model, 12, device)
    variance = {}
    for method in ("hutchinson", "hutch++"):
        _, draws = jacext.jacobian_frobenius(model, x, method=method, n_proj=n_proj,
                                             generator=torch.Generator(device=device).manual_seed(2))
        variance[method] = draws.var()
    assert variance["hutch++"] < 0.2 * variance["hutchinson"], variance


def test_nan_propagates_per_sample_and_empty_batch():
    model = make_mlp((5, 7, 6), nn.Tanh)
    x = torch.randn(3, 5, dtype=torch.float64)
    x[1, 2] = float("nan")
    y, sq = jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=18)  # 3 m: exact
    assert torch.isnan(sq[1]) and torch.isnan(y[1]).all()
    torch.testing.assert_close(sq[[0, 2]], jacobian_frobenius_ref(model, x[[0, 2]])[1], rtol=1e-10, atol=0)
    y, sq, var = jacext.jacobian_frobenius(model, x[:0], method="hutch++", n_proj=4, return_variance=True)
    assert y.shape == (0, 6) and sq.shape == (0,) and var.shape == (0,)


def test_errors():
    model = make_mlp((5, 7, 3), nn.Tanh)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs n_proj >= 3"):
        jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=2)
    with pytest.raises(ValueError, match=r"return_variance needs n_proj - 2 \* 1 >= 2"):
        jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=3, return_variance=True)
    with pytest.raises(ValueError, match="orthogonal applies to method='hutchinson'"):
        jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=6, orthogonal=True)
    with pytest.raises(ValueError, match="unknown distribution"):
        jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=6, distribution="uniform")
    with pytest.raises(RuntimeError, match="weight 0 has dtype"):
        jacext.jacobian_frobenius(model, x.float(), method="hutch++", n_proj=6)
