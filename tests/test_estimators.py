"""The random estimators' shared properties, once for every estimator (jacext/estimators.py): the
mean of many draws is the exact value (unbiased), the returned variance matches the spread of the
draws, one generator seed gives one estimate, an empty batch gives empty outputs. The estimators'
own properties (orthogonal rows, Hutch++'s sketch, gradients) are in test_estimator.py,
test_hutchpp.py and test_laplacian.py."""
import pytest
import torch
from torch import nn

import jacext
from jacext.reference import jacobian_frobenius_ref, jacobian_diagonal_ref
from helpers import make_mlp

DRAWS = 4000  # one sample repeated: every row of the batch is an independent draw


class _Unlowered(nn.Module):
    """A tanh MLP behind a torch.cat of x's slices, which the engine does not lower: the generic path runs it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.cat([x[:, :1], x[:, 1:]], 1))


def _penalty(method, **fixed):
    def estimate(model, x, **options):
        return jacext.jacobian_frobenius(model, x, method=method, **fixed, **options)
    return estimate


def _divergence(**fixed):
    def estimate(model, x, **options):
        return jacext.divergence(model, x, method="hutchinson", **fixed, **options)
    return estimate


def _exact_penalty(model, x, wrt=None):
    if wrt is None:
        return jacobian_frobenius_ref(model, x)[1]
    return jacext.jacobian(model, x, method="autograd", wrt=wrt).square().sum((1, 2))


# name: (the estimate, the exact value, the net's widths, whether the generic path runs it)
ESTIMATORS = {
    "penalty-hutchinson": (_penalty("hutchinson"), _exact_penalty, (6, 10, 9, 8), False),
    "penalty-hutchinson-gaussian": (_penalty("hutchinson", distribution="gaussian"), _exact_penalty, (6, 10, 9, 8),
                                    False),
    "penalty-hutch++": (_penalty("hutch++"), _exact_penalty, (6, 10, 9, 8), False),
    "penalty-hutchinson-wrt": (_penalty("hutchinson", wrt=[4, 0, 2]),
                               lambda m, x: _exact_penalty(m, x, wrt=[4, 0, 2]), (6, 10, 9, 8), False),
    "penalty-hutchinson-generic": (_penalty("hutchinson"), _exact_penalty, (6, 10, 9, 8), True),
    "divergence-hutchinson": (_divergence(), lambda m, x: jacobian_diagonal_ref(m, x)[1].sum(1), (6, 10, 6), False),
    "divergence-hutchinson-generic": (_divergence(), lambda m, x: jacobian_diagonal_ref(m, x)[1].sum(1), (6, 10, 6),
                                      True),
}


def _setup(name, seed=0):
    estimate, exact, widths, generic = ESTIMATORS[name]
    model = make_mlp(widths, nn.Tanh, seed=seed)
    if generic:
        model = _Unlowered(model)
    x = torch.randn(1, widths[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return estimate, exact(model, x)[0], model, x


@pytest.fixture(autouse=True)
def _quiet_generic_path():
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "jacext:.*generic autograd path", RuntimeWarning)
        yield


@pytest.mark.parametrize("name", ESTIMATORS)
def test_unbiased(name):
    estimate, exact, model, x = _setup(name)
    _, draws = estimate(model, x.expand(DRAWS, -1), n_proj=4, generator=torch.Generator().manual_seed(1))
    assert draws.std() > 0
    assert abs(draws.mean() - exact) < 4 * draws.std() / DRAWS ** 0.5, (draws.mean().item(), exact.item())


@pytest.mark.parametrize("name", ESTIMATORS)
def test_variance_estimate_matches_the_spread_of_estimates(name):
    estimate, _, model, x = _setup(name, seed=2)
    _, draws, variance = estimate(model, x.expand(DRAWS, -1), n_proj=8, return_variance=True,
                                  generator=torch.Generator().manual_seed(3))
    ratio = variance.mean() / draws.var()
    assert 0.85 < ratio < 1.15, ratio.item()


@pytest.mark.parametrize("name", ESTIMATORS)
def test_one_seed_one_estimate_and_empty_batches(name):
    estimate, _, model, x = _setup(name)
    batch = x.expand(5, -1) + torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    runs = [estimate(model, batch, n_proj=4, generator=torch.Generator().manual_seed(7))[1] for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    other = estimate(model, batch, n_proj=4, generator=torch.Generator().manual_seed(8))[1]
    assert not torch.equal(runs[0], other)
    y, value, variance = estimate(model, batch[:0], n_proj=4, return_variance=True)
    assert y.shape[0] == 0 and value.shape == (0,) and variance.shape == (0,)
