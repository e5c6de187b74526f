"""docs/design.md, "Bad input": every bad input gives a correct result or a clear error."""
import warnings

import pytest
import torch
from torch import nn

import jacext
from jacext.reference import jacobian_frobenius_ref
from conftest import cuda_only
from helpers import make_mlp


@pytest.fixture
def model(device):
    """A float64 model on each test device (tests read the device from its parameters)."""
    return make_mlp((5, 7, 3), nn.Tanh, device=device)


def device_of(model):
    return next(model.parameters()).device


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)])
def test_wrong_rank(model, shape):
    with pytest.raises(ValueError, match="shape"):
        jacext.jacobian_frobenius(model, torch.randn(shape, dtype=torch.float64, device=device_of(model)))


def test_wrong_width(model):
    with pytest.raises(ValueError, match="4 features"):
        jacext.jacobian_frobenius(model, torch.randn(2, 4, dtype=torch.float64, device=device_of(model)))


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="torch.Tensor"):
        jacext.jacobian_frobenius(model, [[0.0] * 5])


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16])
def test_unsupported_dtypes_on_cpu(dtype):
    model = make_mlp((5, 7, 3), nn.Tanh, dtype=dtype if dtype.is_floating_point else torch.float64)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        jacext.jacobian_frobenius(model, torch.ones(2, 5, dtype=dtype))


def test_mixed_dtypes(model):
    with pytest.raises(RuntimeError, match="weight 0 has dtype Double but x has Float"):
        jacext.jacobian_frobenius(model, torch.randn(2, 5, dtype=torch.float32, device=device_of(model)))


@cuda_only
def test_mixed_devices_cuda():
    model = make_mlp((5, 7, 3), nn.Tanh)
    with pytest.raises(RuntimeError, match="is on cpu but x is on cuda"):
        jacext.jacobian_frobenius(model, torch.randn(2, 5, dtype=torch.float64, device="cuda"))


@pytest.mark.parametrize("layout", ["strided", "expanded", "transposed"])
def test_non_contiguous_inputs_are_accepted(model, layout):
    base = torch.randn(4, 10, dtype=torch.float64, device=device_of(model))
    x = {"strided": base[:, ::2], "expanded": base[:1, :5].expand(4, 5), "transposed": base[:, :5].t().contiguous().t()}[layout]
    for method in ("reverse", "forward"):
        y, sq = jacext.jacobian_frobenius(model, x, method=method)
        y_ref, sq_ref = jacobian_frobenius_ref(model, x.contiguous())
        torch.testing.assert_close(sq, sq_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)


def test_non_contiguous_weights_are_accepted(device):
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device).t()  # (7, 5), not contiguous
    w2 = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False)).double().to(device)
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[2].weight.copy_(w2)
    for method in ("reverse", "forward"):
        _, sq = jacext.ops.mlp_jacobian_frobenius(x, [w1, w2], [None, None], ["tanh", "identity"], method=method)
        torch.testing.assert_close(sq, jacobian_frobenius_ref(model, x)[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_nan_and_inf_propagate_per_sample(model, method):
    x = torch.randn(3, 5, dtype=torch.float64, device=device_of(model))
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    y, sq = jacext.jacobian_frobenius(model, x, method=method)
    assert torch.isnan(sq[1]) and torch.isnan(y[1]).all()
    assert torch.isfinite(sq[0]) and torch.isfinite(y[0]).all()
    torch.testing.assert_close(sq[0], jacobian_frobenius_ref(model, x[:1])[1][0])


@pytest.mark.parametrize("module, position", [(nn.AlphaDropout(0.1), 1), (nn.LayerNorm(7), 1), (nn.Conv1d(1, 1, 1), 1)])
def test_unsupported_module_is_named(module, position):
    model = nn.Sequential(nn.Linear(5, 7), module, nn.Linear(7, 3))
    with pytest.raises(TypeError, match=rf"jacext: {position} \({type(module).__name__}\) at .+ does not run on the fused "
                                        "engine.*method='reverse' runs on the fused engine only"):
        jacext.jacobian_frobenius(model, torch.randn(2, 5), method="reverse")


def test_auto_runs_the_generic_path_with_one_warning_naming_the_node():
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    jacext._route._warned.clear()
    with pytest.warns(RuntimeWarning, match=r"1 \(LayerNorm\) at .+test_bad_input.py:\d+ .*generic autograd path"):
        _, sq = jacext.jacobian_frobenius(model, x)
    torch.testing.assert_close(sq, jacobian_frobenius_ref(model, x)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model class and node
        jacext.jacobian_frobenius(model, x)
        jacext.jacobian_frobenius(model, x, method="autograd")  # chosen: nothing to warn about


def test_activation_before_first_linear():
    with pytest.raises(TypeError, match="before the first nn.Linear"):
        jacext.jacobian_frobenius(nn.Sequential(nn.Tanh(), nn.Linear(5, 3)), torch.randn(2, 5), method="reverse")


def test_two_activations_in_a_row():
    with pytest.raises(TypeError, match="follows another activation"):
        jacext.jacobian_frobenius(nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.ReLU()), torch.randn(2, 5), method="reverse")


def test_model_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        jacext.jacobian_frobenius(lambda x: x, torch.randn(2, 5))


def test_no_linear_layer():
    with pytest.raises(TypeError, match="no nn.Linear"):
        jacext.jacobian_frobenius(nn.Sequential(nn.Identity()), torch.randn(2, 5), method="reverse")


def test_unknown_method(model):
    with pytest.raises(ValueError, match="unknown method 'exact'"):
        jacext.jacobian_frobenius(model, torch.randn(2, 5, dtype=torch.float64, device=device_of(model)), method="exact")


def test_estimator_options_on_exact_method(model):
    with pytest.raises(ValueError, match="apply to method='hutchinson' only"):
        jacext.jacobian_frobenius(model, torch.randn(2, 5, dtype=torch.float64, device=device_of(model)), n_proj=4)


@pytest.mark.parametrize("layer", [-1, 2])
def test_layer_out_of_range(model, layer):
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\]"):
        jacext.jacobian(model, torch.randn(2, 5, dtype=torch.float64, device=device_of(model)), layer=layer)


def test_op_level_errors(device):
    x = torch.randn(2, 5, dtype=torch.float64, device=device)
    w1, w2 = torch.randn(7, 5, dtype=torch.float64, device=device), torch.randn(3, 6, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"weight 1 has shape \[3, 6\] but its input has 7 features"):
        jacext.ops.mlp_jacobian_frobenius(x, [w1, w2], [None, None], ["tanh", "identity"])
    with pytest.raises(RuntimeError, match=r"bias 0 must have shape \(7\)"):
        jacext.ops.mlp_jacobian_frobenius(x, [w1], [torch.zeros(3, dtype=torch.float64, device=device)], ["tanh"])
    with pytest.raises(RuntimeError, match="unknown activation code 42"):
        jacext.ops.mlp_jacobian_frobenius(x, [w1], [None], [42])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        jacext.ops.mlp_jacobian_frobenius(x, [w1], [None], ["swish"])
    with pytest.raises(ValueError, match="expected 1 activations"):
        jacext.ops.mlp_jacobian_frobenius(x, [w1], [None], ["tanh", "tanh"])
    with pytest.raises(RuntimeError, match="expected 2 biases"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, [w1, w2], [w1.new_empty(0)], [3, 0], [0.0] * 4, 0)
    with pytest.raises(RuntimeError, match="strategy must be 0"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, [w1], [w1.new_empty(0)], [3], [0.0] * 2, 7)
    with pytest.raises(RuntimeError, match="exactly two layers and a linear output layer"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, [w1, w1.new_ones(3, 7)], [w1.new_empty(0)] * 2, [3, 3],
                                                [0.0] * 4, 3)
    with pytest.raises(RuntimeError, match="at least two layers"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, [w1], [w1.new_empty(0)], [3], [0.0] * 2, 2)


def test_mlp_builder_errors():
    with pytest.raises(ValueError, match="at least an input and an output"):
        jacext.MLP([5])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        jacext.MLP([5, 3, 2], activation="swish")


def test_warnings_about_the_cuda_setup(monkeypatch):
    """Two warnings a GPU user needs and a CPU machine can check: a visible GPU that this build has
    no kernels for, and TF32 (once per process)."""
    import jacext._library as ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if ops.has_cuda_kernels():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops._warn_if_gpu_without_kernels()  # nothing to say
    else:
        with pytest.warns(RuntimeWarning, match="no CUDA kernels"):
            ops._warn_if_gpu_without_kernels()

    monkeypatch.setattr(ops, "_tf32_warned", False)
    matmul = torch.backends.cuda.matmul  # a settings object: assigned, not monkeypatched
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        ops.warn_if_tf32(torch.device("cpu"), torch.float32)  # CPU: no TF32
        assert not ops._tf32_warned
        with pytest.warns(RuntimeWarning, match="TF32"):
            ops.warn_if_tf32(torch.device("cuda"), torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.warn_if_tf32(torch.device("cuda"), torch.float32)  # once
            ops._tf32_warned = False
            matmul.allow_tf32 = False
            ops.warn_if_tf32(torch.device("cuda"), torch.float32)  # off: nothing to say
        assert not ops._tf32_warned
    finally:
        matmul.allow_tf32 = before
