"""Conditioning inputs concatenated with x at the input (FFJORD's f(x, t) = MLP(cat([x, t]))) run
on the engine: the Jacobian quantities over x's columns alone, the conditioning columns held fixed
and reached by ordinary gradients; float64 against torch.func."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext


class Field(nn.Module):
    """MLP(cat(parts)) with t first or last, passed (B, 1) or expanded from (1, 1) in the model."""

    def __init__(self, d=4, width=8, t_first=False, expand=False):
        super().__init__()
        torch.manual_seed(3)
        self.t_first, self.expand = t_first, expand
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.Tanh(), nn.Linear(width, width), nn.Softplus(),
                                 nn.Linear(width, d))

    def forward(self, x, t):
        if self.expand:
            t = t.expand(x.shape[0], 1)
        return self.net(torch.cat([t, x], 1) if self.t_first else torch.cat([x, t], dim=1))


CASES = [(False, False), (True, False), (False, True), (True, True)]


def setup(t_first, expand, batch=5):
    field = Field(t_first=t_first, expand=expand).double()
    torch.manual_seed(4)
    x = torch.randn(batch, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1 if expand else batch, 1, dtype=torch.float64, requires_grad=True)
    return field, x, t


def per_sample(field):
    return lambda xi, ti: field(xi[None], ti[None])[0]


def on_engine(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a generic-path warning fails the test
        return fn()


@pytest.mark.parametrize("t_first,expand", CASES)
def test_every_quantity_over_x_columns(t_first, expand):
    field, x, t = setup(t_first, expand)
    tb = t.expand(x.shape[0], 1)
    jac = vmap(jacrev(per_sample(field)))(x, tb)
    hess = vmap(hessian(per_sample(field)))(x, tb)
    y, div = on_engine(lambda: jacext.divergence(field, x, cond=t))
    torch.testing.assert_close(y, field(x, t))
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1))
    torch.testing.assert_close(on_engine(lambda: jacext.jacobian_diagonal(field, x, cond=t))[1],
                               jac.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(on_engine(lambda: jacext.jacobian_frobenius(field, x, cond=t))[1],
                               jac.square().sum((1, 2)))
    torch.testing.assert_close(on_engine(lambda: jacext.jacobian(field, x, cond=t)), jac)
    torch.testing.assert_close(on_engine(lambda: jacext.jacobian_gram(field, x, cond=t)), jac @ jac.transpose(1, 2))
    torch.testing.assert_close(on_engine(lambda: jacext.jacobian_spectral_norm(field, x, cond=t))[1],
                               torch.linalg.matrix_norm(jac, 2))
    _, grad, lap = on_engine(lambda: jacext.laplacian(field, x, cond=t, return_gradient=True))
    torch.testing.assert_close(grad, jac)
    torch.testing.assert_close(lap, hess.diagonal(dim1=2, dim2=3).sum(-1))
    _, grad, lap = on_engine(lambda: jacext.laplacian(field, x, cond=t, return_gradient=True, wrt=[2, 0]))
    torch.testing.assert_close(grad, jac)
    torch.testing.assert_close(lap, hess[..., 2, 2] + hess[..., 0, 0])
    _, lap = on_engine(lambda: jacext.laplacian(field, x, cond=t, wrt=[3]))
    torch.testing.assert_close(lap, hess[..., 3, 3])
    torch.testing.assert_close(on_engine(lambda: jacext.jacobian(field, x, cond=t, wrt=[1, 3])), jac[:, :, [1, 3]])


@pytest.mark.parametrize("t_first,expand", CASES[1:3])
def test_gradients_reach_x_t_and_parameters(t_first, expand):
    field, x, t = setup(t_first, expand)
    params = list(field.parameters())
    _, div = on_engine(lambda: jacext.divergence(field, x, cond=t))
    _, lap = on_engine(lambda: jacext.laplacian(field, x, cond=t))
    inputs = [x, t, *params[:-1]]  # not the last bias: a Jacobian quantity does not depend on it
    ours = torch.autograd.grad(div.square().sum() + lap.sin().sum(), inputs)

    def reference(x, t):
        tb = t.expand(x.shape[0], 1)
        jac = vmap(jacrev(per_sample(field)))(x, tb)
        hess = vmap(hessian(per_sample(field)))(x, tb)
        return jac.diagonal(dim1=1, dim2=2).sum(1).square().sum() + hess.diagonal(dim1=2, dim2=3).sum(-1).sin().sum()

    theirs = torch.autograd.grad(reference(x, t), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_divergence_gradcheck_and_gradgradcheck_through_the_concatenation():
    field = Field(d=2, width=3).double()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)

    def div(x, t):
        return jacext.divergence(field, x, cond=t)[1]

    assert torch.autograd.gradcheck(div, (x, t))
    assert torch.autograd.gradgradcheck(div, (x, t))


def test_the_margin_and_multi_layer_jacobians_do_not_mix_t_into_x():
    field, x, t = setup(False, False)
    jacext._route._warned.clear()
    with pytest.warns(RuntimeWarning, match="conditioning inputs concatenated with x"):
        jacext.margin_distances(field, x, torch.zeros(5, dtype=torch.long), cond=t)
    with pytest.raises(ValueError, match="layer 0"):
        jacext.jacobian(field, x, layer=[0, 1], cond=t)
    hidden = jacext.jacobian(field, x, layer=[1, 2], cond=t)
    assert [j.shape for j in hidden] == [(5, 4, 8), (5, 4, 8)]


class Refused(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x, t):
        if self.how == "hidden":
            h = torch.tanh(self.fc1(torch.cat([x, t], 1)))
            return self.fc2(torch.cat([h, t], 1)[:, :6])
        if self.how == "dim0":
            return self.fc2(torch.tanh(self.fc1(torch.cat([x, t], 0))))
        return self.fc2(torch.tanh(self.fc1(torch.cat([x, t.tanh()], 1))))  # t transformed first


@pytest.mark.parametrize("how,why", [("dim0", "dim=0"), ("transformed", "joins the engine only by torch.cat"),
                                     ("hidden", "only when it feeds an nn.Linear")])
def test_other_uses_of_conditioning_inputs_are_named(how, why):
    model = Refused(how)
    with pytest.raises(jacext.NotLowerable, match=why):
        jacext.frontend.lower(model, torch.randn(2, 4), torch.randn(2, 1))


def test_bad_conditioning_shapes_are_clear():
    field, x, t = setup(False, False)
    with pytest.raises(ValueError, match=r"cond\[0\].*\(5, k\)"):
        jacext.divergence(field, x, cond=t[:3])
    with pytest.raises(ValueError, match="features"):
        jacext.divergence(field, x[:, :3], cond=t)


def test_hutchinson_over_x_columns_is_exact_with_n_orthogonal_projections():
    field, x, t = setup(False, False)
    jac = vmap(jacrev(per_sample(field)))(x, t)
    y, div = on_engine(lambda: jacext.divergence(field, x, cond=t, method="hutchinson", n_proj=4, orthogonal=True,
                                                 generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(y, field(x, t))
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1))
    _, one = on_engine(lambda: jacext.divergence(field, x, cond=t, method="hutchinson", n_proj=1,
                                                 generator=torch.Generator().manual_seed(0)))
    v = jacext.random_projections(5, 1, 4, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    torch.testing.assert_close(one, torch.einsum("bki,bij,bkj->b", v, jac, v))


def test_cnf_example_runs_and_its_likelihood_is_the_exact_one(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "cnf_density.py"), "--quick",
                          "--out", str(tmp_path / "cnf.png")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "held-out negative log-likelihood" in run.stdout and (tmp_path / "cnf.png").exists()
    # the example's log-likelihood: its divergence against torch.func's along the same solve
    sys.path.insert(0, os.path.join(root, "examples"))
    try:
        import cnf_density
    finally:
        sys.path.pop(0)
    field = cnf_density.Field(width=8).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    ours = cnf_density.log_likelihood(field, x, steps=2)
    original = jacext.divergence
    try:
        jacext.divergence = lambda f, z, cond: (f(z, cond), vmap(jacrev(per_sample(f)))(z, cond).diagonal(
            dim1=1, dim2=2).sum(1))
        theirs = cnf_density.log_likelihood(field, x, steps=2)
    finally:
        jacext.divergence = original
    torch.testing.assert_close(ours, theirs)
