"""The op plumbing every op family builds on (the lowest layer of the package; see
docs/design.md): loading the compiled library, the environment warnings, the error for ops under
torch.func's autograd transforms, and the helpers that register an op's vmap and autocast rules."""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Sequence, Union

import torch

from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
from . import activations as act

compiled = torch.ops.jacext  # the registered ops, e.g. compiled.mlp_jacobian


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


def widths_of(x, weights):
    """[n_0, ..., n_L] of the MLP."""
    return [x.shape[1]] + [w.shape[0] for w in weights]


def bias_tensors(biases, weights):
    """The op's bias list: an empty tensor stands for a layer without bias (None)."""
    return [w.new_empty(0) if b is None else b for b, w in zip(biases, weights)]


def mask_arguments(masks, x):
    """The ops' `masks` argument (the Jacobian and forward-carry families) from one mask or None per
    layer (None for no masks at all): None for none, else one per layer with an empty tensor for
    none. Masks are constants."""
    if masks is None or all(m is None for m in masks):
        return None
    for i, m in enumerate(masks):
        if m is not None and m.requires_grad:
            raise ValueError(f"mask {i} requires grad; masks are constants (dropout masks) and take no gradient: "
                             "pass them detached")
    return [x.new_empty(0) if m is None else m for m in masks]


def conditioning_tensors(given, weights):
    """The forward-carry ops' per-sample biases or gates: None when no layer has one, else one per
    layer, an empty tensor standing for none (as for the biases)."""
    if given is None or all(t is None for t in given):
        return None
    if len(given) != len(weights):
        raise ValueError(f"expected one per-sample bias / gate per layer ({len(weights)}; None for none), "
                         f"got {len(given)}")
    return [w.new_empty(0) if t is None else t for t, w in zip(given, weights)]


def below_autograd():
    """Where an op's registered autograd (a Python kernel, with a Python call's overhead) would only
    pass the call on, because grad mode is off in eager mode (a backward without create_graph), a
    context that goes straight to the device kernel; elsewhere a no-op."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


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


def register_vmap(name, sample_inputs, masks_input=None, conditioning_inputs=()):
    """`sample_inputs`: the positions of the per-sample arguments (x, and the estimator's projections);
    `masks_input`: the position of the dropout masks, `conditioning_inputs` those of the per-sample
    biases and gates, which the rule refuses (lists of per-sample tensors, some of them empty)."""
    op = getattr(compiled, name).default

    def rule(info, in_dims, *args, **kwargs):
        if kwargs.get("masks") or (masks_input is not None and len(args) > masks_input and args[masks_input]):
            raise NotImplementedError("jacext: the ops' dropout masks are not supported under torch.vmap; call the op "
                                      "on the batch, or run the model on the generic path (method='autograd')")
        if any(len(args) > i and args[i] for i in conditioning_inputs):
            raise NotImplementedError("jacext: the ops' per-sample biases and gates are not supported under "
                                      "torch.vmap; call the op on the batch, or run the model on the generic path "
                                      "(method='autograd')")
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


def register_float32_autocast(name):
    op = getattr(compiled, name).default
    for device_type in ("cpu", "cuda"):
        def kernel(*args, device_type=device_type, **kwargs):
            with torch.autocast(device_type, enabled=False):  # excludes the autocast key: no recursion
                return op(*_to_float32(args, device_type), **kwargs)

        _autocast_lib.impl(name, kernel, "Autocast" + device_type.upper())


ActivationSpec = Union[int, str]


def normalize_activations(activations: Sequence[ActivationSpec], act_params, n_layers):
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

