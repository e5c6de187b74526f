"""The CUDA kernels, executed on the CPU: jacext._C_cuda_emulated (built with JACEXT_CUDA_EMULATION=1,
docs/cuda-emulation.md) registers the CUDA Kernels' ops under torch.ops.jacext_cuda_emulated for CPU
tensors; every op's outputs, forward and backward, must equal the CPU ops' on the same inputs."""
import itertools

import pytest
import torch

import jacext  # noqa: F401  (registers torch.ops.jacext)
from jacext import activations as A

try:
    import jacext._C_cuda_emulated  # noqa: F401
except ImportError:
    pytestmark = pytest.mark.skip(reason="the emulated CUDA kernels are not built (JACEXT_CUDA_EMULATION=1)")

cpu_ops = torch.ops.jacext
emulated_ops = torch.ops.jacext_cuda_emulated

# Every activation code with non-default parameters where it has any (two per layer).
ACTIVATIONS = {
    "identity": (A.IDENTITY, 0.0, 0.0), "relu": (A.RELU, 0.0, 0.0), "leaky_relu": (A.LEAKY_RELU, 0.2, 0.0),
    "tanh": (A.TANH, 0.0, 0.0), "sigmoid": (A.SIGMOID, 0.0, 0.0), "softplus": (A.SOFTPLUS, 1.5, 2.0),
    "elu": (A.ELU, 0.7, 0.0), "gelu": (A.GELU, 0.0, 0.0), "gelu_tanh": (A.GELU_TANH, 0.0, 0.0),
    "silu": (A.SILU, 0.0, 0.0), "smooth_leaky_relu": (A.SMOOTH_LEAKY_RELU, 0.3, 0.0),
}
DTYPES = [torch.float64, torch.float32]
# 0, 1, and a count of elements that is no multiple of the 256-thread block; test_large_grid adds a
# batch whose grids have several blocks for each of an H100's 132 SMs.
BATCHES = [0, 1, 37]


def assert_same(emulated, cpu, what):
    """float64 to 1e-12, float32 to a few ulp of the output's scale; lists and None elementwise."""
    if isinstance(cpu, (list, tuple)):
        assert len(emulated) == len(cpu), what
        for i, (e, c) in enumerate(zip(emulated, cpu)):
            assert_same(e, c, f"{what}[{i}]")
        return
    if cpu is None:
        assert emulated is None, what
        return
    assert emulated.shape == cpu.shape and emulated.dtype == cpu.dtype, what
    if cpu.numel() == 0:
        return
    tol = 1e-12 if cpu.dtype == torch.float64 else 8 * torch.finfo(torch.float32).eps
    scale = max(1.0, cpu.abs().max().item())
    torch.testing.assert_close(emulated, cpu, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def mlp(widths, activation, dtype, bias=True, seed=0, layout="contiguous"):
    """(weights, biases, codes, params) of a net with `activation` after every hidden layer and a
    linear output; layout "noncontiguous" gives transposed-storage weights and strided biases."""
    g = torch.Generator().manual_seed(seed)
    code, p0, p1 = ACTIVATIONS[activation]
    weights, biases = [], []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 1.5 / n_in ** 0.5
        b = torch.randn(n_out, generator=g, dtype=torch.float64) * 0.5
        if layout == "noncontiguous":
            w = w.t().contiguous().t()
            b = torch.stack([b, b], 1)[:, 0]
        weights.append(w.to(dtype))
        biases.append(b.to(dtype) if bias else torch.empty(0, dtype=dtype))
    codes = [code] * (len(widths) - 2) + [A.IDENTITY]
    params = [p for _ in codes[:-1] for p in (p0, p1)] + [0.0, 0.0]
    return weights, biases, codes, params


def inputs(batch, n, dtype, layout="contiguous", seed=1):
    g = torch.Generator().manual_seed(seed)
    if layout == "broadcast":  # stride 0 over the batch
        return torch.randn(1, n, generator=g, dtype=torch.float64).to(dtype).expand(batch, n)
    if layout == "noncontiguous":
        return torch.randn(batch, 2 * n, generator=g, dtype=torch.float64).to(dtype)[:, ::2]
    return torch.randn(batch, n, generator=g, dtype=torch.float64).to(dtype)


def grads_like(tensors, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in tensors]


def both(name, *args, **kwargs):
    """The op's outputs from the emulated CUDA kernels and from the CPU kernels."""
    return getattr(emulated_ops, name)(*args, **kwargs), getattr(cpu_ops, name)(*args, **kwargs)


# --- the Jacobian ops -----------------------------------------------------------------------------

def check_frobenius(x, net, strategy, projections=None, masks=(), residual=None, conditioning=(None, None)):
    kw = {"masks": list(masks), "residual": residual, "sample_biases": conditioning[0], "gates": conditioning[1]}
    (y, sq, saved), cpu = both("mlp_jacobian_frobenius", x, *net, strategy, projections, **kw)
    assert_same((y, sq, saved), cpu, f"frobenius strategy {strategy}")
    grad_y, grad_sq = grads_like([y, sq])
    for input_grad in (True, False):
        args = (grad_y, grad_sq, None, x, *net, 0, strategy, saved, [], projections)
        emulated, cpu_grads = both("mlp_jacobian_backward", *args, input_grad=input_grad, **kw)
        assert_same(emulated, cpu_grads, f"frobenius backward strategy {strategy} input_grad={input_grad}")
    # the backward of the value alone, and of the penalty alone
    assert_same(*both("mlp_jacobian_backward", grad_y, None, None, x, *net, 0, strategy, saved, [], projections, **kw),
                "backward of y only")
    assert_same(*both("mlp_jacobian_backward", None, grad_sq, None, x, *net, 0, strategy, saved, [], projections,
                      **kw), "backward of sq only")


def dropout_masks(batch, widths, dtype, layers, p=0.3, seed=5):
    """One dropout mask (0 or 1/(1-p)) per layer in `layers`, an empty tensor for the others."""
    g = torch.Generator().manual_seed(seed)
    return [((torch.rand(batch, n, generator=g) > p).to(dtype) / (1 - p)) if i in layers
            else torch.empty(0, dtype=dtype) for i, n in enumerate(widths[1:])]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_frobenius_every_activation(activation, dtype):
    net = mlp([6, 9, 7, 4], activation, dtype)
    x = inputs(5, 6, dtype)
    for strategy in (0, 1, 2, 4):
        check_frobenius(x, net, strategy)
    check_frobenius(x, mlp([6, 9, 4], activation, dtype), 3)  # one hidden layer, linear output


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("batch", BATCHES)
def test_frobenius_batch_sizes(batch, dtype):
    net = mlp([6, 9, 7, 4], "tanh", dtype)
    x = inputs(batch, 6, dtype)
    for strategy in (0, 1, 2, 4):
        check_frobenius(x, net, strategy)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["broadcast", "noncontiguous"])
def test_frobenius_strided_inputs(layout, dtype):
    net = mlp([6, 9, 7, 4], "silu", dtype, layout=layout if layout == "noncontiguous" else "contiguous")
    x = inputs(11, 6, dtype, layout)
    for strategy in (0, 1, 2, 4):
        check_frobenius(x, net, strategy)
    g = torch.Generator().manual_seed(3)
    projections = torch.randn(1, 3, 4, generator=g, dtype=torch.float64).to(dtype).expand(11, 3, 4)
    for strategy in (0, 2):
        check_frobenius(x, net, strategy, projections)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["gelu", "softplus"])
def test_frobenius_projections_and_no_bias(activation, dtype):
    net = mlp([6, 9, 7, 4], activation, dtype, bias=False)
    x = inputs(13, 6, dtype)
    g = torch.Generator().manual_seed(4)
    projections = torch.randn(13, 2, 4, generator=g, dtype=torch.float64).to(dtype)
    for strategy in (0, 2):
        check_frobenius(x, net, strategy, projections)
        check_frobenius(x, net, strategy)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "elu", "smooth_leaky_relu"])
def test_jacobian_every_layer_and_strategy(activation, dtype):
    net = mlp([5, 8, 7, 3], activation, dtype)
    x = inputs(9, 5, dtype, "noncontiguous")
    cases = [(layer, strategy, False) for layer in range(3) for strategy in (0, 1)] + [(0, 2, True)]
    for layer, strategy, gram in cases:
        (y, jac, saved), cpu = both("mlp_jacobian", x, *net, layer, strategy, gram=gram)
        what = f"jacobian layer {layer} strategy {strategy}"
        assert_same((y, jac, saved), cpu, what)
        grad_y, grad_jac = grads_like([y, jac])
        args = (grad_y, None, grad_jac, x, *net, layer, strategy, saved, [])
        assert_same(*both("mlp_jacobian_backward", *args), what + " backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["identity", "tanh", "relu", "softplus"])
def test_dropout_masks(activation, dtype):
    widths = [6, 9, 7, 4]
    net = mlp(widths, activation, dtype)
    x = inputs(11, 6, dtype)
    hidden = dropout_masks(11, widths, dtype, (0, 1))
    for strategy in (0, 1, 2, 4):
        check_frobenius(x, net, strategy, masks=hidden)
    for strategy in (0, 2):  # a mask on the (linear) output layer too
        check_frobenius(x, net, strategy, masks=dropout_masks(11, widths, dtype, (0, 2)))
    g = torch.Generator().manual_seed(3)
    check_frobenius(x, net, 0, torch.randn(11, 3, 4, generator=g, dtype=torch.float64).to(dtype), masks=hidden)
    check_frobenius(x, mlp([6, 9, 4], activation, dtype), 3, masks=dropout_masks(11, [6, 9, 4], dtype, (0,)))
    for layer, strategy in ((0, 0), (1, 1)):
        (y, jac, saved), cpu = both("mlp_jacobian", x, *net, layer, strategy, masks=hidden)
        assert_same((y, jac, saved), cpu, f"masked jacobian layer {layer} strategy {strategy}")
        grad_y, grad_jac = grads_like([y, jac])
        args = (grad_y, None, grad_jac, x, *net, layer, strategy, saved, [])
        assert_same(*both("mlp_jacobian_backward", *args, masks=hidden), "masked jacobian backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("residual", [[0, 1, 1, 0], [-1, 1, 2, -1], [-1, -1, 0, 2]],
                         ids=["input-and-output", "hidden", "two-layer-blocks"])
def test_jacobian_residual(residual, activation, dtype):
    """Residual skips in the Jacobian ops (reverse and forward): the penalty, with projections and masks,
    and the Jacobians with the reverse carries' gradients (which the skips pass back)."""
    widths = [4, 4, 4, 4, 4]
    net = mlp(widths, activation, dtype)
    x = inputs(11, 4, dtype)
    for strategy in (0, 1):
        check_frobenius(x, net, strategy, residual=residual)
        check_frobenius(x, net, strategy, masks=dropout_masks(11, widths, dtype, (0, 3)), residual=residual)
    g = torch.Generator().manual_seed(5)
    projections = torch.randn(11, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    check_frobenius(x, net, 0, projections, masks=dropout_masks(11, widths, dtype, (1, 2)), residual=residual)
    for layer, strategy in ((0, 0), (2, 0), (0, 1), (1, 1)):
        (y, jac, saved), cpu = both("mlp_jacobian", x, *net, layer, strategy, residual=residual)
        assert_same((y, jac, saved), cpu, f"residual jacobian layer {layer} strategy {strategy}")
        grad_y, grad_jac = grads_like([y, jac])
        carries = grads_like(saved[3 * len(widths) - 4:], seed=3) if strategy == 0 else []
        args = (grad_y, None, grad_jac, x, *net, layer, strategy, saved, carries)
        assert_same(*both("mlp_jacobian_backward", *args, residual=residual), "residual jacobian backward")


def per_sample_factors(batch, widths, dtype, layers, around, seed=6):
    """Per-sample biases (around 0) or gates (around 1) on `layers`, an empty tensor for the others."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, n, generator=g, dtype=torch.float64) * 0.5 + around).to(dtype) if i in layers
            else torch.empty(0, dtype=dtype) for i, n in enumerate(widths[1:])]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["identity", "tanh", "relu", "softplus"])
@pytest.mark.parametrize("batch", [1, 37])
def test_jacobian_conditioned(batch, activation, dtype):
    """Per-sample biases and gates (conditioning inside the net) in the Jacobian ops: every strategy that
    takes them, with a gate on the last layer, projections, masks and skips, and the Jacobians with the
    reverse carries' gradients; the backward returns their per-sample gradients."""
    widths = [4, 6, 6, 4]
    net = mlp(widths, activation, dtype)
    x = inputs(batch, 4, dtype)
    hidden = (per_sample_factors(batch, widths, dtype, (0, 1), 0.0), per_sample_factors(batch, widths, dtype, (1,), 1.0))
    top = (per_sample_factors(batch, widths, dtype, (2,), 0.0), per_sample_factors(batch, widths, dtype, (0, 2), 1.0))
    for strategy in (0, 1, 2, 4):
        check_frobenius(x, net, strategy, conditioning=hidden)
    for strategy in (0, 1, 2):
        check_frobenius(x, net, strategy, conditioning=top)
    g = torch.Generator().manual_seed(3)
    projections = torch.randn(batch, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    check_frobenius(x, net, 0, projections, masks=dropout_masks(batch, widths, dtype, (0,)), conditioning=top)
    check_frobenius(x, net, 1, masks=dropout_masks(batch, widths, dtype, (1,)), residual=[-1, 1, -1],
                    conditioning=top)
    one_hidden = [4, 6, 4]
    check_frobenius(x, mlp(one_hidden, activation, dtype), 3,
                    conditioning=(per_sample_factors(batch, one_hidden, dtype, (0, 1), 0.0),
                                  per_sample_factors(batch, one_hidden, dtype, (0,), 1.0)))
    for layer, strategy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        (y, jac, saved), cpu = both("mlp_jacobian", x, *net, layer, strategy, None, *top)
        what = f"conditioned jacobian layer {layer} strategy {strategy}"
        assert_same((y, jac, saved), cpu, what)
        grad_y, grad_jac = grads_like([y, jac])
        carries = grads_like(saved[3 * len(widths) - 4:], seed=3) if strategy == 0 else []
        args = (grad_y, None, grad_jac, x, *net, layer, strategy, saved, carries, None, None, *top)
        assert_same(*both("mlp_jacobian_backward", *args), what + " backward")


# --- the flow ops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
# a flow's activations are strictly monotone (log|act'| is finite)
@pytest.mark.parametrize("activation", ["identity", "leaky_relu", "tanh", "sigmoid", "softplus", "elu",
                                        "smooth_leaky_relu"])
def test_flow(activation, dtype):
    for batch, bias in ((7, True), (0, True), (300, False)):
        net = mlp([5, 5, 5, 5], activation, dtype, bias=bias)
        x = inputs(batch, 5, dtype)
        (z, log_dact, logabsdet, saved), cpu = both("mlp_flow", x, *net, False, True)
        assert_same((z, log_dact, logabsdet, saved), cpu, "flow")
        grad_z, grad_log_dact, grad_logabsdet = grads_like([z, log_dact, logabsdet])
        for relative in (False, True):
            args = (grad_z, grad_log_dact, grad_logabsdet, x, *net, saved, relative, True)
            assert_same(*both("mlp_flow_backward", *args), f"flow backward relative={relative}")
        nll = (None, None, None, x, *net, saved, True, False, torch.tensor(0.7, dtype=dtype))
        assert_same(*both("mlp_flow_backward", *nll), "flow backward of the mean NLL")


# --- the forward-carry ops ------------------------------------------------------------------------

def check_laplacian(x, net, **kwargs):
    """The whole Laplacian, then over chosen directions: a permutation's rows with the sum over the
    first of them (wrt with the gradient), and the first rows alone (wrt without it); kwargs: the
    ops' keyword arguments (residual)."""
    n0 = x.shape[1]
    rows = torch.eye(n0, dtype=x.dtype)[list(range(n0))[::-1]].unsqueeze(0)
    cases = [(gradient, ()) for gradient in (True, False)]
    cases += [(True, (rows, 1)), (False, (rows[:, :max(1, n0 - 1)], max(1, n0 - 1))), (False, (None, 1))]
    for gradient, chosen in cases:
        what = f"laplacian gradient={gradient}" + (f" directions, {chosen[1]} summed" if chosen else "")
        (y, grad, lap, saved), cpu = both("mlp_laplacian", x, *net, gradient, *chosen, **kwargs)
        assert_same((y, grad, lap, saved), cpu, what)
        grad_y, grad_grad, grad_lap = grads_like([y, grad, lap])
        args = (grad_y, grad_grad if gradient else None, grad_lap, x, *net, gradient, saved, *chosen)
        assert_same(*both("mlp_laplacian_backward", *args, **kwargs), what + " backward")
        args = (None, None, grad_lap, x, *net, gradient, saved, *chosen)
        assert_same(*both("mlp_laplacian_backward", *args, input_grad=False, **kwargs), what + " backward of lap only")


def check_diagonal(x, net, strategy, projections=None, **kwargs):
    (y, out, saved), cpu = both("mlp_jacobian_diagonal", x, *net, strategy, projections, **kwargs)
    assert_same((y, out, saved), cpu, f"diagonal strategy {strategy}")
    grad_y, grad_out = grads_like([y, out])
    args = (grad_y, grad_out, x, *net, strategy, saved, projections)
    assert_same(*both("mlp_jacobian_diagonal_backward", *args, **kwargs), f"diagonal backward strategy {strategy}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_carry_every_activation(activation, dtype):
    net = mlp([4, 7, 6, 3], activation, dtype)
    x = inputs(6, 4, dtype)
    check_laplacian(x, net)
    square = mlp([4, 7, 6, 4], activation, dtype)
    check_diagonal(x, square, 0)
    check_diagonal(x, square, 2)  # two hidden layers, linear output: the trace
    check_diagonal(x, mlp([4, 7, 4], activation, dtype), 1)  # one hidden layer
    g = torch.Generator().manual_seed(5)
    check_diagonal(x, square, 0, torch.randn(6, 3, 4, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("residual", [[0, 1, 1, 0], [-1, 1, 2, -1], [-1, -1, 0, 2]],
                         ids=["input-and-output", "above-the-thin-top", "two-layer-blocks"])
def test_forward_carry_residual(residual, batch, activation, dtype):
    """Residual skips: blocks at the input and into the output, two skips from one carry, a skip below
    the Laplacian's thin last layer, blocks of several layers."""
    net = mlp([4, 4, 4, 4, 4], activation, dtype)
    x = inputs(batch, 4, dtype)
    check_laplacian(x, net, residual=residual)
    check_diagonal(x, net, 0, residual=residual)
    g = torch.Generator().manual_seed(5)
    projections = torch.randn(batch, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    check_diagonal(x, net, 0, projections, residual=residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("top", [False, True], ids=["hidden", "and-last-layer"])
def test_forward_carry_conditioned(top, batch, activation, dtype):
    """Per-sample biases and gates (conditioning inside the net) on hidden layers, and on the last
    layer too (which then keeps every row through it)."""
    net = mlp([4, 6, 5, 4], activation, dtype)
    x = inputs(batch, 4, dtype)
    g = torch.Generator().manual_seed(6)

    def per_sample(layers, around):
        return [(torch.randn(batch, n, generator=g, dtype=torch.float64) * 0.5 + around).to(dtype) if i in layers
                else torch.empty(0, dtype=dtype) for i, n in enumerate([6, 5, 4])]

    on = (per_sample((0, 2) if top else (0,), 0.0), per_sample((1, 2) if top else (1,), 1.0))
    for gradient in (True, False):
        what = f"conditioned laplacian gradient={gradient}"
        (y, grad, lap, saved), cpu = both("mlp_laplacian", x, *net, gradient, None, -1, *on)
        assert_same((y, grad, lap, saved), cpu, what)
        grad_y, grad_grad, grad_lap = grads_like([y, grad, lap])
        args = (grad_y, grad_grad if gradient else None, grad_lap, x, *net, gradient, saved, None, -1, *on)
        assert_same(*both("mlp_laplacian_backward", *args), what + " backward")
    projections = torch.randn(batch, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    for v in (None, projections):
        what = f"conditioned diagonal{' projections' if v is not None else ''}"
        (y, out, saved), cpu = both("mlp_jacobian_diagonal", x, *net, 0, v, *on)
        assert_same((y, out, saved), cpu, what)
        grad_y, grad_out = grads_like([y, out])
        assert_same(*both("mlp_jacobian_diagonal_backward", grad_y, grad_out, x, *net, 0, saved, v, *on),
                    what + " backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("layers, residual", [((0, 1), None), ((1, 3), None), ((0, 2), [-1, 1, 1, 0])],
                         ids=["hidden", "and-last-layer", "residual"])
def test_forward_carry_dropout_masks(layers, residual, batch, activation, dtype):
    """Dropout masks on the forward-carry ops: on hidden layers (below the Laplacian's thin top), on the
    last layer too (which then keeps every row through it), inside blocks with a skip into the output;
    and beside per-sample biases and gates."""
    net = mlp([4, 4, 4, 4, 4], activation, dtype)
    x = inputs(batch, 4, dtype)
    masks = dropout_masks(batch, [4] * 5, dtype, layers)
    check_laplacian(x, net, masks=masks, residual=residual)
    check_diagonal(x, net, 0, masks=masks, residual=residual)
    g = torch.Generator().manual_seed(5)
    projections = torch.randn(batch, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    check_diagonal(x, net, 0, projections, masks=masks, residual=residual)
    shifts = [(torch.randn(batch, 4, generator=g, dtype=torch.float64) * 0.5).to(dtype) if i == 1
              else torch.empty(0, dtype=dtype) for i in range(4)]
    gates = [(torch.randn(batch, 4, generator=g, dtype=torch.float64) * 0.5 + 1).to(dtype) if i == 2
             else torch.empty(0, dtype=dtype) for i in range(4)]
    check_laplacian(x, net, sample_biases=shifts, gates=gates, masks=masks, residual=residual)
    check_diagonal(x, net, 0, sample_biases=shifts, gates=gates, masks=masks, residual=residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("batch", BATCHES)
def test_forward_carry_batch_sizes(batch, dtype):
    net = mlp([4, 7, 4], "softplus", dtype)
    x = inputs(batch, 4, dtype)
    check_laplacian(x, net)
    check_diagonal(x, net, 0)
    check_diagonal(x, net, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_reductions_longer_than_a_block(dtype):
    """Per-sample sums over 10 x 40 and 10 x 30 terms: more than the 256 threads of a block, every
    slot of the shared-memory tree used."""
    net = mlp([40, 30, 20, 10], "tanh", dtype)
    x = inputs(3, 40, dtype)
    for strategy in (0, 1, 2):
        check_frobenius(x, net, strategy)
    g = torch.Generator().manual_seed(7)
    check_frobenius(x, net, 0, torch.randn(3, 2, 10, generator=g, dtype=torch.float64).to(dtype))


def test_large_grid():
    """Batch 2200 at width 32: 70400 elements a layer, 275 blocks of 256 threads (over two an SM)."""
    net = mlp([32, 32, 16, 8], "tanh", torch.float32)
    x = inputs(2200, 32, torch.float32)
    check_frobenius(x, net, 0)
    check_frobenius(x, net, 1)
    check_laplacian(x, mlp([32, 32, 8], "softplus", torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["broadcast", "noncontiguous"])
def test_forward_carry_strided_inputs(layout, dtype):
    net = mlp([4, 7, 6, 4], "gelu_tanh", dtype, 
              layout=layout if layout == "noncontiguous" else "contiguous")
    x = inputs(9, 4, dtype, layout)
    check_laplacian(x, net)
    check_diagonal(x, net, 0)
    check_diagonal(x, net, 2)
    g = torch.Generator().manual_seed(6)
    check_diagonal(x, net, 0, torch.randn(1, 2, 4, generator=g, dtype=torch.float64).to(dtype).expand(9, 2, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives(activation, dtype):
    code, p0, p1 = ACTIVATIONS[activation]
    y = torch.linspace(-6, 6, 600, dtype=torch.float64).to(dtype)
    for t in (y, y.view(3, 200)[:, ::3], y[:0]):
        assert_same(*both("activation_derivatives", t, code, p0, p1), activation)


# --- the shim itself ------------------------------------------------------------------------------

PROBE_BASES = itertools.count(10_000, 10_000)


@pytest.mark.parametrize("threads", [1, 2, 96, 1024])
def test_barrier_is_real(threads):
    """Each thread writes its slot, then reads its neighbour's: right only behind a real barrier."""
    # a new base per launch: shared memory keeps an earlier launch's values, as on a GPU
    base = next(PROBE_BASES)
    out = emulated_ops.barrier_probe(3, threads, 0, base, True)
    assert torch.equal(out, ((torch.arange(threads) + 1) % threads + base).expand(3, threads))
    if threads > 1:  # without the barrier a thread reads its neighbour's slot before it is written
        base = next(PROBE_BASES)
        unsynced = emulated_ops.barrier_probe(1, threads, 0, base, False)
        assert not torch.equal(unsynced[0], (torch.arange(threads) + 1) % threads + base)


def test_launch_limits_fail_as_on_a_gpu():
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emulated_ops.barrier_probe(1, 1025, 0, 0, True)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emulated_ops.barrier_probe(0, 32, 0, 0, True)
    with pytest.raises(RuntimeError, match="too many resources requested for launch"):
        emulated_ops.barrier_probe(1, 32, 48 * 1024 + 1, 0, True)


def test_every_op_is_emulated():
    """Every op of the library jacext (but the CPU workspace's and device formulas' functions) has
    its emulated CUDA kernel."""
    cpu_only = {"workspace_stats", "workspace_set_limit", "workspace_release", "device_formulas"}
    ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("jacext::") and name.split("::")[1] not in cpu_only)
    assert "mlp_jacobian_frobenius" in ops and "activation_derivatives" in ops, ops
    for name in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jacext_cuda_emulated::{name}", "CPU"), name
