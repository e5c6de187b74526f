"""The forward-carry ops (csrc/mlp_laplacian.h): fake kernels, autograd formulas and the op-level
entry points of the Laplacian and the Jacobian diagonal / divergence.

Autograd as the penalty's: each forward op differentiates through its backward op by a C++ node
(csrc/carry_autograd.cpp), and each backward op through a composite of differentiable torch ops
(_composites.py, registered here), which gives the double backward and every higher order for every
activation (piecewise-linear ones have a zero second derivative almost everywhere, so their
Laplacian is zero there)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._checks import check_residual, check_square
from ._composites import mlp_jacobian_diagonal_backward_composite, mlp_laplacian_backward_composite
from ._library import (ActivationSpec, bias_tensors, compiled, conditioning_tensors, explained_functorch_errors,
                       mask_arguments, normalize_activations, register_float32_autocast, register_vmap, widths_of)
from .layouts import TRACE_GRAM2, carry_saved_shapes, diagonal_layout, laplacian_layout
from .planner import carry_tile_size, op_element_size, resolve_diagonal_strategy

__all__ = ["mlp_laplacian", "mlp_jacobian_diagonal"]

def _given(t):
    """Whether an entry of the ops' per-sample bias or gate lists is one: an empty 1-d tensor stands
    for none (csrc/mlp_laplacian.h's checked_conditioning; a (0, n) one of an empty batch is one)."""
    return not (t.numel() == 0 and t.dim() == 1)


def _per_sample_top(*lists):
    """Whether the last layer has a per-sample bias, gate or mask (the ops' lists: None, or one
    tensor per layer, an empty one for none)."""
    return any(lst is not None and len(lst) > 0 and _given(lst[-1]) for lst in lists)


def _composite_masks(masks):
    """The composites' masks (None, or one tensor or None per layer) from the ops' argument."""
    return None if not masks else [m if _given(m) else None for m in masks]


@torch.library.register_fake("jacext::mlp_laplacian")
def _laplacian_fake(x, weights, biases, activations, act_params, gradient, directions=None, laplacian_rows=-1,
                    sample_biases=None, gates=None, masks=None, *, tile=0, residual=None):
    widths, B = widths_of(x, weights), x.shape[0]
    layout = laplacian_layout(widths, activations, gradient, None if directions is None else directions.shape[1],
                              laplacian_rows, check_residual(residual, widths),
                              _per_sample_top(sample_biases, gates, masks))
    saved = [x.new_empty(s) for s in carry_saved_shapes(widths, B, activations, layout)]
    m = widths[-1]
    return (x.new_empty(B, m), x.new_empty(B, m, layout.columns) if gradient else x.new_empty(0), x.new_empty(B, m),
            saved)


@torch.library.register_fake("jacext::mlp_jacobian_diagonal")
def _diagonal_fake(x, weights, biases, activations, act_params, strategy, projections=None, sample_biases=None,
                   gates=None, masks=None, *, tile=0, residual=None):
    B, n = x.shape
    widths = widths_of(x, weights)
    layout = diagonal_layout(widths, strategy, 0 if projections is None else projections.shape[1],
                             check_residual(residual, widths), _per_sample_top(sample_biases, gates, masks))
    saved = [x.new_empty(s) for s in carry_saved_shapes(widths, B, activations, layout)]
    out = x.new_empty(B) if strategy == TRACE_GRAM2 else x.new_empty(B, n if projections is None else projections.shape[1])
    return x.new_empty(B, n), out, saved


def _grads_fake(x, weights, biases, input_grad, sample_biases, gates):
    def per_sample(given):
        present = [_given(t) for t in given] if given else [False] * len(weights)
        return [x.new_empty(x.shape[0], w.shape[0]) if p else x.new_empty(0) for w, p in zip(weights, present)]

    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0] if b.numel() else 0) for w, b in zip(weights, biases)],
            per_sample(sample_biases), per_sample(gates))


@torch.library.register_fake("jacext::mlp_laplacian_backward")
def _laplacian_backward_fake(grad_y, grad_grad, grad_lap, x, weights, biases, activations, act_params, gradient,
                             saved, directions=None, laplacian_rows=-1, sample_biases=None, gates=None, masks=None,
                             *, tile=0, input_grad=True, residual=None):
    return _grads_fake(x, weights, biases, input_grad, sample_biases, gates)


@torch.library.register_fake("jacext::mlp_jacobian_diagonal_backward")
def _diagonal_backward_fake(grad_y, grad_out, x, weights, biases, activations, act_params, strategy, saved,
                            projections=None, sample_biases=None, gates=None, masks=None, *, tile=0,
                            input_grad=True, residual=None):
    return _grads_fake(x, weights, biases, input_grad, sample_biases, gates)


@torch.library.register_fake("jacext::activation_derivatives")
def _activation_derivatives_fake(y, activation, p0, p1):
    return y.new_empty(4, *y.shape)


def _trailing(inputs, first, defaults):
    """The trailing arguments from inputs[first] on, and how many of them get a gradient slot: the
    dispatcher drops trailing arguments left at their defaults, and they get none then."""
    values = list(inputs[first:])
    values += defaults[len(values):]
    passed = [i for i, (v, d) in enumerate(zip(values, defaults)) if (v is not None if d is None else v != d)]
    return values, passed[-1] + 1 if passed else 0


# The trailing arguments of each op, from the first after its fixed ones: (held constant, ...,
# sample_biases, gates, masks); sample_biases and gates take gradients, the masks are constants.
_LAPLACIAN_TRAILING = (None, -1, None, None, None)  # directions, laplacian_rows, sample_biases, gates, masks
_DIAGONAL_TRAILING = (None, None, None, None)  # projections, sample_biases, gates, masks


def _trailing_grads(ctx, grad_s, grad_g):
    """The gradient slots of the trailing arguments (ctx.conditioning_present: the sample_biases and
    gates given, each None or a list; ctx.masks: the masks given, None or a list)."""
    grads = [None] * (len(ctx.trailing_defaults) - 3)
    for given, grad in zip(ctx.conditioning_present, (grad_s, grad_g)):
        grads.append(None if given is None else _present(grad, given))
    grads.append(None if ctx.masks is None else [None] * len(ctx.masks))
    return grads[:ctx.n_trailing]


def _constant_masks(masks):
    """The ops' masks as given (None or a list), after checking that none requires grad."""
    if any(m.requires_grad for m in masks or ()):
        raise ValueError("jacext: masks are constants (dropout masks) and take no gradient: pass them detached")
    return masks


def _present(grads, present):
    """The gradients of a per-layer list with absent entries (an empty tensor stands for none)."""
    return [g if p else None for g, p in zip(grads, present)]


def _presence(given):
    return None if given is None else [_given(t) for t in given]


def _residual_of(keyword_only_inputs):
    residual = keyword_only_inputs.get("residual")
    return None if residual is None else list(residual)


def _backward_setup(ctx, keyword_only_inputs, grads, x, weights, biases, saved, config, trailing, defaults):
    """What the double backward needs: the backward op's incoming gradients, x, the weights, and the
    biases, per-sample biases and gates that are present (the masks are constants)."""
    held, sample_biases, gates = trailing[0], trailing[-3], trailing[-2]
    ctx.config = config
    ctx.projections = held  # held constant
    ctx.masks = _constant_masks(trailing[-1])
    ctx.residual = _residual_of(keyword_only_inputs)
    ctx.n_saved = len(saved)
    ctx.n_layers = len(weights)
    ctx.trailing_defaults = defaults
    ctx.conditioning_present = [_presence(sample_biases), _presence(gates)]
    # per layer, which entries of the three optional lists are present
    ctx.optional_present = [[b.numel() > 0 for b in biases]] + [
        p if p else [False] * len(weights) for p in ctx.conditioning_present]  # None or []: none
    ctx.grad_present = [g is not None for g in grads]
    optional = [biases, sample_biases or [], gates or []]
    ctx.save_for_backward(*[g for g in grads if g is not None], x, *weights,
                          *[t for lst, present in zip(optional, ctx.optional_present)
                            for t, p in zip(lst, present) if p])


def _double_backward(ctx, composite, gg_x, gg_w, gg_optional):
    """(gradients of the incoming gradients, of x, the weights, and of the biases, per-sample biases
    and gates) of the backward op's outputs, through composite(grads, x, weights, biases,
    sample_biases, gates) (full lists, None for an absent entry; it returns the gradients of the
    present ones)."""
    tensors = iter(ctx.saved_tensors)
    present_grads = [next(tensors) for present in ctx.grad_present if present]
    x = next(tensors)
    weights = [next(tensors) for _ in range(ctx.n_layers)]
    present_optional = [[next(tensors) for p in present if p] for present in ctx.optional_present]

    def full(values, present):
        values = iter(values)
        return [next(values) if p else None for p in present]

    def outputs(present_grads, x, weights, present_optional):
        return composite(full(present_grads, ctx.grad_present), x, weights,
                         *[full(v, p) for v, p in zip(present_optional, ctx.optional_present)])

    values, vjp = torch.func.vjp(outputs, present_grads, x, weights, present_optional)
    cotangents = [torch.zeros_like(values[0]) if gg_x is None else gg_x,
                  [torch.zeros_like(v) if g is None else g for g, v in zip(gg_w, values[1])]]
    for gg, present, vals in zip(gg_optional, ctx.optional_present, values[2:]):
        gg = [g for g, p in zip(gg, present) if p] if gg is not None else [None] * len(vals)
        cotangents.append([torch.zeros_like(v) if g is None else g for g, v in zip(gg, vals)])
    g_grads, g_x, g_w, g_optional = vjp(tuple(cotangents))
    g_b, g_s, g_g = [full(g, p) for g, p in zip(g_optional, ctx.optional_present)]
    return full(g_grads, ctx.grad_present), g_x, list(g_w), g_b, g_s, g_g


def _laplacian_backward_setup(ctx, inputs, keyword_only_inputs, output):
    grad_y, grad_grad, grad_lap, x, weights, biases, activations, act_params, gradient, saved = inputs[:10]
    trailing, ctx.n_trailing = _trailing(inputs, 10, _LAPLACIAN_TRAILING)
    _backward_setup(ctx, keyword_only_inputs, (grad_y, grad_grad, grad_lap), x, weights, biases, saved,
                    (list(activations), list(act_params), trailing[1]), trailing, _LAPLACIAN_TRAILING)


def _laplacian_backward_backward(ctx, gg_x, gg_w, gg_b, gg_s, gg_g):
    activations, act_params, laplacian_rows = ctx.config

    def composite(grads, x, weights, biases, sample_biases, gates):
        return mlp_laplacian_backward_composite(*grads, x, weights, biases, activations, act_params,
                                                ctx.projections, laplacian_rows, ctx.residual, sample_biases, gates,
                                                _composite_masks(ctx.masks))

    g_grads, g_x, g_w, g_b, g_s, g_g = _double_backward(ctx, composite, gg_x, gg_w, (gg_b, gg_s, gg_g))
    # no gradient flows into `saved`: the composite differentiates through x, weights and biases
    return (*g_grads, g_x, g_w, g_b, None, None, None, [None] * ctx.n_saved, *_trailing_grads(ctx, g_s, g_g))


def _diagonal_backward_setup(ctx, inputs, keyword_only_inputs, output):
    grad_y, grad_out, x, weights, biases, activations, act_params, strategy, saved = inputs[:9]
    trailing, ctx.n_trailing = _trailing(inputs, 9, _DIAGONAL_TRAILING)
    _backward_setup(ctx, keyword_only_inputs, (grad_y, grad_out), x, weights, biases, saved,
                    (list(activations), list(act_params), strategy), trailing, _DIAGONAL_TRAILING)


def _diagonal_backward_backward(ctx, gg_x, gg_w, gg_b, gg_s, gg_g):
    activations, act_params, strategy = ctx.config

    def composite(grads, x, weights, biases, sample_biases, gates):
        return mlp_jacobian_diagonal_backward_composite(*grads, x, weights, biases, activations, act_params,
                                                        trace=strategy == TRACE_GRAM2, projections=ctx.projections,
                                                        residual=ctx.residual, sample_biases=sample_biases,
                                                        gates=gates, masks=_composite_masks(ctx.masks))

    g_grads, g_x, g_w, g_b, g_s, g_g = _double_backward(ctx, composite, gg_x, gg_w, (gg_b, gg_s, gg_g))
    return (*g_grads, g_x, g_w, g_b, None, None, None, [None] * ctx.n_saved, *_trailing_grads(ctx, g_s, g_g))


torch.library.register_autograd("jacext::mlp_laplacian_backward", _laplacian_backward_backward,
                                setup_context=_laplacian_backward_setup)
torch.library.register_autograd("jacext::mlp_jacobian_diagonal_backward", _diagonal_backward_backward,
                                setup_context=_diagonal_backward_setup)

# Under torch.autocast the ops run in float32, as the Frobenius ops (_jacobian_ops.py): a second derivative
# carried through several layers loses too much in half precision. torch.func.vmap over the samples
# folds into the op's batch, over anything else loops (_library.register_vmap).
for _op in ("mlp_laplacian", "mlp_jacobian_diagonal"):
    register_float32_autocast(_op)
# x, directions (mlp_laplacian expands them to the batch); sample_biases, gates; masks
register_vmap("mlp_laplacian", sample_inputs=(0, 6), masks_input=10, conditioning_inputs=(8, 9))
register_vmap("mlp_jacobian_diagonal", sample_inputs=(0, 6), masks_input=9, conditioning_inputs=(7, 8))


@explained_functorch_errors
def mlp_laplacian(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                  activations: Sequence[ActivationSpec], act_params=None, return_gradient: bool = False,
                  directions: Optional[torch.Tensor] = None, laplacian_rows: Optional[int] = None,
                  residual: Optional[Sequence[int]] = None,
                  sample_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  gates: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  masks: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """(y, lap), or (y, grad, lap) with return_gradient: lap[b, i] = sum_j d^2 y_i / dx_j^2 (B, m)
    and grad = dy/dx (B, m, n_0), from one fused forward-Laplacian op (csrc/mlp_laplacian.h).

    directions V (B or 1, c, n_0): the tangent rows carried instead of the n_0 unit vectors (held
    constant: no gradient reaches them); grad[b] = (dy_b/dx_b) V_b^T (B, m, c). laplacian_rows k:
    lap sums v_j^T (d^2 y_i / dx^2) v_j over the first k rows only (None: all); without the gradient
    only those k rows are carried. residual (None, or per layer i: -1 or j <= i): layer i's
    output adds the input of layer j (a skip h + g(h), same width). sample_biases, gates (None, or
    per layer None or (B, n_{i+1})): layer i's pre-activation is gate * (h W^T) + b + sample_bias
    (conditioning inside the net; both differentiable). masks (None, or per layer None or (B, n_{i+1})):
    a constant factor after layer i's activation, h = mask * act(z) (a dropout mask; before a skip's
    sum; no gradient)."""
    codes, params = normalize_activations(activations, act_params, len(weights))
    widths = widths_of(x, weights)
    residual = check_residual(residual, widths)
    if directions is not None:
        if directions.dim() != 3 or directions.shape[0] not in (1, x.shape[0]) or directions.shape[2] != widths[0]:
            raise ValueError(f"directions must have shape (batch={x.shape[0]} or 1, c, features={widths[0]}), "
                             f"got {tuple(directions.shape)}")
        # to the batch (stride 0, no copy), so that vmap folds it with x
        directions = directions.expand(x.shape[0], -1, -1)
    rows = widths[0] if directions is None else directions.shape[1]
    if laplacian_rows is not None and not 1 <= laplacian_rows <= rows:
        raise ValueError(f"laplacian_rows must be in [1, {rows}] (the carried rows), got {laplacian_rows}")
    laplacian_rows = -1 if laplacian_rows is None else int(laplacian_rows)
    sample_biases, gates = conditioning_tensors(sample_biases, weights), conditioning_tensors(gates, weights)
    masks = mask_arguments(masks, x)
    layout = laplacian_layout(widths, codes, return_gradient, None if directions is None else rows, laplacian_rows,
                              residual, _per_sample_top(sample_biases, gates, masks))
    tile = carry_tile_size(widths, x.shape[0], layout, op_element_size(x), x.device)
    y, grad, lap, _ = compiled.mlp_laplacian(x, list(weights), bias_tensors(biases, weights), codes, params,
                                             bool(return_gradient), directions, laplacian_rows, sample_biases, gates,
                                             masks, tile=tile, residual=residual)
    return (y, grad, lap) if return_gradient else (y, lap)


@explained_functorch_errors
def mlp_jacobian_diagonal(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                          activations: Sequence[ActivationSpec], act_params=None, method: str = "auto",
                          trace: bool = False, projections: Optional[torch.Tensor] = None,
                          residual: Optional[Sequence[int]] = None,
                          sample_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                          gates: Optional[Sequence[Optional[torch.Tensor]]] = None,
                          masks: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """(y, out) for a square MLP: out = diag(dy/dx) (B, n), or with trace its sum, the divergence
    (B,); method "auto", "forward" or "gram" (planner.resolve_diagonal_strategy). With
    method="hutchinson", projections V (B, k, n) and out[b, j] = v_bj^T (dy_b/dx_b) v_bj (B, k).
    residual, sample_biases, gates and masks as in mlp_laplacian (the closed forms do not apply across a
    skip or with per-sample biases, gates or masks)."""
    if (method == "hutchinson") != (projections is not None):
        raise ValueError("projections go with method='hutchinson', and only with it")
    codes, params = normalize_activations(activations, act_params, len(weights))
    widths = widths_of(x, weights)
    check_square(widths)
    residual = check_residual(residual, widths)
    sample_biases, gates = conditioning_tensors(sample_biases, weights), conditioning_tensors(gates, weights)
    masks = mask_arguments(masks, x)
    per_sample = sample_biases is not None or gates is not None or masks is not None
    strategy = resolve_diagonal_strategy(method, widths, codes, trace, x.shape[0], residual, per_sample)
    rows = 0 if projections is None else projections.shape[1]
    layout = diagonal_layout(widths, strategy, rows, residual, _per_sample_top(sample_biases, gates, masks))
    tile = carry_tile_size(widths, x.shape[0], layout, op_element_size(x), x.device)
    y, out, _ = compiled.mlp_jacobian_diagonal(x, list(weights), bias_tensors(biases, weights), codes, params, strategy,
                                               projections, sample_biases, gates, masks, tile=tile, residual=residual)
    if trace and projections is None and strategy != TRACE_GRAM2:
        with torch.autocast(x.device.type, enabled=False):  # the op's float32 result stays float32
            out = out.sum(1)
    return y, out
