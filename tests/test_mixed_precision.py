"""torch.autocast: jacext's ops run in float32 under autocast (bfloat16 on CPU, float16 / bfloat16
on CUDA), so the only error is the inputs' own rounding to the half type."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacext
from conftest import cuda_only
from helpers import make_mlp

# What the README documents: results equal the float32 results on the rounded inputs to this
# tolerance (float32 arithmetic), and are within HALF_INPUT_RTOL of the unrounded ones.
FLOAT32_TOL = dict(rtol=1e-5, atol=1e-6)
HALF_INPUT_RTOL = 3e-2


def split_model():
    """A bottleneck net whose plan is a split (two ops combined by Python-side bmm)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 48), nn.Tanh(), nn.Linear(48, 3), nn.Tanh(), nn.Linear(3, 48),
                         nn.Tanh(), nn.Linear(48, 40))


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "gram"])
@pytest.mark.parametrize("model_kind", ["plain", "split"])
def test_cpu_bfloat16_autocast_runs_in_float32(method, model_kind):
    model = make_mlp((12, 20, 9), nn.Tanh, dtype=torch.float32) if model_kind == "plain" else split_model()
    n_in = model[0].in_features
    x = torch.randn(6, n_in)
    x_half = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, sq = jacext.jacobian_frobenius(model, x_half, method=method)
        loss = F.mse_loss(y, torch.zeros_like(y)) + sq.mean()
    assert y.dtype == sq.dtype == torch.float32
    grads = torch.autograd.grad(loss, list(model.parameters()))

    y_ref, sq_ref = jacext.jacobian_frobenius(model, x_half.float(), method=method)
    loss_ref = F.mse_loss(y_ref, torch.zeros_like(y_ref)) + sq_ref.mean()
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    torch.testing.assert_close(sq, sq_ref, **FLOAT32_TOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **FLOAT32_TOL)
    _, sq_exact = jacext.jacobian_frobenius(model, x, method=method)
    assert ((sq - sq_exact).abs() / sq_exact).max() < HALF_INPUT_RTOL


def test_cpu_autocast_with_a_bfloat16_model_and_other_ops():
    model = make_mlp((10, 16, 5), nn.SiLU, dtype=torch.float32)
    x = torch.randn(4, 10)
    target = torch.randint(0, 5, (4,))
    ref_loss = jacext.large_margin_loss(model, x.bfloat16().float(), target, layers=(0, 1), top_k=2,
                                        use_approximation=False)
    ref_jac = jacext.jacobian(model, x, layer=(0, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = jacext.large_margin_loss(model, x.bfloat16(), target, layers=(0, 1), top_k=2, use_approximation=False)
        jacs = jacext.jacobian(model, x, layer=(0, 1))
        _, est = jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=3,
                                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, ref_loss, **FLOAT32_TOL)
    for jac, ref in zip(jacs, ref_jac):
        assert jac.dtype == torch.float32
        torch.testing.assert_close(jac, ref, **FLOAT32_TOL)
    assert est.dtype == torch.float32
    # a model held in bfloat16 is cast to float32 by the ops as well
    model16 = make_mlp((10, 16, 5), nn.Tanh, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, sq = jacext.jacobian_frobenius(model16, x)
    _, sq_ref = jacext.jacobian_frobenius(make_mlp((10, 16, 5), nn.Tanh, dtype=torch.bfloat16).float(), x)
    torch.testing.assert_close(sq, sq_ref, **FLOAT32_TOL)


def test_half_inputs_outside_autocast_are_refused_clearly():
    model = make_mlp((6, 8, 3), nn.Tanh, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="float32 or float64, got BFloat16 .* torch.autocast"):
        jacext.jacobian_frobenius(model, torch.randn(2, 6, dtype=torch.bfloat16))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_runs_in_float32(dtype):
    model = make_mlp((12, 20, 9), nn.Tanh, dtype=torch.float32, device="cuda")
    x = torch.randn(6, 12, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        y, sq = jacext.jacobian_frobenius(model, x)
    _, sq_ref = jacext.jacobian_frobenius(model, x.float())
    assert sq.dtype == torch.float32
    torch.testing.assert_close(sq, sq_ref, **FLOAT32_TOL)


def test_autocast_with_tiles_and_a_realistic_batch():
    """The planner tiles an everyday-width batch (the op's keyword-only tile argument): autocast's
    rule must pass it on. Values against float32 on the rounded inputs; the plan's memory estimate
    counts the float32 the op runs in, not the half input."""
    torch.manual_seed(0)
    model = jacext.MLP([64, 96, 96, 10])
    x = torch.randn(64, 64).bfloat16()
    spec = jacext.parse_model(model)
    strategy = jacext.ops.resolve_strategy("auto", spec.widths, batch=64, output_linear=True)
    assert jacext.planner.tile_size(spec.widths, 64, strategy, 4) > 0  # the case is tiled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, sq = jacext.jacobian_frobenius(model, x)
        J = jacext.jacobian(model, x)
    y_ref, sq_ref = jacext.jacobian_frobenius(model, x.float())
    torch.testing.assert_close(sq, sq_ref, **FLOAT32_TOL)
    torch.testing.assert_close(J, jacext.jacobian(model, x.float()), **FLOAT32_TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert jacext.ops.op_element_size(x) == 4
    assert jacext.ops.op_element_size(x) == 2


def test_double_backward_under_autocast_runs_in_float32():
    """The backward op's own backward (a composite of torch ops) under autocast: float32 like the rest."""
    model = make_mlp((8, 12, 4), nn.Tanh, dtype=torch.float32)
    x = torch.randn(5, 8)

    def second_order(x):
        xg = x.clone().requires_grad_()
        _, sq = jacext.jacobian_frobenius(model, xg, method="reverse")
        (gx,) = torch.autograd.grad(sq.sum(), xg, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), list(model.parameters()))

    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inputs: only the composite could round
        got = second_order(x)
    want = second_order(x)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, **FLOAT32_TOL)
