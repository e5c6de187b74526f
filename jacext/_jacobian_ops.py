"""The Jacobian op family (csrc/mlp_jacobian.h): mlp_jacobian_frobenius, mlp_jacobian and their
backward op; their fake kernels, autograd, vmap and autocast rules, and the op-level entry points.

Autograd: the two forward ops differentiate through the backward op (compiled kernels):
mlp_jacobian_frobenius by a C++ autograd node (csrc/frobenius_autograd.cpp), mlp_jacobian by the
formulas registered here. The backward op differentiates through
_composites.mlp_jacobian_backward_composite (torch ops), which gives the double backward and every
higher order."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.utils.checkpoint

from . import activations as act
from ._checks import check_residual
from ._composites import mlp_jacobian_backward_composite
from ._library import (ActivationSpec, below_autograd, bias_tensors, compiled, conditioning_tensors,
                       explained_functorch_errors, normalize_activations, register_float32_autocast, register_vmap,
                       mask_arguments, warn_if_tf32, widths_of)
from .layouts import REVERSE, REVERSE_GRAM, first_carry_index, saved_shapes
from .planner import Split, batch_chunk, default_memory_budget, op_element_size, resolve_strategy, tile_size

__all__ = ["mlp_jacobian_frobenius", "mlp_jacobian", "mlp_jacobians", "mlp_jacobian_grams", "batched_gram"]


def _masked(masks):
    """Which layers the op's `masks` argument gives a mask (empty: none); also for its `gates`."""
    return [m.numel() > 0 or m.dim() != 1 for m in masks or ()]


def _diagonal_factors(masks, gates):
    """Which layers have a per-sample diagonal factor (a mask or a gate: d saved even for an identity
    layer), from the ops' arguments; empty for none."""
    masked, gated = _masked(masks), _masked(gates)
    if not gated:
        return masked
    return [g or (bool(masked) and masked[i]) for i, g in enumerate(gated)]


def _diagonal_at_output(masks, gates):
    """Whether the last layer has a mask or a gate: a diagonal there, so that the output is not linear
    for strategies 3 and 4."""
    return any(factors and factors[-1] for factors in (_masked(masks), _masked(gates)))


@torch.library.register_fake("jacext::mlp_jacobian_frobenius")
def _frobenius_fake(x, weights, biases, activations, act_params, strategy, projections=None, masks=None,
                    sample_biases=None, gates=None, *, tile=0, residual=None):
    B = x.shape[0]
    rows = None if projections is None else projections.shape[1]
    saved = [x.new_empty(s) for s in saved_shapes(widths_of(x, weights), B, 0, strategy, rows, activations,
                                                  _diagonal_factors(masks, gates))]
    sq = x.new_empty(B) if projections is None else x.new_empty(B, rows)
    return x.new_empty(B, weights[-1].shape[0]), sq, saved


@torch.library.register_fake("jacext::mlp_jacobian")
def _jacobian_fake(x, weights, biases, activations, act_params, layer, strategy, masks=None, sample_biases=None,
                   gates=None, *, tile=0, gram=False, residual=None):
    widths = widths_of(x, weights)
    saved = [x.new_empty(s) for s in saved_shapes(widths, x.shape[0], layer, strategy, None, activations,
                                                  _diagonal_factors(masks, gates))]
    columns = widths[-1] if gram else widths[layer]  # gram: J J^T
    return x.new_empty(x.shape[0], widths[-1]), x.new_empty(x.shape[0], widths[-1], columns), saved


@torch.library.register_fake("jacext::mlp_jacobian_backward")
def _backward_fake(grad_y, grad_sq, grad_jac, x, weights, biases, activations, act_params, layer,
                   strategy, saved, grad_carries, projections=None, masks=None, sample_biases=None, gates=None, *,
                   tile=0, input_grad=True, residual=None):
    # contiguous like the kernels' outputs (x may not be); an empty gradient for a layer without bias,
    # per-sample bias or gate
    def per_sample(given):
        present = _masked(given) or [False] * len(weights)
        return [x.new_empty(x.shape[0], w.shape[0]) if p else x.new_empty(0) for w, p in zip(weights, present)]

    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0] if b.numel() else 0) for w, b in zip(weights, biases)],
            per_sample(sample_biases), per_sample(gates))


def _trailing(inputs, first, count):
    """The `count` trailing arguments from inputs[first] on (None where absent: every one defaults to
    None) and how many were passed: the dispatcher drops trailing arguments left at their default, and
    they get no gradient slot then."""
    values = list(inputs[first:]) + [None] * (count - len(inputs[first:]))
    return values, max((i + 1 for i, v in enumerate(values) if v is not None), default=0)


def _given(lst):
    """Per layer, whether an entry of a per-layer list argument is given (None for no list)."""
    return None if lst is None else _masked(lst)


def _conditioning_grads(grads, given):
    """The gradient slot of a per-sample bias or gate list: None for no list, else one per entry (None
    where absent)."""
    return None if given is None else [g if p else None for g, p in zip(grads, given)]



def _save_forward(ctx, x, weights, biases, activations, act_params, layer, strategy, tile, masks, saved,
                  differentiable_carries=False, residual=None, sample_biases=None, gates=None):
    # An unused output's gradient stays None: zero-filling the (large) saved carries would cost a
    # full memory pass each, and the backward op takes None for grad_y, grad_sq and grad_jac.
    ctx.set_materialize_grads(False)
    ctx.config = (list(activations), list(act_params), layer, strategy)
    ctx.tile = tile  # the backward runs the same tiles
    ctx.masks = masks  # constants (checked in _jacobian_setup)
    ctx.residual = residual
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.conditioning_given = [_given(sample_biases), _given(gates)]
    ctx.save_for_backward(x, *weights, *biases, *(sample_biases or []), *(gates or []), *saved)
    # Reverse carries are the Jacobians dy/dh_i above `layer` and may be differentiated
    # (mlp_jacobians); the rest of `saved` is internal (with strategy 2 the last carry too: P = S G).
    ctx.carries_start = first_carry_index(len(weights))
    internal = saved[:ctx.carries_start] + (saved[-1:] if strategy == REVERSE_GRAM else [])
    ctx.mark_non_differentiable(*(internal if differentiable_carries else saved))


def _load_forward(ctx):
    """x, weights, biases, saved and the (sample_biases, gates) as given (None or a list each)."""
    tensors = list(ctx.saved_tensors)
    L = ctx.n_layers
    rest = tensors[1 + 2 * L:]
    conditioning = []
    for given in ctx.conditioning_given:
        conditioning.append(None if given is None else rest[:len(given)])
        rest = rest[0 if given is None else len(given):]
    return tensors[0], tensors[1:1 + L], tensors[1 + L:1 + 2 * L], rest, conditioning




def _backward_via_op(ctx, grad_y, grad_jac, grad_saved=None):
    """The gradients of x, the weights, the biases, and the slots of the per-sample biases and gates."""
    x, weights, biases, saved, (sample_biases, gates) = _load_forward(ctx)
    activations, act_params, layer, strategy = ctx.config
    grad_carries = [] if grad_saved is None else grad_saved[ctx.carries_start:]
    if all(g is None for g in grad_carries):
        grad_carries = []
    else:  # the op takes an empty tensor for a carry without gradient
        grad_carries = [x.new_empty(0) if g is None else g for g in grad_carries]
    with below_autograd():  # with create_graph, the backward op's own autograd records the double backward
        grad_x, grad_w, grad_b, grad_s, grad_g = compiled.mlp_jacobian_backward(
            grad_y, None, grad_jac, x, weights, biases, activations, act_params, layer,
            strategy, saved, grad_carries, None, ctx.masks, sample_biases, gates, tile=ctx.tile,
            input_grad=ctx.needs_input_grad[0], residual=ctx.residual)
    grad_b = [g if present else None for g, present in zip(grad_b, ctx.bias_present)]
    return (grad_x, list(grad_w), grad_b, _conditioning_grads(grad_s, ctx.conditioning_given[0]),
            _conditioning_grads(grad_g, ctx.conditioning_given[1]))


def _jacobian_setup(ctx, inputs, keyword_only_inputs, output):
    x, weights, biases, activations, act_params, layer, strategy = inputs[:7]
    (masks, sample_biases, gates), ctx.n_trailing = _trailing(inputs, 7, 3)
    if any(m.requires_grad for m in masks or ()):
        raise ValueError("jacext: masks are constants (dropout masks) and take no gradient: pass them detached")
    ctx.n_masks = None if masks is None else len(masks)
    _save_forward(ctx, x, weights, biases, activations, act_params, layer, strategy, keyword_only_inputs.get("tile", 0),
                  masks, output[2], differentiable_carries=strategy in (REVERSE, REVERSE_GRAM),
                  residual=keyword_only_inputs.get("residual"), sample_biases=sample_biases, gates=gates)


def _jacobian_backward(ctx, grad_y, grad_jac, grad_saved):
    grad_x, grad_w, grad_b, grad_s, grad_g = _backward_via_op(ctx, grad_y, grad_jac, grad_saved)
    # gradient slots for the trailing arguments passed: the masks (constants), the conditioning
    trailing = [None if ctx.n_masks is None else [None] * ctx.n_masks, grad_s, grad_g][:ctx.n_trailing]
    return (grad_x, grad_w, grad_b, None, None, None, None, *trailing)


def _backward_setup(ctx, inputs, keyword_only_inputs, output):
    (grad_y, grad_sq, grad_jac, x, weights, biases, activations, act_params, layer, _, saved,
     grad_carries) = inputs[:12]
    (projections, masks, sample_biases, gates), ctx.n_trailing = _trailing(inputs, 12, 4)
    ctx.n_masks = None if masks is None else len(masks)
    ctx.conditioning_given = [_given(sample_biases), _given(gates)]
    ctx.projections = projections  # random draws, held constant: not differentiated
    ctx.residual = keyword_only_inputs.get("residual")
    # constants, like the projections
    ctx.masks = [m if present else None for m, present in zip(masks, _masked(masks))] if masks else None
    # strategy 2 with a gradient for J: the op returned J J^T (mlp_jacobian's Gram output)
    ctx.config = (list(activations), list(act_params), layer, inputs[9] == REVERSE_GRAM and grad_jac is not None)
    ctx.n_saved = len(saved)
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.grad_present = [g is not None for g in (grad_y, grad_sq, grad_jac)]
    ctx.carry_grad_present = [g.numel() > 0 for g in grad_carries]
    # per layer, which entries of the three differentiable per-layer lists are present
    ctx.optional_present = [ctx.bias_present] + [given or [False] * len(weights) for given in ctx.conditioning_given]
    optional = [biases, sample_biases or [], gates or []]
    ctx.save_for_backward(*[g for g in (grad_y, grad_sq, grad_jac) if g is not None],
                          *[g for g in grad_carries if g.numel() > 0], x, *weights,
                          *[t for lst, present in zip(optional, ctx.optional_present)
                            for t, p in zip(lst, present) if p])


def _backward_backward(ctx, gg_x, gg_w, gg_b, gg_s, gg_g):
    tensors = iter(ctx.saved_tensors)
    present_grads = [next(tensors) for present in ctx.grad_present + ctx.carry_grad_present if present]
    x = next(tensors)
    weights = [next(tensors) for _ in range(ctx.n_layers)]
    present_optional = [[next(tensors) for p in present if p] for present in ctx.optional_present]
    activations, act_params, layer, gram_output = ctx.config

    def full(values, present):
        values = iter(values)
        return [next(values) if p else None for p in present]

    def composite(present_grads, x, weights, present_optional):
        grads = iter(present_grads)
        grad_y, grad_sq, grad_jac = [next(grads) if p else None for p in ctx.grad_present]
        grad_carries = [next(grads) if p else None for p in ctx.carry_grad_present]
        biases, sample_biases, gates = [full(v, p) for v, p in zip(present_optional, ctx.optional_present)]
        return mlp_jacobian_backward_composite(grad_y, grad_sq, grad_jac, x, weights, biases,
                                               activations, act_params, layer, ctx.projections,
                                               grad_carries, gram_output, ctx.masks, ctx.residual,
                                               sample_biases, gates)

    with torch.autocast(x.device.type, enabled=False):  # float32 like the op it differentiates
        outputs, vjp = torch.func.vjp(composite, present_grads, x, weights, present_optional)
    incoming = [[g for g, p in zip(gg, present) if p] if gg is not None else [None] * sum(present)
                for gg, present in zip((gg_b, gg_s, gg_g), ctx.optional_present)]
    cotangents = (
        torch.zeros_like(outputs[0]) if gg_x is None else gg_x,
        [torch.zeros_like(o) if g is None else g for g, o in zip(gg_w, outputs[1])],
        *[[torch.zeros_like(o) if g is None else g for g, o in zip(gs, os)] for gs, os in zip(incoming, outputs[2:])],
    )
    with torch.autocast(x.device.type, enabled=False):
        g_grads, g_x, g_w, g_optional = vjp(cotangents)
    g_grads = iter(g_grads)
    grads_out = [next(g_grads) if present else None for present in ctx.grad_present]
    g_carries = [next(g_grads) if present else None for present in ctx.carry_grad_present]
    g_biases, g_s, g_g = [full(v, p) for v, p in zip(g_optional, ctx.optional_present)]
    # No gradient flows into `saved`: the composite differentiates through x, weights and the
    # biases; the projections and masks are constants.
    trailing = [None, None if ctx.n_masks is None else [None] * ctx.n_masks,
                None if ctx.conditioning_given[0] is None else g_s,
                None if ctx.conditioning_given[1] is None else g_g][:ctx.n_trailing]
    return (*grads_out, g_x, list(g_w), g_biases, None, None, None, None, [None] * ctx.n_saved,
            g_carries, *trailing)


torch.library.register_autograd("jacext::mlp_jacobian", _jacobian_backward,
                                setup_context=_jacobian_setup)
torch.library.register_autograd("jacext::mlp_jacobian_backward", _backward_backward,
                                setup_context=_backward_setup)


# x, projections; the masks; the sample_biases and gates
register_vmap("mlp_jacobian_frobenius", sample_inputs=(0, 6), masks_input=7, conditioning_inputs=(8, 9))
register_vmap("mlp_jacobian", sample_inputs=(0,), masks_input=7, conditioning_inputs=(8, 9))
register_float32_autocast("mlp_jacobian_frobenius")
register_float32_autocast("mlp_jacobian")


@explained_functorch_errors
def mlp_jacobian_frobenius(x: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Sequence[Optional[torch.Tensor]],
                           activations: Sequence[ActivationSpec], act_params=None,
                           method: str = "auto", projections: Optional[torch.Tensor] = None,
                           max_memory: Optional[int] = None, masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                           residual: Optional[Sequence[int]] = None,
                           sample_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                           gates: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """(y, sq): the MLP output and sq[b] = ||dy_b/dx_b||_F^2, in one fused op.

    activations: one name or code per weight (e.g. ["tanh", "identity"]); act_params: two
    floats per layer (slope / beta, threshold / alpha), torch's defaults when None.
    method="hutchinson" takes projections V (B, k, m) and returns sq[b, i] = ||v_bi^T J_b||^2.
    max_memory (bytes; default a quarter of the device's memory): when the plan's estimated
    peak (planner.footprint) exceeds it, the batch runs in chunks, each recomputed in the
    backward instead of keeping its carries (torch.utils.checkpoint); the result is unchanged.
    Under torch.compile the batch runs in one call.
    masks: None, or one (B, n_{i+1}) tensor or None per layer: a constant per-sample factor after
    the layer's activation (a dropout mask), h_{i+1} = mask * act(y); J is the masked network's.
    residual: None, or per layer i -1 or the j <= i whose input h_j is added to layer i's output
    (h + g(h), after the mask); with skips J is carried in reverse or forward (not "gram").
    sample_biases, gates: None, or one (B, n_{i+1}) tensor or None per layer: layer i's pre-activation
    is gate * (h W^T) + b + sample_bias (conditioning inside the net; both differentiable); a gate
    is one more per-sample diagonal of J, and on the last layer it rules out strategies 3 and 4."""
    if (method == "hutchinson") != (projections is not None):
        raise ValueError("projections go with method='hutchinson', and only with it")
    warn_if_tf32(x.device, x.dtype)
    codes, params = normalize_activations(activations, act_params, len(weights))
    rows = None if projections is None else projections.shape[1]
    widths = widths_of(x, weights)
    masks = mask_arguments(masks, x) or []
    sample_biases, gates = conditioning_tensors(sample_biases, weights) or [], conditioning_tensors(gates, weights) or []
    residual = check_residual(residual, widths)
    # a mask or gate on the last layer is a diagonal there: the output is not linear for strategies 3 and 4
    strategy = resolve_strategy(method, widths, batch=x.shape[0], projections=rows or 0,
                                output_linear=codes[-1] == act.IDENTITY and not _diagonal_at_output(masks, gates),
                                skips=residual is not None)
    if max_memory is not None and (not isinstance(max_memory, int) or max_memory <= 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    weights, biases = list(weights), bias_tensors(biases, weights)

    n_masks, n_biases = len(masks), len(sample_biases)

    def run(x, projections, *factors):  # the masks, the per-sample biases, the gates (each list or none)
        masks, sample_biases, gates = (list(factors[:n_masks]), list(factors[n_masks:n_masks + n_biases]),
                                       list(factors[n_masks + n_biases:]))
        if isinstance(strategy, Split):
            return _split_frobenius(x, weights, biases, codes, params, strategy, masks, sample_biases, gates)
        tile = tile_size(widths, x.shape[0], strategy, op_element_size(x), rows, device=x.device)
        return compiled.mlp_jacobian_frobenius(x, weights, biases, codes, params, strategy, projections,
                                               masks or None, sample_biases or None, gates or None, tile=tile,
                                               residual=residual)[:2]

    factors = [*masks, *sample_biases, *gates]
    if torch.compiler.is_compiling():  # a compiled graph runs the batch in one call
        return run(x, projections, *factors)
    if max_memory is None:
        max_memory = default_memory_budget(x.device)
    chunk = batch_chunk(widths, x.shape[0], strategy, op_element_size(x), max_memory, rows)
    if chunk == x.shape[0]:
        return run(x, projections, *factors)
    # Checkpointing keeps each chunk's carries alive only during its own forward and backward.
    recompute = torch.is_grad_enabled()
    x_parts = x.split(chunk)
    v_parts = [None] * len(x_parts) if projections is None else projections.split(chunk)
    # each chunk takes its rows of the masks, biases and gates (an absent one, empty, stays empty)
    m_parts = list(zip(*[m.split(chunk) if m.dim() == 2 else [m] * len(x_parts) for m in factors])) or \
        [()] * len(x_parts)
    parts = [torch.utils.checkpoint.checkpoint(run, xc, vc, *mc, use_reentrant=False) if recompute
             else run(xc, vc, *mc) for xc, vc, mc in zip(x_parts, v_parts, m_parts)]
    return torch.cat([y for y, _ in parts]), torch.cat([sq for _, sq in parts])


def _split_frobenius(x, weights, biases, codes, params, split: Split, masks=(), sample_biases=(), gates=()):
    """(y, ||J||^2) with J = A C split at hidden layer s: C = dh_s/dx and A = dy/dh_s from two
    jacobian ops (each differentiable twice), combined per sample; each takes its layers' masks,
    per-sample biases and gates."""
    s = split.layer
    widths = widths_of(x, weights)
    h, c, _ = compiled.mlp_jacobian(x, weights[:s], biases[:s], codes[:s], params[:2 * s], 0, split.bottom,
                                    list(masks[:s]) or None, list(sample_biases[:s]) or None, list(gates[:s]) or None,
                                    tile=tile_size(widths[:s + 1], x.shape[0], split.bottom, op_element_size(x),
                                                   device=x.device))
    y, a, _ = compiled.mlp_jacobian(h, weights[s:], biases[s:], codes[s:], params[2 * s:], 0, split.top,
                                    list(masks[s:]) or None, list(sample_biases[s:]) or None, list(gates[s:]) or None,
                                    tile=tile_size(widths[s:], x.shape[0], split.top, op_element_size(x),
                                                   device=x.device))
    with torch.autocast(x.device.type, enabled=False):  # the ops' float32 results stay float32
        return _combine_split(y, a, c, split)


def _combine_split(y, a, c, split: Split):
    if split.gram:  # sum_ij (A^T A)_ij (C C^T)_ij: n_s^2 (m + n_0) per sample
        return y, (torch.bmm(a.transpose(1, 2), a) * torch.bmm(c, c.transpose(1, 2))).sum((1, 2))
    return y, torch.bmm(a, c).square().sum((1, 2))  # m n_s n_0 per sample


@explained_functorch_errors
def mlp_jacobian(x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[Optional[torch.Tensor]], activations: Sequence[ActivationSpec],
                 act_params=None, layer: int = 0, method: str = "auto",
                 masks: Optional[Sequence[Optional[torch.Tensor]]] = None, residual: Optional[Sequence[int]] = None,
                 sample_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 gates: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """(y, J): the MLP output and J[b] = dy_b/dh_layer,b of shape (B, m, n_layer); masks, residual,
    sample_biases and gates as in mlp_jacobian_frobenius (with skips, J is the derivative at the node
    h_layer: a skip that starts below it and ends above it is held fixed)."""
    warn_if_tf32(x.device, x.dtype)
    codes, params = normalize_activations(activations, act_params, len(weights))
    if not 0 <= layer < len(weights):
        raise ValueError(f"layer must be in [0, {len(weights) - 1}] for a model with {len(weights)} "
                         f"Linear layers, got {layer}")
    widths = widths_of(x, weights)
    residual = check_residual(residual, widths)
    strategy = resolve_strategy(method, widths, layer, frobenius=False, batch=x.shape[0], skips=residual is not None)
    tile = tile_size(widths, x.shape[0], strategy, op_element_size(x), layer=layer, device=x.device)
    y, jac, _ = compiled.mlp_jacobian(x, list(weights), bias_tensors(biases, weights), codes, params, layer, strategy,
                                      mask_arguments(masks, x), conditioning_tensors(sample_biases, weights),
                                      conditioning_tensors(gates, weights), tile=tile, residual=residual)
    return y, jac


def _checked_layers(layers, depth):
    layers = list(layers)
    if not layers or any(not isinstance(l, int) or not 0 <= l < depth for l in layers):
        raise ValueError(f"layers must be a non-empty list of integers in [0, {depth - 1}], got {layers}")
    return layers


@explained_functorch_errors
def mlp_jacobians(x: torch.Tensor, weights: Sequence[torch.Tensor],
                  biases: Sequence[Optional[torch.Tensor]], activations: Sequence[ActivationSpec],
                  act_params=None, layers: Sequence[int] = (0,),
                  masks: Optional[Sequence[Optional[torch.Tensor]]] = None, residual: Optional[Sequence[int]] = None,
                  sample_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  gates: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """(y, [J_l for l in layers]): the Jacobians dy/dh_l at several layers from one reverse sweep
    (the sweep down to the lowest layer passes every layer above it), each differentiable twice;
    masks, residual, sample_biases and gates as in mlp_jacobian."""
    warn_if_tf32(x.device, x.dtype)
    codes, params = normalize_activations(activations, act_params, len(weights))
    depth = len(weights)
    layers = _checked_layers(layers, depth)
    residual = check_residual(residual, widths_of(x, weights))
    tile = tile_size(widths_of(x, weights), x.shape[0], REVERSE, op_element_size(x), layer=min(layers), device=x.device)
    y, _, saved = compiled.mlp_jacobian(x, list(weights), bias_tensors(biases, weights), codes, params, min(layers),
                                        REVERSE, mask_arguments(masks, x), conditioning_tensors(sample_biases, weights),
                                        conditioning_tensors(gates, weights), tile=tile, residual=residual)
    carries = saved[first_carry_index(depth):]  # dy/dh_i for i = L-1 down to min(layers)
    return y, [carries[depth - 1 - l] for l in layers]


class _BatchedGram(torch.autograd.Function):
    """J J^T per sample, (B, m, m) from (B, m, n). Its backward is one batched product (A + A^T) J;
    autograd's for `jac @ jac.transpose(1, 2)` is two (one of them with a transposed operand) and
    an add over (B, m, n). Written in torch ops, so it is
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


def batched_gram(jac: torch.Tensor) -> torch.Tensor:
    """J J^T per sample (B, m, m) from J (B, m, n), differentiable to any order."""
    return _BatchedGram.apply(jac)


@explained_functorch_errors
def mlp_jacobian_grams(x: torch.Tensor, weights: Sequence[torch.Tensor],
                       biases: Sequence[Optional[torch.Tensor]], activations: Sequence[ActivationSpec],
                       act_params=None, layers: Sequence[int] = (0,),
                       masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       residual: Optional[Sequence[int]] = None,
                       sample_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       gates: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """(y, [J_l J_l^T for l in layers]), each (B, m, m) and differentiable twice, from one reverse
    sweep. At the input layer J_0 J_0^T = S G S^T (S = R^(1) D_1, G = W_1 W_1^T once per batch)
    replaces J_0 = S W_1 where that needs fewer multiply-adds (the planner's choice between the
    reverse carry and its Gram epilogue): m n_1^2 instead of m n_1 n_0 per sample (not across a
    skip: with residual skips every Gram is formed from its J). masks, residual, sample_biases and
    gates as in mlp_jacobian."""
    warn_if_tf32(x.device, x.dtype)
    codes, params = normalize_activations(activations, act_params, len(weights))
    depth = len(weights)
    layers = _checked_layers(layers, depth)
    widths = widths_of(x, weights)
    residual = check_residual(residual, widths)
    gram_at_input = 0 in layers and resolve_strategy("reverse", widths, batch=x.shape[0],
                                                     skips=residual is not None) == REVERSE_GRAM
    strategy, low = (REVERSE_GRAM, 0) if gram_at_input else (REVERSE, min(layers))
    tile = tile_size(widths, x.shape[0], strategy, op_element_size(x), layer=low, device=x.device)
    y, out, saved = compiled.mlp_jacobian(x, list(weights), bias_tensors(biases, weights), codes, params, low,
                                          strategy, mask_arguments(masks, x), conditioning_tensors(sample_biases, weights),
                                          conditioning_tensors(gates, weights), tile=tile, gram=gram_at_input,
                                          residual=residual)
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
