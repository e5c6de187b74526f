"""The compiled ops: fake (meta) kernels, autograd formulas, and the op-level entry points.

Autograd: the two forward ops differentiate through the backward op (compiled kernels):
mlp_jacobian_frobenius by a C++ autograd node (csrc/frobenius_autograd.cpp), mlp_jacobian by the
formulas registered here. The backward op differentiates through
reference.mlp_jacobian_backward_composite (torch ops), which gives the double backward and every
higher order."""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.utils.checkpoint

from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
from . import activations as act
from .planner import (FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM, Split, batch_chunk,
                      default_memory_budget, first_carry_index, op_element_size, resolve_strategy, saved_shapes,
                      tile_size)
from .reference import mlp_jacobian_backward_composite

__all__ = ["mlp_jacobian_frobenius", "mlp_jacobian", "mlp_jacobians", "mlp_jacobian_grams", "resolve_strategy", "REVERSE", "FORWARD",
           "REVERSE_GRAM", "GRAM1", "FORWARD_GRAM", "device_formulas", "has_cuda_kernels", "op_element_size", "warn_if_tf32"]

_ops = torch.ops.jacext


def has_cuda_kernels() -> bool:
    """Whether this build of jacext has CUDA kernels (setup.py builds them whenever torch is a CUDA
    build and a CUDA toolkit is found)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("jacext::mlp_jacobian_frobenius", "CUDA")


def _warn_if_gpu_without_kernels():
    """Once, at import: a visible GPU that this build cannot use would otherwise show up only as
    "Could not run ... with arguments from the 'CUDA' backend" at the first call."""
    if torch.cuda.is_available() and not has_cuda_kernels():
        warnings.warn("jacext: a CUDA GPU is visible, but this build of jacext has no CUDA kernels (it was "
                      "built against a CPU build of torch, or no CUDA toolkit was found); reinstall with the "
                      "CUDA torch installed and nvcc on PATH (or CUDA_HOME set): pip install "
                      "--no-build-isolation -e .", RuntimeWarning, stacklevel=3)


_warn_if_gpu_without_kernels()

_tf32_warned = False


def warn_if_tf32(device: torch.device, dtype: torch.dtype) -> None:
    """Once per process: jacext's float32 CUDA GEMMs follow torch's TF32 setting like every other
    matmul, and with it on (torch.backends.cuda.matmul.allow_tf32, or
    torch.set_float32_matmul_precision("high")) each carry GEMM rounds its inputs to a 10-bit
    mantissa: Jacobian norms to about 1e-3 relative instead of 1e-6."""
    global _tf32_warned
    if (_tf32_warned or device.type != "cuda" or dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or torch.compiler.is_compiling() or not torch.backends.cuda.matmul.allow_tf32):
        return
    _tf32_warned = True
    warnings.warn("jacext: TF32 is enabled for CUDA matmuls (torch.backends.cuda.matmul.allow_tf32), so "
                  "jacext's float32 GEMMs run in TF32 too: Jacobian norms come out to about 1e-3 relative. "
                  "Set torch.backends.cuda.matmul.allow_tf32 = False (or float32_matmul_precision "
                  "'highest') for full float32.", RuntimeWarning, stacklevel=3)

def device_formulas() -> bool:
    """Whether the CPU kernels evaluate the activations by the CUDA kernels' formulas
    (csrc/activations.h) instead of the vectorized loops (ATen's; float32 tanh: jacext's own):
    JACEXT_DEVICE_FORMULAS=1 in the environment when the library loaded (csrc/device_formulas.h)."""
    return torch.ops.jacext.device_formulas()


# What torch raises for an op under torch.func.grad / vjp / jacrev / jvp: the Frobenius op's
# autograd is a C++ node (csrc/frobenius_autograd.cpp), which functorch refuses; the other ops'
# register_autograd wrapper cannot run under it in torch <= 2.13 (pytorch#170834).
_FUNCTORCH_REFUSALS = ("setup_context staticmethod", "C++ torch::autograd::Function with functorch")


def explained_functorch_errors(fn):
    """Decorates an entry point so that the error torch raises for an op under torch.func.grad says
    what works instead."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as error:
            if not any(refusal in str(error) for refusal in _FUNCTORCH_REFUSALS):
                raise
            raise RuntimeError(
                "jacext: its ops cannot be differentiated by torch.func.grad / vjp / jacrev / jvp (their "
                "autograd is a C++ node or torch.library.register_autograd's wrapper, and functorch takes "
                "neither in this version of torch). Differentiate with torch.autograd.grad or .backward() "
                "instead: the samples are independent, so the gradient of the batch's sum w.r.t. x holds "
                "every sample's input gradient; torch.func.vmap (over samples or stacked weights) works.") from error
    return wrapper


def _widths(x, weights):
    """[n_0, ..., n_L] of the MLP."""
    return [x.shape[1]] + [w.shape[0] for w in weights]


@torch.library.register_fake("jacext::mlp_jacobian_frobenius")
def _frobenius_fake(x, weights, biases, activations, act_params, strategy, projections=None, *, tile=0):
    B = x.shape[0]
    rows = None if projections is None else projections.shape[1]
    saved = [x.new_empty(s) for s in saved_shapes(_widths(x, weights), B, 0, strategy, rows, activations)]
    sq = x.new_empty(B) if projections is None else x.new_empty(B, rows)
    return x.new_empty(B, weights[-1].shape[0]), sq, saved


@torch.library.register_fake("jacext::mlp_jacobian")
def _jacobian_fake(x, weights, biases, activations, act_params, layer, strategy, *, tile=0, gram=False):
    widths = _widths(x, weights)
    saved = [x.new_empty(s) for s in saved_shapes(widths, x.shape[0], layer, strategy, None, activations)]
    columns = widths[-1] if gram else widths[layer]  # gram: J J^T
    return x.new_empty(x.shape[0], widths[-1]), x.new_empty(x.shape[0], widths[-1], columns), saved


@torch.library.register_fake("jacext::mlp_jacobian_backward")
def _backward_fake(grad_y, grad_sq, grad_jac, x, weights, biases, activations, act_params, layer,
                   strategy, saved, grad_carries, projections=None, *, tile=0, input_grad=True):
    # contiguous like the kernels' outputs (x may not be); an empty bias gradient for a layer without bias
    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0] if b.numel() else 0) for w, b in zip(weights, biases)])


def bias_tensors(biases, weights):
    """The op's bias list: an empty tensor stands for a layer without bias (None)."""
    return [w.new_empty(0) if b is None else b for b, w in zip(biases, weights)]


def _save_forward(ctx, x, weights, biases, activations, act_params, layer, strategy, tile, saved,
                  differentiable_carries=False):
    # An unused output's gradient stays None: zero-filling the (large) saved carries would cost a
    # full memory pass each, and the backward op takes None for grad_y, grad_sq and grad_jac.
    ctx.set_materialize_grads(False)
    ctx.config = (list(activations), list(act_params), layer, strategy)
    ctx.tile = tile  # the backward runs the same tiles
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.save_for_backward(x, *weights, *biases, *saved)
    # Reverse carries are the Jacobians dy/dh_i above `layer` and may be differentiated
    # (mlp_jacobians); the rest of `saved` is internal (with strategy 2 the last carry too: P = S G).
    ctx.carries_start = first_carry_index(len(weights))
    internal = saved[:ctx.carries_start] + (saved[-1:] if strategy == REVERSE_GRAM else [])
    ctx.mark_non_differentiable(*(internal if differentiable_carries else saved))


def _load_forward(ctx):
    tensors = list(ctx.saved_tensors)
    L = ctx.n_layers
    return tensors[0], tensors[1:1 + L], tensors[1 + L:1 + 2 * L], tensors[1 + 2 * L:]


def _below_autograd():
    """Where an op's registered autograd (a Python kernel: 30-40 us a call) would only pass the call
    on, because grad mode is off in eager mode (a backward without create_graph), a context that
    goes straight to the device kernel; elsewhere a no-op."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _backward_via_op(ctx, grad_y, grad_jac, grad_saved=None):
    x, weights, biases, saved = _load_forward(ctx)
    activations, act_params, layer, strategy = ctx.config
    grad_carries = [] if grad_saved is None else grad_saved[ctx.carries_start:]
    if all(g is None for g in grad_carries):
        grad_carries = []
    else:  # the op takes an empty tensor for a carry without gradient
        grad_carries = [x.new_empty(0) if g is None else g for g in grad_carries]
    with _below_autograd():  # with create_graph, the backward op's own autograd records the double backward
        grad_x, grad_w, grad_b = _ops.mlp_jacobian_backward(
            grad_y, None, grad_jac, x, weights, biases, activations, act_params, layer,
            strategy, saved, grad_carries, tile=ctx.tile, input_grad=ctx.needs_input_grad[0])
    grad_b = [g if present else None for g, present in zip(grad_b, ctx.bias_present)]
    return grad_x, list(grad_w), grad_b


def _jacobian_setup(ctx, inputs, keyword_only_inputs, output):
    x, weights, biases, activations, act_params, layer, strategy = inputs
    _save_forward(ctx, x, weights, biases, activations, act_params, layer, strategy, keyword_only_inputs.get("tile", 0),
                  output[2], differentiable_carries=strategy in (REVERSE, REVERSE_GRAM))


def _jacobian_backward(ctx, grad_y, grad_jac, grad_saved):
    return (*_backward_via_op(ctx, grad_y, grad_jac, grad_saved), None, None, None, None)


def _backward_setup(ctx, inputs, keyword_only_inputs, output):
    (grad_y, grad_sq, grad_jac, x, weights, biases, activations, act_params, layer, _, saved, grad_carries,
     projections) = inputs
    # The dispatcher drops a trailing argument left at its default (None), so the backward returns
    # a gradient slot for `projections` only when one was passed.
    ctx.n_trailing = 0 if projections is None else 1
    ctx.projections = projections  # random draws, held constant: not differentiated
    # strategy 2 with a gradient for J: the op returned J J^T (mlp_jacobian's Gram output)
    ctx.config = (list(activations), list(act_params), layer, inputs[9] == REVERSE_GRAM and grad_jac is not None)
    ctx.n_saved = len(saved)
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.grad_present = [g is not None for g in (grad_y, grad_sq, grad_jac)]
    ctx.carry_grad_present = [g.numel() > 0 for g in grad_carries]
    ctx.save_for_backward(*[g for g in (grad_y, grad_sq, grad_jac) if g is not None],
                          *[g for g in grad_carries if g.numel() > 0], x, *weights,
                          *[b for b, present in zip(biases, ctx.bias_present) if present])


def _backward_backward(ctx, gg_x, gg_w, gg_b):
    tensors = iter(ctx.saved_tensors)
    present_grads = [next(tensors) for present in ctx.grad_present + ctx.carry_grad_present if present]
    x = next(tensors)
    weights = [next(tensors) for _ in range(ctx.n_layers)]
    present_biases = list(tensors)
    activations, act_params, layer, gram_output = ctx.config

    def composite(present_grads, x, weights, present_biases):
        grads, biases = iter(present_grads), iter(present_biases)
        grad_y, grad_sq, grad_jac = [next(grads) if p else None for p in ctx.grad_present]
        grad_carries = [next(grads) if p else None for p in ctx.carry_grad_present]
        full_biases = [next(biases) if p else None for p in ctx.bias_present]
        return mlp_jacobian_backward_composite(grad_y, grad_sq, grad_jac, x, weights, full_biases,
                                               activations, act_params, layer, ctx.projections,
                                               grad_carries, gram_output)

    with torch.autocast(x.device.type, enabled=False):  # float32 like the op it differentiates
        outputs, vjp = torch.func.vjp(composite, present_grads, x, weights, present_biases)
    gg_b_present = [g for g, present in zip(gg_b, ctx.bias_present) if present]
    cotangents = (
        torch.zeros_like(outputs[0]) if gg_x is None else gg_x,
        [torch.zeros_like(o) if g is None else g for g, o in zip(gg_w, outputs[1])],
        [torch.zeros_like(o) if g is None else g for g, o in zip(gg_b_present, outputs[2])],
    )
    with torch.autocast(x.device.type, enabled=False):
        g_grads, g_x, g_w, g_b = vjp(cotangents)
    g_grads, g_b = iter(g_grads), iter(g_b)
    grads_out = [next(g_grads) if present else None for present in ctx.grad_present]
    g_carries = [next(g_grads) if present else None for present in ctx.carry_grad_present]
    g_biases = [next(g_b) if present else None for present in ctx.bias_present]
    # No gradient flows into `saved`: the composite differentiates through x, weights and biases.
    return (*grads_out, g_x, list(g_w), g_biases, None, None, None, None, [None] * ctx.n_saved,
            g_carries, *[None] * ctx.n_trailing)


torch.library.register_autograd("jacext::mlp_jacobian", _jacobian_backward,
                                setup_context=_jacobian_setup)
torch.library.register_autograd("jacext::mlp_jacobian_backward", _backward_backward,
                                setup_context=_backward_setup)


@torch.library.register_fake("jacext::mlp_flow")
def _flow_fake(x, weights, biases, activations, act_params, relative_gradient, logdet_value):
    # contiguous like the kernel's outputs, whatever x's strides (empty_like would copy them)
    saved = [x.new_empty(x.shape) for _ in range(4 * len(weights) - 1)]
    return x.new_empty(x.shape), x.new_empty(x.shape[0]), x.new_empty(()), saved


@torch.library.register_fake("jacext::mlp_flow_backward")
def _flow_backward_fake(grad_z, grad_log_dact, grad_logabsdet, x, weights, biases, activations, act_params,
                        saved, relative, input_grad, grad_nll=None):
    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0]) for w in weights])


def _save_flow(ctx, x, weights, biases, activations, act_params, relative, saved):
    ctx.config = (list(activations), list(act_params), relative)
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *weights, *biases, *saved)


def _flow_grads(ctx, grad_z, grad_log_dact, grad_logabsdet, grad_nll=None):
    """(grad_x, grad_w, grad_b) from the op's backward, None for a missing bias; relative: the
    relative gradient for the weights and biases (csrc/mlp_flow.h)."""
    tensors, L = ctx.saved_tensors, ctx.n_layers
    x, weights, biases, saved = tensors[0], tensors[1:1 + L], tensors[1 + L:1 + 2 * L], tensors[1 + 2 * L:]
    activations, act_params, relative = ctx.config
    grad_x, grad_w, grad_b = _ops.mlp_flow_backward(
        grad_z, grad_log_dact, grad_logabsdet, x, list(weights), list(biases), activations, act_params,
        list(saved), relative, ctx.needs_input_grad[0], grad_nll=grad_nll)
    return grad_x, list(grad_w), [g if present else None for g, present in zip(grad_b, ctx.bias_present)]


def _flow_setup(ctx, inputs, output):
    x, weights, biases, activations, act_params, relative, _ = inputs
    _save_flow(ctx, x, weights, biases, activations, act_params, relative, output[3])
    ctx.mark_non_differentiable(*output[3])


def _flow_backward(ctx, grad_z, grad_log_dact, grad_logabsdet, grad_saved):
    return (*_flow_grads(ctx, grad_z, grad_log_dact, grad_logabsdet), None, None, None, None)


def _flow_backward_backward(ctx, *grads):
    raise RuntimeError("jacext: the flow op (mlp_flow) is differentiable once; its backward has no "
                       "gradient (no double backward)")


torch.library.register_autograd("jacext::mlp_flow", _flow_backward, setup_context=_flow_setup)
torch.library.register_autograd("jacext::mlp_flow_backward", _flow_backward_backward,
                                setup_context=lambda ctx, inputs, output: None)


# torch.func.vmap. Over the samples (x batched, the weights not: vmap(lambda xi: f(model, xi[None]))):
# the vmapped dimension is folded into the op's batch, one call for all. Over anything else (an
# ensemble of stacked weights, torch.func.stack_module_state + functional_call): one call per
# vmapped index, stacked; values and gradients are the loop's.
def _moved(value, dim):
    """A vmapped argument with its vmapped dimension first (lists element by element)."""
    if isinstance(value, (list, tuple)):
        dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(value)
        return [_moved(v, d) for v, d in zip(value, dims)]
    return value if dim is None else value.movedim(dim, 0)


def _batched(dim):
    return any(_batched(d) for d in dim) if isinstance(dim, (list, tuple)) else dim is not None


def _select(value, dim, index):
    if isinstance(value, (list, tuple)):
        dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(value)
        return [_select(v, d, index) for v, d in zip(value, dims)]
    return value if dim is None else value.select(dim, index)


def _stacked(outputs):
    """The per-index outputs of a loop stacked along a new first dimension (lists element by element)."""
    first = outputs[0]
    if isinstance(first, (list, tuple)):
        return [_stacked([o[i] for o in outputs]) for i in range(len(first))]
    return torch.stack(outputs)


def _on_meta(value, batch=None):
    """An argument on the meta device (shapes only); `batch` replaces a tensor's first size."""
    if isinstance(value, (list, tuple)):
        return [_on_meta(v) for v in value]
    if not isinstance(value, torch.Tensor):
        return value
    shape = value.shape if batch is None else (batch, *value.shape[1:])
    return torch.empty(shape, dtype=value.dtype, device="meta")


def _zeros_like(structure):
    return [_zeros_like(s) for s in structure] if isinstance(structure, (list, tuple)) else 0


def _register_vmap(name, sample_inputs):
    """`sample_inputs`: the positions of the per-sample arguments (x, and the estimator's projections)."""
    op = getattr(_ops, name).default

    def rule(info, in_dims, *args, **kwargs):
        if all(not _batched(d) for i, d in enumerate(in_dims) if i not in sample_inputs):
            return _folded(info.batch_size, in_dims, args, kwargs)
        outputs = [op(*_select(args, in_dims, v), **kwargs) for v in range(info.batch_size)]
        stacked = _stacked(outputs)
        return tuple(stacked), tuple(_zeros_like(stacked))

    def _folded(size, in_dims, args, kwargs):
        args = list(args)
        samples = None
        for i in sample_inputs:
            if i >= len(args) or args[i] is None:
                continue
            value = args[i] if in_dims[i] is not None else args[i].unsqueeze(0).expand(size, *args[i].shape)
            value = _moved(value, in_dims[i])
            samples = value.shape[1]
            args[i] = value.reshape(size * samples, *value.shape[2:])
        outputs = op(*args, **kwargs)
        # which outputs are per sample: those whose first size follows the batch's, by the fake
        # kernel on meta tensors one sample larger (a Gram of the weights may be as long as the batch)
        probe = [_on_meta(a, size * samples + 1 if i in sample_inputs else None) for i, a in enumerate(args)]
        pattern = op(*probe, **kwargs)

        def unfold(t, shape_of_probe):
            if shape_of_probe.dim() > 0 and shape_of_probe.shape[0] == size * samples + 1:
                return t.reshape(size, samples, *t.shape[1:]), 0  # per sample: (size, samples, ...)
            return t, None  # shared by the batch (strategy 3's Grams, an absent d, log|det W|)

        results, dims = [], []
        for out, shapes in zip(outputs, pattern):
            if isinstance(out, (list, tuple)):
                pairs = [unfold(t, p) for t, p in zip(out, shapes)]
                results.append([t for t, _ in pairs])
                dims.append([d for _, d in pairs])
            else:
                t, d = unfold(out, shapes)
                results.append(t)
                dims.append(d)
        return tuple(results), tuple(dims)

    torch.library.register_vmap(f"jacext::{name}", rule)


_register_vmap("mlp_jacobian_frobenius", sample_inputs=(0, 6))  # x, projections
_register_vmap("mlp_jacobian", sample_inputs=(0,))
_register_vmap("mlp_flow", sample_inputs=(0,))


# Mixed precision: under torch.autocast (float16 / bfloat16) the ops run in float32 (their
# floating inputs other than float64 are cast, the outputs are float32): a Jacobian carried through
# several layers and squared loses too much in half precision, and the GEMMs stay on the fast path
# in float32. This is torch.library.register_autocast's rule, registered here because that helper
# refuses keyword arguments (the ops' `tile`, `gram`) in torch 2.11 - 2.14.
_autocast_lib = torch.library.Library("jacext", "IMPL")


def _to_float32(value, device_type):
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v, device_type) for v in value)
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type
            and value.dtype is not torch.float64):
        return value.float()
    return value


def _register_float32_autocast(name):
    op = getattr(_ops, name).default
    for device_type in ("cpu", "cuda"):
        def kernel(*args, device_type=device_type, **kwargs):
            with torch.autocast(device_type, enabled=False):  # excludes the autocast key: no recursion
                return op(*_to_float32(args, device_type), **kwargs)

        _autocast_lib.impl(name, kernel, "Autocast" + device_type.upper())


for _op in ("mlp_jacobian_frobenius", "mlp_jacobian", "mlp_flow"):
    _register_float32_autocast(_op)



ActivationSpec = Union[int, str]


def _normalize_activations(activations: Sequence[ActivationSpec], act_params, n_layers):
    codes = []
    for a in activations:
        if isinstance(a, str):
            if a not in act.NAMES:
                raise ValueError(f"unknown activation {a!r}; supported: {sorted(act.NAMES)}")
            a = act.NAMES[a]
        codes.append(int(a))
    if len(codes) != n_layers:
        raise ValueError(f"expected {n_layers} activations (one per weight), got {len(codes)}")
    if act_params is None:
        defaults = {act.LEAKY_RELU: [0.01, 0.0], act.SOFTPLUS: [1.0, 20.0], act.ELU: [1.0, 0.0],
                    act.SMOOTH_LEAKY_RELU: [0.3, 0.0]}
        act_params = [p for c in codes for p in defaults.get(c, [0.0, 0.0])]
    return codes, [float(p) for p in act_params]


@explained_functorch_errors
def mlp_jacobian_frobenius(x: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Sequence[Optional[torch.Tensor]],
                           activations: Sequence[ActivationSpec], act_params=None,
                           method: str = "auto", projections: Optional[torch.Tensor] = None,
                           max_memory: Optional[int] = None):
    """(y, sq): the MLP output and sq[b] = ||dy_b/dx_b||_F^2, in one fused op.

    activations: one name or code per weight (e.g. ["tanh", "identity"]); act_params: two
    floats per layer (slope / beta, threshold / alpha), torch's defaults when None.
    method="hutchinson" takes projections V (B, k, m) and returns sq[b, i] = ||v_bi^T J_b||^2.
    max_memory (bytes; default a quarter of the device's memory): when the plan's estimated
    peak (planner.footprint) exceeds it, the batch runs in chunks, each recomputed in the
    backward instead of keeping its carries (torch.utils.checkpoint); the result is unchanged.
    Under torch.compile the batch runs in one call."""
    if (method == "hutchinson") != (projections is not None):
        raise ValueError("projections go with method='hutchinson', and only with it")
    warn_if_tf32(x.device, x.dtype)
    codes, params = _normalize_activations(activations, act_params, len(weights))
    rows = None if projections is None else projections.shape[1]
    widths = _widths(x, weights)
    strategy = resolve_strategy(method, widths, batch=x.shape[0], projections=rows or 0,
                                output_linear=codes[-1] == act.IDENTITY)
    if max_memory is not None and (not isinstance(max_memory, int) or max_memory <= 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    weights, biases = list(weights), bias_tensors(biases, weights)

    def run(x, projections):
        if isinstance(strategy, Split):
            return _split_frobenius(x, weights, biases, codes, params, strategy)
        tile = tile_size(widths, x.shape[0], strategy, op_element_size(x), rows, device=x.device)
        return _ops.mlp_jacobian_frobenius(x, weights, biases, codes, params, strategy, projections, tile=tile)[:2]

    if torch.compiler.is_compiling():  # a compiled graph runs the batch in one call
        return run(x, projections)
    if max_memory is None:
        max_memory = default_memory_budget(x.device)
    chunk = batch_chunk(widths, x.shape[0], strategy, op_element_size(x), max_memory, rows)
    if chunk == x.shape[0]:
        return run(x, projections)
    # Checkpointing keeps each chunk's carries alive only during its own forward and backward.
    recompute = torch.is_grad_enabled()
    x_parts = x.split(chunk)
    v_parts = [None] * len(x_parts) if projections is None else projections.split(chunk)
    parts = [torch.utils.checkpoint.checkpoint(run, xc, vc, use_reentrant=False) if recompute else run(xc, vc)
             for xc, vc in zip(x_parts, v_parts)]
    return torch.cat([y for y, _ in parts]), torch.cat([sq for _, sq in parts])


def _split_frobenius(x, weights, biases, codes, params, split: Split):
    """(y, ||J||^2) with J = A C split at hidden layer s: C = dh_s/dx and A = dy/dh_s from two
    jacobian ops (each differentiable twice), combined per sample."""
    s = split.layer
    widths = _widths(x, weights)
    h, c, _ = _ops.mlp_jacobian(x, weights[:s], biases[:s], codes[:s], params[:2 * s], 0, split.bottom,
                                tile=tile_size(widths[:s + 1], x.shape[0], split.bottom, op_element_size(x), device=x.device))
    y, a, _ = _ops.mlp_jacobian(h, weights[s:], biases[s:], codes[s:], params[2 * s:], 0, split.top,
                                tile=tile_size(widths[s:], x.shape[0], split.top, op_element_size(x), device=x.device))
    with torch.autocast(x.device.type, enabled=False):  # the ops' float32 results stay float32
        return _combine_split(y, a, c, split)


def _combine_split(y, a, c, split: Split):
    if split.gram:  # sum_ij (A^T A)_ij (C C^T)_ij: n_s^2 (m + n_0) per sample
        return y, (torch.bmm(a.transpose(1, 2), a) * torch.bmm(c, c.transpose(1, 2))).sum((1, 2))
    return y, torch.bmm(a, c).square().sum((1, 2))  # m n_s n_0 per sample


@explained_functorch_errors
def mlp_jacobian(x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[Optional[torch.Tensor]], activations: Sequence[ActivationSpec],
                 act_params=None, layer: int = 0, method: str = "auto"):
    """(y, J): the MLP output and J[b] = dy_b/dh_layer,b of shape (B, m, n_layer)."""
    warn_if_tf32(x.device, x.dtype)
    codes, params = _normalize_activations(activations, act_params, len(weights))
    if not 0 <= layer < len(weights):
        raise ValueError(f"layer must be in [0, {len(weights) - 1}] for a model with {len(weights)} "
                         f"Linear layers, got {layer}")
    widths = _widths(x, weights)
    strategy = resolve_strategy(method, widths, layer, frobenius=False, batch=x.shape[0])
    tile = tile_size(widths, x.shape[0], strategy, op_element_size(x), layer=layer, device=x.device)
    y, jac, _ = _ops.mlp_jacobian(x, list(weights), bias_tensors(biases, weights), codes, params,
                                  layer, strategy, tile=tile)
    return y, jac


@explained_functorch_errors
def mlp_jacobians(x: torch.Tensor, weights: Sequence[torch.Tensor],
                  biases: Sequence[Optional[torch.Tensor]], activations: Sequence[ActivationSpec],
                  act_params=None, layers: Sequence[int] = (0,)):
    """(y, [J_l for l in layers]): the Jacobians dy/dh_l at several layers from one reverse sweep
    (the sweep down to the lowest layer passes every layer above it), each differentiable twice."""
    warn_if_tf32(x.device, x.dtype)
    codes, params = _normalize_activations(activations, act_params, len(weights))
    layers = list(layers)
    depth = len(weights)
    if not layers or any(not isinstance(l, int) or not 0 <= l < depth for l in layers):
        raise ValueError(f"layers must be a non-empty list of integers in [0, {depth - 1}], got {layers}")
    tile = tile_size(_widths(x, weights), x.shape[0], REVERSE, op_element_size(x), layer=min(layers), device=x.device)
    y, _, saved = _ops.mlp_jacobian(x, list(weights), bias_tensors(biases, weights), codes, params,
                                    min(layers), REVERSE, tile=tile)
    carries = saved[first_carry_index(depth):]  # dy/dh_i for i = L-1 down to min(layers)
    return y, [carries[depth - 1 - l] for l in layers]


class _BatchedGram(torch.autograd.Function):
    """J J^T per sample, (B, m, m) from (B, m, n). Its backward is one batched product (A + A^T) J;
    autograd's for `jac @ jac.transpose(1, 2)` is two (one of them with a transposed operand) and
    an add over (B, m, n): 2.5-3x the time at (128, 10, 512) on CPU. Written in torch ops, so it is
    differentiable again and torch.func transforms it (generate_vmap_rule)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(jac):
        return torch.bmm(jac, jac.transpose(1, 2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), jac)


@explained_functorch_errors
def mlp_jacobian_grams(x: torch.Tensor, weights: Sequence[torch.Tensor],
                       biases: Sequence[Optional[torch.Tensor]], activations: Sequence[ActivationSpec],
                       act_params=None, layers: Sequence[int] = (0,)):
    """(y, [J_l J_l^T for l in layers]), each (B, m, m) and differentiable twice, from one reverse
    sweep. At the input layer J_0 J_0^T = S G S^T (S = R^(1) D_1, G = W_1 W_1^T once per batch)
    replaces J_0 = S W_1 where that needs fewer multiply-adds (the planner's choice between the
    reverse carry and its Gram epilogue): m n_1^2 instead of m n_1 n_0 per sample."""
    warn_if_tf32(x.device, x.dtype)
    codes, params = _normalize_activations(activations, act_params, len(weights))
    layers = list(layers)
    depth = len(weights)
    if not layers or any(not isinstance(l, int) or not 0 <= l < depth for l in layers):
        raise ValueError(f"layers must be a non-empty list of integers in [0, {depth - 1}], got {layers}")
    widths = _widths(x, weights)
    gram_at_input = 0 in layers and resolve_strategy("reverse", widths, batch=x.shape[0]) == REVERSE_GRAM
    strategy, low = (REVERSE_GRAM, 0) if gram_at_input else (REVERSE, min(layers))
    tile = tile_size(widths, x.shape[0], strategy, op_element_size(x), layer=low, device=x.device)
    y, out, saved = _ops.mlp_jacobian(x, list(weights), bias_tensors(biases, weights), codes, params,
                                      low, strategy, tile=tile, gram=gram_at_input)
    carries = saved[first_carry_index(depth):]  # dy/dh_i for i = L-1 down to low (strategy 2: then P)
    grams = []
    with torch.autocast(x.device.type, enabled=False):  # the op's float32 results stay float32
        for l in layers:
            if l == 0 and gram_at_input:
                grams.append(out)
            else:
                jac = carries[depth - 1 - l]
                grams.append(_BatchedGram.apply(jac))
    return y, grams


# The forward-carry ops (Laplacian, Jacobian diagonal) live in _laplacian_ops; their op-level entry
# points are reachable here too, beside the others.
from ._laplacian_ops import mlp_jacobian_diagonal, mlp_laplacian  # noqa: E402

__all__ += ["mlp_laplacian", "mlp_jacobian_diagonal"]
