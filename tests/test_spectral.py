"""jacobian_spectral_norm against torch.linalg.matrix_norm(J, 2) of torch.func Jacobians in float64:
both paths, every layer, values and gradients; the power path's tolerance; repeated top singular
values; warm starts; J = 0, NaN, empty batches, bad input; torch.compile; the example."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import jacext
from jacext.reference import spectral_norm_ref
from helpers import make_mlp, weighted_objective

# m <= n_layer (J J^T) and m > n_layer (J^T J) at some layer each; depth 1-4
NETS = [(5, 9, 7, 3), (4, 6, 11, 13), (3, 8, 2, 9, 6), (6, 4)]
CASES = [(w, l) for w in NETS for l in range(len(w) - 1)]
ACTIVATIONS = {"tanh": nn.Tanh, "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0), "relu": nn.ReLU}
TIGHT = dict(tol=1e-12, n_iter=3000)  # the power path run to float64's precision


def check_against_reference(model, x, layer, method, rtol=1e-9, **options):
    params = list(model.parameters())
    xg = x.clone().requires_grad_()
    y, s = jacext.jacobian_spectral_norm(model, xg, layer, method=method, **options)
    grads = torch.autograd.grad(weighted_objective(y, s), [xg] + params)
    x_ref = x.clone().requires_grad_()
    y_ref, s_ref = spectral_norm_ref(model, x_ref, layer)
    grads_ref = torch.autograd.grad(weighted_objective(y_ref, s_ref), [x_ref] + params)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=rtol, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["exact", "power"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("widths, layer", CASES, ids=[f"{'-'.join(map(str, w))}@{l}" for w, l in CASES])
def test_value_and_gradients_match_matrix_norm(widths, layer, activation, method, device):
    model = make_mlp(widths, ACTIVATIONS[activation], device=device, seed=layer)
    x = torch.randn(6, widths[0], dtype=torch.float64, device=device)
    check_against_reference(model, x, layer, method, **(TIGHT if method == "power" else {}))


def test_output_activation_and_layers_without_bias(device):
    model = make_mlp((5, 8, 6, 7), nn.SiLU, bias=[True, False, True], output_activation=nn.Sigmoid, device=device)
    x = torch.randn(5, 5, dtype=torch.float64, device=device)
    for method in ("exact", "power"):
        for layer in (0, 1):
            check_against_reference(model, x, layer, method, **(TIGHT if method == "power" else {}))


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_power_path_reaches_its_tolerance(tol):
    """s is a lower bound of ||J||_2 within tol (of order tol^2 with a gap), the gradient within
    a few tol of the exact one, and more work for a tighter tol."""
    model = make_mlp((8, 16, 16, 12), nn.Tanh, seed=3)
    x = torch.randn(16, 8, dtype=torch.float64)
    _, s_ref = spectral_norm_ref(model, x)
    params = list(model.parameters())[:-1]  # J does not depend on the output bias
    grads_ref = torch.autograd.grad(s_ref.sum(), params)
    _, s = jacext.jacobian_spectral_norm(model, x, method="power", tol=tol, n_iter=10_000,
                                         generator=torch.Generator().manual_seed(0))
    assert (s <= s_ref * (1 + 1e-12)).all()
    assert ((s_ref - s) / s_ref).max() <= tol
    grads = torch.autograd.grad(s.sum(), params)
    error = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, grads_ref))
    assert error <= 100 * tol, error
    if tol == 1e-2:  # a loose tolerance does stop early: the result is not the exact one
        assert ((s_ref - s) / s_ref).max() > 1e-10


def test_unconverged_samples_warn():
    model = make_mlp((8, 16, 16, 12), nn.Tanh, seed=3)
    x = torch.randn(16, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"left \d+ of 16 samples above tol=1e-12 after n_iter=2"):
        _, s = jacext.jacobian_spectral_norm(model, x, method="power", tol=1e-12, n_iter=2)
    assert (s <= spectral_norm_ref(model, x)[1] * (1 + 1e-12)).all()  # still a lower bound


def test_warm_start_from_returned_vectors():
    """The previous call's vectors converge at once (no warning with n_iter=1); a cold start does not."""
    model = make_mlp((8, 16, 16, 12), nn.Tanh, seed=3)
    x = torch.randn(16, 8, dtype=torch.float64)
    _, s, u = jacext.jacobian_spectral_norm(model, x, method="power", return_vectors=True, **TIGHT)
    torch.testing.assert_close(s, spectral_norm_ref(model, x)[1], rtol=1e-10, atol=0)
    assert u.shape == (16, 12) and not u.requires_grad
    torch.testing.assert_close(u.norm(dim=1), torch.ones(16, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, warm = jacext.jacobian_spectral_norm(model, x, method="power", tol=1e-6, n_iter=1, init=u)
    torch.testing.assert_close(warm, s, rtol=1e-11, atol=0)
    with pytest.warns(RuntimeWarning):
        jacext.jacobian_spectral_norm(model, x, method="power", tol=1e-6, n_iter=1,
                                      generator=torch.Generator().manual_seed(0))
    # the exact path's vectors are the same top left singular vectors (up to sign)
    _, _, u_exact = jacext.jacobian_spectral_norm(model, x, method="exact", return_vectors=True)
    torch.testing.assert_close((u * u_exact).sum(1).abs(), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-8)


def test_exact_path_vectors_when_m_exceeds_the_layer_width():
    model = make_mlp((3, 8, 10), nn.Tanh)
    x = torch.randn(4, 3, dtype=torch.float64)
    jac = jacext.jacobian(model, x)
    _, s, u = jacext.jacobian_spectral_norm(model, x, method="exact", return_vectors=True)
    u_ref = torch.linalg.svd(jac).U[:, :, 0]
    torch.testing.assert_close((u * u_ref).sum(1).abs(), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("method", ["exact", "power"])
def test_repeated_top_singular_value(method):
    """J = W with all singular values 1.7 (W = 1.7 Q): s is exact, and the gradient w.r.t. W is
    u v^T for one top singular pair: nuclear norm 1 and <grad, W> = s (a subgradient of ||W||_2),
    as torch.linalg.matrix_norm's own gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5)).double()
    with torch.no_grad():
        model[0].weight.copy_(1.7 * torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q)
    x = torch.randn(1, 5, dtype=torch.float64)
    _, s = jacext.jacobian_spectral_norm(model, x, method=method)
    torch.testing.assert_close(s, torch.tensor([1.7], dtype=torch.float64), rtol=1e-12, atol=0)
    w = model[0].weight
    (grad,) = torch.autograd.grad(s.sum(), [w])
    (grad_ref,) = torch.autograd.grad(torch.linalg.matrix_norm(w, 2), [w])
    for g in (grad, grad_ref):
        torch.testing.assert_close(torch.linalg.matrix_norm(g, "nuc"), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close((g * w).sum(), torch.tensor(1.7, dtype=torch.float64))


def test_auto_picks_by_predicted_cost_and_explain_says_so():
    x = torch.randn(32, 64)
    small_m = jacext.MLP([64, 128, 128, 10])
    plan = jacext.explain(small_m, x, quantity="spectral_norm")
    assert plan.choice == "exact" and "runs exact: eigenvalues of J J^T (10 x 10)" in repr(plan)
    assert plan.costs["exact"] < plan.costs["power"]
    large_m = jacext.MLP([64, 128, 128, 300])
    plan = jacext.explain(large_m, x, quantity="spectral_norm", n_iter=20)
    assert plan.choice == "power" and "runs power iteration (<= 20 iterations" in repr(plan)
    narrow_layer = jacext.MLP([64, 8, 128, 300])  # J^T J is 8 x 8 at layer 1
    plan = jacext.explain(narrow_layer, x, quantity="spectral_norm", layer=1)
    assert plan.choice == "exact" and "J^T J (8 x 8)" in repr(plan)
    forced = jacext.explain(small_m, x, method="power", quantity="spectral_norm")
    assert forced.choice == "power"


@pytest.mark.parametrize("method", ["exact", "power"])
def test_zero_jacobian_nan_and_empty_batch(method, device):
    model = make_mlp((5, 7, 6), nn.ReLU, device=device)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU off: J = 0
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    _, s = jacext.jacobian_spectral_norm(model, x, method=method)
    assert (s == 0).all()
    grads = torch.autograd.grad(s.sum(), [x] + list(model.parameters()))
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)

    model = make_mlp((5, 7, 6), nn.Tanh, device=device)
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    x[1, 2] = float("nan")
    y, s = jacext.jacobian_spectral_norm(model, x, method=method)
    assert torch.isnan(s[1]) and torch.isnan(y[1]).all()
    torch.testing.assert_close(s[[0, 2]], spectral_norm_ref(model, x[[0, 2]])[1], rtol=1e-6, atol=0)

    y, s = jacext.jacobian_spectral_norm(model, x[:0], method=method)
    assert y.shape == (0, 6) and s.shape == (0,)


def test_bad_input():
    model = make_mlp((5, 7, 3), nn.Tanh)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 1\]"):
        jacext.jacobian_spectral_norm(model, x, layer=2)
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        jacext.jacobian_spectral_norm(model, x, method="svd")
    with pytest.raises(ValueError, match="n_iter must be a positive integer"):
        jacext.jacobian_spectral_norm(model, x, n_iter=0)
    with pytest.raises(ValueError, match="tol must be a number >= 0"):
        jacext.jacobian_spectral_norm(model, x, tol=-1.0)
    with pytest.raises(ValueError, match=r"init must have shape \(2, 3\)"):
        jacext.jacobian_spectral_norm(model, x, init=torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="init must be a torch.Tensor"):
        jacext.jacobian_spectral_norm(model, x, init=[[1.0, 0.0, 0.0]] * 2)
    with pytest.raises(ValueError, match="4 features"):
        jacext.jacobian_spectral_norm(model, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="unsupported module"):  # the power path is the engine's
        jacext.jacobian_spectral_norm(nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3)).double(), x, method="power")
    for method in ("exact", "power"):
        with pytest.raises(RuntimeError, match="weight 0 has dtype"):
            jacext.jacobian_spectral_norm(model, x.float(), method=method)
    with pytest.raises(ValueError, match="unknown quantity 'nuclear'"):
        jacext.explain(model, x, quantity="nuclear")
    with pytest.raises(TypeError, match=r"\['layer'\] do not apply to quantity='frobenius'"):
        jacext.explain(model, x, layer=1)


def test_zero_init_rows_are_replaced_by_a_draw():
    model = make_mlp((5, 7, 3), nn.Tanh)
    x = torch.randn(2, 5, dtype=torch.float64)
    init = torch.zeros(2, 3, dtype=torch.float64)
    _, s = jacext.jacobian_spectral_norm(model, x, method="power", init=init, **TIGHT)
    torch.testing.assert_close(s, spectral_norm_ref(model, x)[1], rtol=1e-10, atol=0)


class SpectralNorm(nn.Module):
    """s of the wrapped model as a module, so that torch.func.functional_call can swap its parameters."""

    def __init__(self, model, method, second_order=False):
        super().__init__()
        self.model, self.method, self.second_order = model, method, second_order

    def forward(self, x):
        options = dict(TIGHT, second_order=True) if self.second_order else TIGHT
        return jacext.jacobian_spectral_norm(self.model, x, method=self.method, **options)[1]


def test_gradcheck_and_exact_gradgradcheck():
    model = make_mlp((3, 5, 4), nn.Tanh)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def fn(method, second_order=False):
        module = SpectralNorm(model, method, second_order)
        names = [name for name, _ in module.named_parameters()]
        return lambda x, *p: torch.func.functional_call(module, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(fn("exact"), (x, *params))  # first order: u^T dJ v
    assert torch.autograd.gradcheck(fn("exact", True), (x, *params))
    assert torch.autograd.gradgradcheck(fn("exact", True), (x, *params))
    assert torch.autograd.gradcheck(fn("power"), (x, *params))
    with pytest.raises(ValueError, match="second_order"):
        jacext.jacobian_spectral_norm(model, x, method="power", second_order=True)


def test_autocast_runs_in_float32():
    model = jacext.MLP([6, 9, 7, 4], activation="tanh")
    x = torch.randn(5, 6)
    for method in ("exact", "power"):
        _, s = jacext.jacobian_spectral_norm(model, x, method=method, tol=1e-6, n_iter=500)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, s_autocast = jacext.jacobian_spectral_norm(model, x, method=method, tol=1e-6, n_iter=500)
        assert s_autocast.dtype == torch.float32
        torch.testing.assert_close(s_autocast, s, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # tol=0: eager runs the 3 rounds too, and warns
def test_compiled_fullgraph_matches_eager():
    """Both paths trace into one graph (fullgraph=True). aot_eager: the capture and the ops' fake
    kernels are what is new here; inductor's code for these ops is test_autograd's compiled step."""
    torch.manual_seed(0)
    model = jacext.MLP([6, 9, 7, 4], activation="tanh")
    x = torch.randn(5, 6)
    u0 = torch.randn(5, 4)

    def loss_fn(x, u0):
        exact = jacext.jacobian_spectral_norm(model, x, method="exact")[1]
        power = jacext.jacobian_spectral_norm(model, x, layer=1, method="power", n_iter=3, tol=0.0, init=u0)[1]
        return exact.mean() + power.mean()

    eager = loss_fn(x, u0)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, u0)
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_example_quick():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "lipschitz_digits.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [l for l in run.stdout.splitlines() if l.startswith("lambda")]
    assert len(lines) == 2 and all("test accuracy" in l and "mean ||J||_2" in l for l in lines), run.stdout
