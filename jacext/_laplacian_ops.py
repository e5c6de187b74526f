"""The forward-carry ops (csrc/mlp_laplacian.h): fake kernels, autograd formulas and the op-level
entry points of the Laplacian and the Jacobian diagonal / divergence.

Autograd as in _jacobian_ops: each forward op differentiates through its backward op (compiled
kernels), and each backward op through a composite of differentiable torch ops (_composites.py), which gives
the double backward and every higher order for every activation (piecewise-linear ones have a
zero second derivative almost everywhere, so their Laplacian is zero there)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._checks import check_residual, check_square
from ._composites import mlp_jacobian_diagonal_backward_composite, mlp_laplacian_backward_composite
from ._library import (ActivationSpec, bias_tensors, compiled, explained_functorch_errors, normalize_activations,
                       register_float32_autocast, register_vmap, widths_of)
from .layouts import TRACE_GRAM2, carry_saved_shapes, diagonal_layout, laplacian_layout
from .planner import carry_tile_size, op_element_size, resolve_diagonal_strategy

__all__ = ["mlp_laplacian", "mlp_jacobian_diagonal"]

@torch.library.register_fake("jacext::mlp_laplacian")
def _laplacian_fake(x, weights, biases, activations, act_params, gradient, directions=None, laplacian_rows=-1, *,
                    tile=0, residual=None):
    widths, B = widths_of(x, weights), x.shape[0]
    layout = laplacian_layout(widths, activations, gradient, None if directions is None else directions.shape[1],
                              laplacian_rows, check_residual(residual, widths))
    saved = [x.new_empty(s) for s in carry_saved_shapes(widths, B, activations, layout)]
    m = widths[-1]
    return (x.new_empty(B, m), x.new_empty(B, m, layout.columns) if gradient else x.new_empty(0), x.new_empty(B, m),
            saved)


@torch.library.register_fake("jacext::mlp_jacobian_diagonal")
def _diagonal_fake(x, weights, biases, activations, act_params, strategy, projections=None, *, tile=0,
                   residual=None):
    B, n = x.shape
    widths = widths_of(x, weights)
    layout = diagonal_layout(widths, strategy, 0 if projections is None else projections.shape[1],
                             check_residual(residual, widths))
    saved = [x.new_empty(s) for s in carry_saved_shapes(widths, B, activations, layout)]
    out = x.new_empty(B) if strategy == TRACE_GRAM2 else x.new_empty(B, n if projections is None else projections.shape[1])
    return x.new_empty(B, n), out, saved


def _grads_fake(x, weights, biases, input_grad):
    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0] if b.numel() else 0) for w, b in zip(weights, biases)])


@torch.library.register_fake("jacext::mlp_laplacian_backward")
def _laplacian_backward_fake(grad_y, grad_grad, grad_lap, x, weights, biases, activations, act_params, gradient,
                             saved, directions=None, laplacian_rows=-1, *, tile=0, input_grad=True, residual=None):
    return _grads_fake(x, weights, biases, input_grad)


@torch.library.register_fake("jacext::mlp_jacobian_diagonal_backward")
def _diagonal_backward_fake(grad_y, grad_out, x, weights, biases, activations, act_params, strategy, saved,
                            projections=None, *, tile=0, input_grad=True, residual=None):
    return _grads_fake(x, weights, biases, input_grad)


@torch.library.register_fake("jacext::activation_derivatives")
def _activation_derivatives_fake(y, activation, p0, p1):
    return y.new_empty(4, *y.shape)


def _save_forward(ctx, inputs, keyword_only_inputs, saved, config, projections=None):
    x, weights, biases = inputs[:3]
    # An unused output's gradient stays None (the backward op takes None for it).
    ctx.set_materialize_grads(False)
    ctx.config = config
    ctx.tile = keyword_only_inputs.get("tile", 0)  # the backward runs the same tiles
    ctx.residual = _residual_of(keyword_only_inputs)
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.has_projections = projections is not None
    ctx.save_for_backward(x, *weights, *biases, *([projections] if ctx.has_projections else []), *saved)
    ctx.mark_non_differentiable(*saved)


def _load_forward(ctx):
    tensors, L = list(ctx.saved_tensors), ctx.n_layers
    x, weights, biases, rest = tensors[0], tensors[1:1 + L], tensors[1 + L:1 + 2 * L], tensors[1 + 2 * L:]
    projections = rest.pop(0) if ctx.has_projections else None
    return x, weights, biases, rest, projections


def _residual_of(keyword_only_inputs):
    residual = keyword_only_inputs.get("residual")
    return None if residual is None else list(residual)


def _present(grad_b, bias_present):
    return [g if present else None for g, present in zip(grad_b, bias_present)]


def _laplacian_trailing(inputs, first):
    """(directions, laplacian_rows, how many of them the call passed): the dispatcher drops trailing
    arguments left at their defaults (None, -1), and they get no gradient slot then."""
    trailing = list(inputs[first:])
    directions, laplacian_rows = trailing + [None, -1][len(trailing):]
    return directions, laplacian_rows, 2 if laplacian_rows != -1 else int(directions is not None)


def _laplacian_setup(ctx, inputs, keyword_only_inputs, output):
    _, _, _, activations, act_params, gradient = inputs[:6]
    directions, laplacian_rows, ctx.n_trailing = _laplacian_trailing(inputs, 6)
    _save_forward(ctx, inputs, keyword_only_inputs, output[3],
                  (list(activations), list(act_params), gradient, laplacian_rows), directions)


def _laplacian_backward(ctx, grad_y, grad_grad, grad_lap, grad_saved):
    x, weights, biases, saved, directions = _load_forward(ctx)
    activations, act_params, gradient, laplacian_rows = ctx.config
    grad_x, grad_w, grad_b = compiled.mlp_laplacian_backward(
        grad_y, grad_grad if gradient else None, grad_lap, x, weights, biases, activations, act_params, gradient,
        saved, directions, laplacian_rows, tile=ctx.tile, input_grad=ctx.needs_input_grad[0], residual=ctx.residual)
    # the directions are held constant: no gradient
    return (grad_x, list(grad_w), _present(grad_b, ctx.bias_present), None, None, None,
            *[None] * ctx.n_trailing)


def _diagonal_setup(ctx, inputs, keyword_only_inputs, output):
    _, _, _, activations, act_params, strategy, projections = inputs
    # the dispatcher drops a trailing argument left at its default (None): no gradient slot for it then
    ctx.n_trailing = 0 if projections is None else 1
    _save_forward(ctx, inputs, keyword_only_inputs, output[2], (list(activations), list(act_params), strategy),
                  projections)


def _diagonal_backward(ctx, grad_y, grad_out, grad_saved):
    x, weights, biases, saved, projections = _load_forward(ctx)
    activations, act_params, strategy = ctx.config
    grad_x, grad_w, grad_b = compiled.mlp_jacobian_diagonal_backward(
        grad_y, grad_out, x, weights, biases, activations, act_params, strategy, saved, projections,
        tile=ctx.tile, input_grad=ctx.needs_input_grad[0], residual=ctx.residual)
    # the projections are random draws, held constant: no gradient
    return (grad_x, list(grad_w), _present(grad_b, ctx.bias_present), None, None, None, *[None] * ctx.n_trailing)


def _backward_setup(ctx, keyword_only_inputs, grads, x, weights, biases, saved, config, projections=None):
    """What the double backward needs: the backward op's incoming gradients, x, the weights and the
    biases that are present."""
    ctx.config = config
    ctx.projections = projections  # held constant
    ctx.residual = _residual_of(keyword_only_inputs)
    ctx.n_saved = len(saved)
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.grad_present = [g is not None for g in grads]
    ctx.save_for_backward(*[g for g in grads if g is not None], x, *weights,
                          *[b for b, present in zip(biases, ctx.bias_present) if present])


def _double_backward(ctx, composite, gg_x, gg_w, gg_b):
    """(gradients of the incoming gradients, of x, the weights, the biases) of the backward op's
    outputs, through composite(grads, x, weights, full biases) (reference.py)."""
    tensors = iter(ctx.saved_tensors)
    present_grads = [next(tensors) for present in ctx.grad_present if present]
    x = next(tensors)
    weights = [next(tensors) for _ in range(ctx.n_layers)]
    present_biases = list(tensors)

    def outputs(present_grads, x, weights, present_biases):
        grads, biases = iter(present_grads), iter(present_biases)
        full_grads = [next(grads) if p else None for p in ctx.grad_present]
        full_biases = [next(biases) if p else None for p in ctx.bias_present]
        return composite(full_grads, x, weights, full_biases)

    values, vjp = torch.func.vjp(outputs, present_grads, x, weights, present_biases)
    gg_b_present = [g for g, present in zip(gg_b, ctx.bias_present) if present]
    cotangents = (torch.zeros_like(values[0]) if gg_x is None else gg_x,
                  [torch.zeros_like(v) if g is None else g for g, v in zip(gg_w, values[1])],
                  [torch.zeros_like(v) if g is None else g for g, v in zip(gg_b_present, values[2])])
    g_grads, g_x, g_w, g_b = vjp(cotangents)
    g_grads, g_b = iter(g_grads), iter(g_b)
    return ([next(g_grads) if present else None for present in ctx.grad_present], g_x, list(g_w),
            [next(g_b) if present else None for present in ctx.bias_present])


def _laplacian_backward_setup(ctx, inputs, keyword_only_inputs, output):
    grad_y, grad_grad, grad_lap, x, weights, biases, activations, act_params, gradient, saved = inputs[:10]
    directions, laplacian_rows, ctx.n_trailing = _laplacian_trailing(inputs, 10)
    _backward_setup(ctx, keyword_only_inputs, (grad_y, grad_grad, grad_lap), x, weights, biases, saved,
                    (list(activations), list(act_params), laplacian_rows), directions)


def _laplacian_backward_backward(ctx, gg_x, gg_w, gg_b):
    activations, act_params, laplacian_rows = ctx.config

    def composite(grads, x, weights, biases):
        return mlp_laplacian_backward_composite(*grads, x, weights, biases, activations, act_params,
                                                ctx.projections, laplacian_rows, ctx.residual)

    g_grads, g_x, g_w, g_b = _double_backward(ctx, composite, gg_x, gg_w, gg_b)
    # no gradient flows into `saved`: the composite differentiates through x, weights and biases
    return (*g_grads, g_x, g_w, g_b, None, None, None, [None] * ctx.n_saved, *[None] * ctx.n_trailing)


def _diagonal_backward_setup(ctx, inputs, keyword_only_inputs, output):
    grad_y, grad_out, x, weights, biases, activations, act_params, strategy, saved, projections = inputs
    ctx.n_trailing = 0 if projections is None else 1
    _backward_setup(ctx, keyword_only_inputs, (grad_y, grad_out), x, weights, biases, saved,
                    (list(activations), list(act_params), strategy), projections)


def _diagonal_backward_backward(ctx, gg_x, gg_w, gg_b):
    activations, act_params, strategy = ctx.config

    def composite(grads, x, weights, biases):
        return mlp_jacobian_diagonal_backward_composite(*grads, x, weights, biases, activations, act_params,
                                                        trace=strategy == TRACE_GRAM2, projections=ctx.projections,
                                                        residual=ctx.residual)

    g_grads, g_x, g_w, g_b = _double_backward(ctx, composite, gg_x, gg_w, gg_b)
    return (*g_grads, g_x, g_w, g_b, None, None, None, [None] * ctx.n_saved, *[None] * ctx.n_trailing)


torch.library.register_autograd("jacext::mlp_laplacian", _laplacian_backward, setup_context=_laplacian_setup)
torch.library.register_autograd("jacext::mlp_jacobian_diagonal", _diagonal_backward, setup_context=_diagonal_setup)
torch.library.register_autograd("jacext::mlp_laplacian_backward", _laplacian_backward_backward,
                                setup_context=_laplacian_backward_setup)
torch.library.register_autograd("jacext::mlp_jacobian_diagonal_backward", _diagonal_backward_backward,
                                setup_context=_diagonal_backward_setup)

# Under torch.autocast the ops run in float32, as the Frobenius ops (_jacobian_ops.py): a second derivative
# carried through several layers loses too much in half precision. torch.func.vmap over the samples
# folds into the op's batch, over anything else loops (_library.register_vmap).
for _op in ("mlp_laplacian", "mlp_jacobian_diagonal"):
    register_float32_autocast(_op)
register_vmap("mlp_laplacian", sample_inputs=(0, 6))  # x, directions (mlp_laplacian expands them to the batch)
register_vmap("mlp_jacobian_diagonal", sample_inputs=(0, 6))  # x, projections


@explained_functorch_errors
def mlp_laplacian(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                  activations: Sequence[ActivationSpec], act_params=None, return_gradient: bool = False,
                  directions: Optional[torch.Tensor] = None, laplacian_rows: Optional[int] = None,
                  residual: Optional[Sequence[int]] = None):
    """(y, lap), or (y, grad, lap) with return_gradient: lap[b, i] = sum_j d^2 y_i / dx_j^2 (B, m)
    and grad = dy/dx (B, m, n_0), from one fused forward-Laplacian op (csrc/mlp_laplacian.h).

    directions V (B or 1, c, n_0): the tangent rows carried instead of the n_0 unit vectors (held
    constant: no gradient reaches them); grad[b] = (dy_b/dx_b) V_b^T (B, m, c). laplacian_rows k:
    lap sums v_j^T (d^2 y_i / dx^2) v_j over the first k rows only (None: all); without the gradient
    only those k rows are carried. residual (None, or per layer i: -1 or j <= i): layer i's
    output adds the input of layer j (a skip h + g(h), same width)."""
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
    layout = laplacian_layout(widths, codes, return_gradient, None if directions is None else rows, laplacian_rows,
                              residual)
    tile = carry_tile_size(widths, x.shape[0], layout, op_element_size(x), x.device)
    y, grad, lap, _ = compiled.mlp_laplacian(x, list(weights), bias_tensors(biases, weights), codes, params,
                                             bool(return_gradient), directions, laplacian_rows, tile=tile,
                                             residual=residual)
    return (y, grad, lap) if return_gradient else (y, lap)


@explained_functorch_errors
def mlp_jacobian_diagonal(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                          activations: Sequence[ActivationSpec], act_params=None, method: str = "auto",
                          trace: bool = False, projections: Optional[torch.Tensor] = None,
                          residual: Optional[Sequence[int]] = None):
    """(y, out) for a square MLP: out = diag(dy/dx) (B, n), or with trace its sum, the divergence
    (B,); method "auto", "forward" or "gram" (planner.resolve_diagonal_strategy). With
    method="hutchinson", projections V (B, k, n) and out[b, j] = v_bj^T (dy_b/dx_b) v_bj (B, k).
    residual as in mlp_laplacian (the closed forms do not apply across a skip)."""
    if (method == "hutchinson") != (projections is not None):
        raise ValueError("projections go with method='hutchinson', and only with it")
    codes, params = normalize_activations(activations, act_params, len(weights))
    widths = widths_of(x, weights)
    check_square(widths)
    residual = check_residual(residual, widths)
    strategy = resolve_diagonal_strategy(method, widths, codes, trace, x.shape[0], residual)
    rows = 0 if projections is None else projections.shape[1]
    layout = diagonal_layout(widths, strategy, rows, residual)
    tile = carry_tile_size(widths, x.shape[0], layout, op_element_size(x), x.device)
    y, out, _ = compiled.mlp_jacobian_diagonal(x, list(weights), bias_tensors(biases, weights), codes, params, strategy,
                                               projections, tile=tile, residual=residual)
    if trace and projections is None and strategy != TRACE_GRAM2:
        with torch.autocast(x.device.type, enabled=False):  # the op's float32 result stays float32
            out = out.sum(1)
    return y, out
