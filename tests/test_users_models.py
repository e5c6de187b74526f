"""Users' own models through the public functions (float64, against torch.func): `wrt` on the engine
for every quantity, conditioning inputs, models that lower (Flatten, Dropout and BatchNorm in
eval, the user's own classes) and models that do not (the generic path, its warning and the
forced engine's error), and the heat-equation example."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext

WRTS = {"int": 2, "slice": slice(1, 4), "unsorted": [3, 0, 2], "single": [1]}


def mlp(widths, seed=0, activation=nn.Tanh):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).double()


def gradients(output, inputs):
    """d output / d inputs, zeros for an input the output does not depend on (the last bias of a
    Jacobian quantity)."""
    grads = torch.autograd.grad(output, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def index(wrt, n):
    return list(range(n))[wrt] if isinstance(wrt, slice) else list(range(wrt)) if isinstance(wrt, int) else list(wrt)


def reference_jacobian(model, x, *cond):
    """J (B, m, n) of the flattened output w.r.t. the flattened input, by vmap(jacrev)."""
    shape = x.shape[1:]

    def one(xi, *ci):
        return model(xi.view(1, *shape), *[c.unsqueeze(0) for c in ci]).flatten()

    return vmap(jacrev(one))(x.flatten(1), *cond)


@pytest.mark.parametrize("wrt", WRTS.values(), ids=WRTS.keys())
def test_wrt_on_the_engine_for_every_quantity(wrt):
    model = mlp([5, 7, 6, 3])
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    cols = index(wrt, 5)
    jac = reference_jacobian(model, x)[:, :, cols]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model lowers: no generic-path warning
        got = jacext.jacobian(model, x, wrt=wrt)
        torch.testing.assert_close(got, jac)
        torch.testing.assert_close(jacext.jacobian_frobenius(model, x, wrt=wrt)[1], jac.square().sum((1, 2)))
        torch.testing.assert_close(jacext.jacobian_gram(model, x, wrt=wrt), jac @ jac.transpose(1, 2))
        torch.testing.assert_close(jacext.jacobian_spectral_norm(model, x, wrt=wrt)[1],
                                   torch.linalg.matrix_norm(jac, 2))
    # gradients of a loss on the restricted penalty reach x and the parameters as torch.func's do
    params = [x, *model.parameters()]
    ours = gradients(jacext.jacobian_frobenius(model, x, wrt=wrt)[1].sum(), params)
    theirs = gradients(reference_jacobian(model, x)[:, :, cols].square().sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_wrt_estimators_on_the_engine_are_exact_with_orthogonal_rows_and_unbiased():
    model = mlp([5, 7, 3])
    x = torch.randn(6, 5, dtype=torch.float64)
    jac = reference_jacobian(model, x)[:, :, [4, 1]]
    exact = jac.square().sum((1, 2))
    g = torch.Generator().manual_seed(0)
    sq = jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=3, orthogonal=True, generator=g, wrt=[4, 1])[1]
    torch.testing.assert_close(sq, exact)
    draws = torch.stack([jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=4, generator=g,
                                                   wrt=[4, 1])[1] for _ in range(400)])
    assert ((draws.mean(0) - exact).abs() <= 5 * draws.std(0) / 20).all()
    pp = jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=9, generator=g, wrt=[4, 1])[1]
    torch.testing.assert_close(pp, exact)  # the sketch spans all 3 outputs: exact


@pytest.mark.parametrize("wrt", [[0, 2, 1], slice(1, 4)])
def test_divergence_and_diagonal_pair_outputs_with_the_chosen_features(wrt):
    model = mlp([5, 8, 3])
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    jac = reference_jacobian(model, x)[:, :, index(wrt, 5)]
    diag = jac.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(jacext.jacobian_diagonal(model, x, wrt=wrt)[1], diag)
    div = jacext.divergence(model, x, wrt=wrt)[1]
    torch.testing.assert_close(div, diag.sum(1))
    grads = gradients(div.sum(), [x, *model.parameters()])
    ref = gradients(reference_jacobian(model, x)[:, :, index(wrt, 5)].diagonal(dim1=1, dim2=2).sum(),
                    [x, *model.parameters()])
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="square"):
        jacext.divergence(model, x, wrt=[0, 1])


@pytest.mark.parametrize("wrt", [[0], [1, 0], 1])
def test_laplacian_over_chosen_features_with_the_whole_gradient(wrt):
    model = mlp([3, 9, 7, 2])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    cols = index(wrt, 3)
    hess = vmap(hessian(lambda xi: model(xi.unsqueeze(0))[0]))(x)  # (B, m, n, n)
    lap_ref = sum(hess[:, :, j, j] for j in cols)
    y, grad, lap = jacext.laplacian(model, x, return_gradient=True, wrt=wrt)
    torch.testing.assert_close(lap, lap_ref)
    torch.testing.assert_close(grad, reference_jacobian(model, x))  # every feature
    torch.testing.assert_close(jacext.laplacian(model, x, wrt=wrt)[1], lap_ref)
    ours = gradients(lap.square().sum() + grad.sin().sum(), [x, *model.parameters()])
    theirs = gradients(lap_ref.square().sum() + reference_jacobian(model, x).sin().sum(), [x, *model.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


class HiddenConcatField(nn.Module):
    """f(x, t) = tanh(W_2 cat([tanh(W_1 x), t])): a conditioning input inside the network, a per-sample
    bias on the engine (tests/test_conditioning_inside.py; at the input: tests/test_conditioning.py)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(9, 3)

    def forward(self, x, t):
        return torch.tanh(self.fc2(torch.cat([torch.tanh(self.fc1(x)), t], 1)))


def test_conditioning_inputs_are_held_fixed_and_reached_by_gradients():
    field = HiddenConcatField().double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 1, dtype=torch.float64, requires_grad=True)
    jac = reference_jacobian(field, x, t)
    jacext._route._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the engine
        y, div = jacext.divergence(field, x, cond=t)
    torch.testing.assert_close(y, field(x, t))
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1))
    g_t, = torch.autograd.grad(div.sum(), t)
    ref_t, = torch.autograd.grad(reference_jacobian(field, x, t).diagonal(dim1=1, dim2=2).sum(), t)
    torch.testing.assert_close(g_t, ref_t)
    torch.testing.assert_close(jacext.jacobian(field, x, cond=(t,), method="autograd"), jac)
    with pytest.raises(TypeError, match="cond"):
        jacext.jacobian(field, x, cond=[t, "time"])


class Flattening(nn.Module):
    """A user's own class: flatten, dropout, BatchNorm1d, functional activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1, self.bn, self.fc2 = nn.Linear(16, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.drop = nn.Dropout(0.3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)

    def forward(self, x):
        h = x.view(x.shape[0], -1)
        h = torch.tanh(self.bn(self.fc1(h)))
        return self.fc2(self.drop(h))


def test_a_users_class_with_flatten_dropout_and_batchnorm_in_eval_runs_on_the_engine():
    model = Flattening().double().eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac = jacext.jacobian(model, x)
        sq = jacext.jacobian_frobenius(model, x, method="reverse")[1]
    assert jac.shape == (3, 3, 16)  # with respect to the flattened input
    ref = reference_jacobian(model, x)
    torch.testing.assert_close(jac, ref)
    torch.testing.assert_close(sq, ref.square().sum((1, 2)))
    ours = torch.autograd.grad(sq.sum(), [model.bn.weight, model.bn.bias, model.fc1.weight])
    theirs = torch.autograd.grad(reference_jacobian(model, x).square().sum(),
                                 [model.bn.weight, model.bn.bias, model.fc1.weight])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_batchnorm_in_train_says_to_use_eval():
    model = Flattening().double().train()
    with pytest.raises((ValueError, TypeError, RuntimeError), match="eval"):
        jacext.jacobian_frobenius(model, torch.randn(3, 16, dtype=torch.float64), method="autograd")


def test_dropout_in_train_runs_the_generic_path_with_the_modules_masks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).double().train()
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.manual_seed(11)
    expected = model(x)
    torch.manual_seed(11)
    y, sq = jacext.jacobian_frobenius(model, x, method="autograd")
    torch.testing.assert_close(y, expected)
    assert torch.isfinite(sq).all()


def test_every_function_takes_method_autograd_and_the_forced_engine_names_the_node():
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    jac = reference_jacobian(cnn, x)
    torch.testing.assert_close(jacext.jacobian(cnn, x, method="autograd"), jac)
    torch.testing.assert_close(jacext.jacobian_gram(cnn, x, method="autograd"), jac @ jac.transpose(1, 2))
    torch.testing.assert_close(jacext.jacobian_spectral_norm(cnn, x, method="autograd")[1],
                               torch.linalg.matrix_norm(jac, 2))
    torch.testing.assert_close(jacext.jacobian_frobenius(cnn, x, method="autograd")[1], jac.square().sum((1, 2)))
    lap = jacext.laplacian(cnn, x, method="autograd", wrt=[0, 5])[1]
    hess = vmap(hessian(lambda xi: cnn(xi.view(1, 1, 4, 3))[0]))(x.flatten(1))
    torch.testing.assert_close(lap, hess[:, :, 0, 0] + hess[:, :, 5, 5])
    square = jacext.divergence(cnn, x, method="autograd", wrt=[1, 2, 3])[1]
    torch.testing.assert_close(square, jac[:, :, [1, 2, 3]].diagonal(dim1=1, dim2=2).sum(1))
    target = torch.tensor([0, 2])
    assert torch.isfinite(jacext.large_margin_loss(cnn, x, target, method="autograd"))
    for call in (lambda: jacext.jacobian_frobenius(cnn, x, method="gram"),
                 lambda: jacext.divergence(cnn, x, method="forward"),
                 lambda: jacext.jacobian_diagonal(cnn, x, method="gram"),
                 lambda: jacext.jacobian_spectral_norm(cnn, x, method="power"),
                 lambda: jacext.jacobian(cnn, x, method="reverse")):
        with pytest.raises(TypeError, match=r"0 \(Conv2d\) at .+test_users_models.py:\d+"):
            call()


def test_heat_equation_example_runs(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "heat_equation.py"), "--quick",
                          "--out", str(tmp_path / "heat.png")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "relative L2 error" in run.stdout and (tmp_path / "heat.png").exists()
