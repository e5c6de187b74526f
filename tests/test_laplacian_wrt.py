"""The Laplacian over chosen input features (jacext.laplacian(..., wrt=)) and the op's tangent
rows (mlp_laplacian's directions and laplacian_rows), against torch.func in float64: values and
gradients, gradcheck, gradgradcheck, tiles, the empty batch and bad input."""
import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext
from jacext import activations as act
from jacext.layouts import laplacian_layout
from helpers import make_mlp
from test_laplacian import TOL, grads, leaves_of, op_function, op_inputs, weights_like

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0), "gelu": nn.GELU,
               "relu": nn.ReLU}
# wrt on 4 features, and the features each names
WRT = {"int": (2, [0, 1]), "slice": (slice(1, None, 2), [1, 3]), "unsorted": ([3, 0, 2], [3, 0, 2]),
       "single": ([2], [2]), "leading-unsorted": ([1, 0], [0, 1]), "all": (None, [0, 1, 2, 3])}


def reference(model, x, directions, rows):
    """(y, J V^T, sum_{j<rows} v_j^T H v_j) by torch.func (vmap(jacrev), vmap(hessian)); directions
    (B, c, n_0)."""
    def one(xi):
        return model(xi.unsqueeze(0)).squeeze(0)

    jac = vmap(jacrev(one))(x)  # (B, m, n_0)
    hess = vmap(hessian(one))(x)  # (B, m, n_0, n_0)
    v = directions[:, :rows]
    lap = torch.einsum("bjk,bikl,bjl->bi", v, hess, v)
    return model(x), jac @ directions.transpose(1, 2), lap


def unit_rows(features, n0, batch):
    return torch.eye(n0, dtype=torch.float64)[features].expand(batch, -1, -1)


@pytest.mark.parametrize("gradient", [False, True], ids=["lap", "lap+grad"])
@pytest.mark.parametrize("wrt", WRT)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_wrt_matches_torch_func(activation, wrt, gradient, device):
    """Values and the gradients of a weighted objective on (y, grad, lap) w.r.t. x and the
    parameters; linear and sigmoid outputs, with and without bias."""
    index = list(ACTIVATIONS).index(activation) + list(WRT).index(wrt)
    output = nn.Sigmoid if index % 2 else None
    model = make_mlp((4, 6, 5, 2), ACTIVATIONS[activation], bias=index % 3 != 1, output_activation=output,
                     device=device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    leaves = [x, *model.parameters()]
    value, features = WRT[wrt]
    y_ref, _, lap_ref = reference(model, x, unit_rows(features, 4, 5).to(device), len(features))
    _, grad_ref, _ = reference(model, x, unit_rows(list(range(4)), 4, 5).to(device), 4)  # every feature
    out = jacext.laplacian(model, x, return_gradient=gradient, wrt=value)
    if gradient:
        y, grad, lap = out
        torch.testing.assert_close(grad, grad_ref, **TOL)
    else:
        y, lap = out
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(lap, lap_ref, **TOL)
    wy, wg, wl = weights_like(y_ref, grad_ref, lap_ref)
    objective = (wy * y).sum() + (wl * lap).sum() + ((wg * grad).sum() if gradient else 0)
    expected = (wy * y_ref).sum() + (wl * lap_ref).sum() + ((wg * grad_ref).sum() if gradient else 0)
    for g, g_ref in zip(grads(objective, leaves), grads(expected, leaves)):
        torch.testing.assert_close(g, g_ref, **TOL)


def test_heat_equation_residual(device):
    """u_t - u_xx of a net on (x, t): the residual's value and its parameter gradient."""
    model = make_mlp((2, 8, 8, 1), nn.Tanh, device=device)
    xt = torch.randn(9, 2, dtype=torch.float64, device=device, requires_grad=True)
    _, grad, lap = jacext.laplacian(model, xt, return_gradient=True, wrt=[0])
    residual = grad[:, 0, 1] - lap[:, 0]

    def u(p):
        return model(p.unsqueeze(0)).squeeze()

    hess = vmap(hessian(u))(xt)
    residual_ref = vmap(jacrev(u))(xt)[:, 1] - hess[:, 0, 0]
    torch.testing.assert_close(residual, residual_ref, **TOL)
    params = list(model.parameters())
    for g, g_ref in zip(grads(residual.square().mean(), params), grads(residual_ref.square().mean(), params)):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("batch_rows", ["per-sample", "broadcast"])
@pytest.mark.parametrize("gradient", [False, True], ids=["lap", "lap+grad"])
def test_op_directions_match_torch_func(gradient, batch_rows, device):
    """Arbitrary tangent rows (more rows than features), the Laplacian over the first k."""
    model = make_mlp((3, 6, 5, 2), nn.SiLU, output_activation=nn.Tanh, device=device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(4 if batch_rows == "per-sample" else 1, 5, 3, generator=g, dtype=torch.float64).to(device)
    spec = jacext.parse_model(model)
    out = jacext.ops.mlp_laplacian(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                   return_gradient=gradient, directions=v, laplacian_rows=2)
    y_ref, grad_ref, lap_ref = reference(model, x, v.expand(4, -1, -1), 2)
    torch.testing.assert_close(out[0], y_ref, **TOL)
    torch.testing.assert_close(out[-1], lap_ref, **TOL)
    if gradient:
        torch.testing.assert_close(out[1], grad_ref, **TOL)
    leaves = [x, *model.parameters()]
    objective = out[-1].square().sum() + (out[1].sin().sum() if gradient else 0)
    expected = lap_ref.square().sum() + (grad_ref.sin().sum() if gradient else 0)
    for got, want in zip(grads(objective, leaves), grads(expected, leaves)):
        torch.testing.assert_close(got, want, **TOL)


def directions_for(x, rows=4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(x.shape[0], rows, x.shape[1], generator=g, dtype=torch.float64).to(x.device)


@pytest.mark.parametrize("activation, gradient, rows", [
    ("tanh", True, "directions"), ("softplus", False, "directions"), ("gelu_tanh", True, "directions"),
    ("relu", False, "directions"), ("silu", True, "unit vectors"), ("sigmoid", False, "unit vectors")])
def test_op_gradcheck_and_gradgradcheck_with_directions(activation, gradient, rows, device):
    """The op's tangent rows: the caller's directions, or its unit vectors, the Laplacian over the
    first two."""
    x, weights, biases, codes, params = op_inputs(activation, (3, 4, 3, 2), (True, False, True), device,
                                                  output=act.IDENTITY if not gradient else act.SIGMOID)
    v = directions_for(x) if rows == "directions" else None

    def fn(x, *flat):
        y, grad, lap, _ = op_function(torch.ops.jacext.mlp_laplacian, weights, biases, codes, params, gradient, v, 2,
                                      outputs=4)(x, *flat)
        return (y, grad, lap) if gradient else (y, lap)

    leaves = leaves_of(x, weights, biases)
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("gradient", [False, True])
def test_only_the_needed_rows_are_carried(gradient):
    """Without the gradient the op carries the k rows of the Laplacian alone; with it, every row."""
    model = make_mlp((5, 6, 4, 1), nn.Tanh)
    x = torch.randn(3, 5, dtype=torch.float64)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    for directions, rows in [(None, 2), (directions_for(x, 7), 3)]:
        _, _, _, saved = torch.ops.jacext.mlp_laplacian(x, spec.weights, biases, spec.activations, spec.act_params,
                                                        gradient, directions, rows)
        hidden = saved[3 * 3]  # after act', act'', act''' of the 3 layers: the carry C_1 (B, rows, n_1)
        columns = (5 if directions is None else 7) if gradient else rows
        assert hidden.shape == (3, 1 + columns + 1, 6)
        assert laplacian_layout(spec.widths, spec.activations, gradient, None if directions is None else 7,
                                rows).columns == columns


def test_tiles_give_the_whole_batch_result(device):
    """The CPU runs tiles of samples; every tile size gives the same with directions."""
    model = make_mlp((3, 9, 7, 3), nn.Tanh, device=device)
    x = torch.randn(23, 3, dtype=torch.float64, device=device, requires_grad=True)
    v = directions_for(x)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    leaves = [x, *model.parameters()]
    results = []
    for tile in (0, 1, 5, 23):
        y, grad, lap, _ = torch.ops.jacext.mlp_laplacian(x, spec.weights, biases, spec.activations, spec.act_params,
                                                         True, v, 2, tile=tile)
        results.append((y, grad, lap, grads(y.sum() + grad.sin().sum() + lap.square().sum(), leaves)))
    for *outs, gs in results[1:]:
        for out, ref in zip(outs, results[0][:3]):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, g_ref in zip(gs, results[0][3]):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_empty_batch(device):
    model = make_mlp((3, 6, 2), nn.Tanh, device=device)
    x = torch.empty(0, 3, dtype=torch.float64, device=device, requires_grad=True)
    y, grad, lap = jacext.laplacian(model, x, return_gradient=True, wrt=[2])
    assert y.shape == (0, 2) and grad.shape == (0, 2, 3) and lap.shape == (0, 2)
    for g in grads(lap.sum() + grad.sum(), [x, *model.parameters()]):
        assert not g.any()


def test_vmap_over_the_samples():
    """torch.func.vmap folds the samples into the op's batch, the directions with them."""
    model = make_mlp((3, 6, 2), nn.Tanh)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    got = vmap(lambda xi: jacext.laplacian(model, xi, return_gradient=True, wrt=[2, 0]))(x)
    want = jacext.laplacian(model, x.reshape(8, 3), return_gradient=True, wrt=[2, 0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, **TOL)


def test_bad_wrt():
    model = make_mlp((3, 4, 1), nn.Tanh)
    x = torch.randn(2, 3, dtype=torch.float64)
    for wrt, message in [([0, 0], "repeated"), ([3], "outside"), ([-1], "outside"), ([], "no feature"),
                         (slice(3, None), "no feature"), (0, r"\[1, 3\]"), (4, r"\[1, 3\]")]:
        with pytest.raises(ValueError, match=message):
            jacext.laplacian(model, x, wrt=wrt)
    for wrt in (True, "x", 1.0, [0.5]):
        with pytest.raises(TypeError, match="wrt must (be|hold integer)"):
            jacext.laplacian(model, x, wrt=wrt)
    spec = jacext.parse_model(model)
    args = (x, spec.weights, spec.biases, spec.activations, spec.act_params)
    with pytest.raises(ValueError, match="laplacian_rows must be in"):
        jacext.ops.mlp_laplacian(*args, laplacian_rows=4)
    with pytest.raises(ValueError, match="directions must have shape"):
        jacext.ops.mlp_laplacian(*args, directions=torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="laplacian_rows must be -1"):
        torch.ops.jacext.mlp_laplacian(*args[:2], jacext.ops.bias_tensors(spec.biases, spec.weights), *args[3:],
                                       False, None, 0)


def test_explain_shows_the_chosen_features():
    model = make_mlp((3, 16, 16, 1), nn.Tanh, dtype=torch.float32)
    x = torch.rand(64, 3)
    plan = jacext.explain(model, x, quantity="laplacian", wrt=[2])
    assert plan.layout.columns == 1 and "over features [2]" in repr(plan)  # [h; 1 column; Delta]
    assert jacext.explain(model, x, quantity="laplacian", wrt=[2], return_gradient=True).layout.columns == 3
    with pytest.raises(ValueError, match="wrt applies to the Laplacian"):
        jacext.explain(make_mlp((3, 4, 3), nn.Tanh), x, quantity="divergence", wrt=[0])
