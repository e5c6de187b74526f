"""Second-order and diagonal functionals, each from one fused op (csrc/mlp_laplacian.h) for a
model that lowers to the engine, else by the generic path: the exact Laplacian with the input
gradient (physics-informed nets), and the divergence and Jacobian diagonal of a square map
(continuous normalizing flows, score matching). `wrt`, `cond` and `method` as in functional.py."""
from __future__ import annotations

import torch

from . import generic
from . import ops as _ops
from ._checks import check_square
from ._route import ANY_MODULE, as_cond, engine_or_generic, wrt_columns
from .estimators import check_estimator_options, hutchinson
from .functional import _columns, _generic_estimator

__all__ = ["laplacian", "divergence", "jacobian_diagonal"]


def laplacian(model, x: torch.Tensor, return_gradient: bool = False, *, wrt=None, cond=None,
              method: str = "auto", max_memory=None):
    """(y, lap): y == model(x, *cond) (B, m) and lap[b, i] = sum_j d^2 y_i / dx_j^2 at x_b (B, m),
    exact, j over the features chosen by `wrt` (all by default; an int k, a slice or a sequence
    of feature indices of the flattened x); with return_gradient, (y, grad, lap) and grad[b] =
    dy_b/dx_b over EVERY feature (B, m, n_0): a PDE residual such as u_t - u_xx needs both.

    The forward Laplacian: each layer carries h, the chosen columns of dh/dx (all of them with
    return_gradient) and Delta h in one GEMM over the batch, then one fused pass (Delta <- act'
    (W Delta) + act'' sum_j (W J)_j^2 over the chosen j). Differentiable w.r.t. x and the
    parameters (the backward needs the third derivative, compiled), and again to any order
    (through torch ops). Piecewise-linear activations (relu, leaky_relu) have a zero second
    derivative almost everywhere: their kinks do not count. method "auto" or "autograd" (the
    generic path; max_memory applies to it)."""
    if method not in ANY_MODULE:
        raise ValueError(f"unknown method {method!r}; expected one of {ANY_MODULE}")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "laplacian", skips=True)
    if lowered is None:
        return generic.laplacian(model, x, *cond, wrt=wrt, return_gradient=return_gradient, max_memory=max_memory)
    spec, flat = lowered.spec, lowered.flatten(x)
    directions, rows, order = _laplacian_directions(spec.widths[0], wrt, return_gradient, flat.dtype, flat.device)
    out = _ops.mlp_laplacian(flat, spec.weights, spec.biases, spec.activations, spec.act_params,
                             return_gradient=return_gradient, directions=directions, laplacian_rows=rows,
                             residual=spec.residual)
    if order is None:
        return out
    y, grad, lap = out
    return y, grad[:, :, order], lap


def _square_columns(spec, wrt):
    """The chosen columns (None: all) after checking that they are as many as the outputs."""
    columns = wrt_columns(wrt, spec.widths[0])
    check_square([spec.widths[0] if columns is None else len(columns), spec.widths[-1]])
    return columns


def _laplacian_directions(n0: int, wrt, gradient: bool, dtype, device):
    """(directions, laplacian_rows, order) of mlp_laplacian for the features wrt names: the chosen
    unit vectors first, then, with the gradient, the other features' (the Laplacian sums the first
    k rows); `order` puts the gradient's columns back in feature order (None: already). The leading
    features 0..k-1, in any order, need no directions: they are the op's own first k unit vectors."""
    columns = wrt_columns(wrt, n0)
    chosen = list(range(n0)) if columns is None else columns.tolist()
    k = len(chosen)
    if sorted(chosen) == list(range(k)):
        return None, (None if k == n0 else k), None
    rows = chosen + [j for j in range(n0) if j not in chosen] if gradient else chosen
    directions = torch.eye(n0, dtype=dtype, device=device)[rows].unsqueeze(0)
    order = None
    if gradient:
        order = torch.empty(n0, dtype=torch.long)
        order[rows] = torch.arange(n0)
        order = order.to(device)
    return directions, k, order


def divergence(model, x: torch.Tensor, method: str = "auto", n_proj: int = 1, generator=None, *,
               wrt=None, cond=None, distribution: str = "rademacher", orthogonal: bool = False,
               return_variance: bool = False, max_memory=None):
    """(y, div): y == model(x, *cond) (B, n) and div[b] = sum_i dy_b,i / dx_b,wrt[i] (B,): the trace
    of the Jacobian with respect to the features chosen by `wrt` (all by default), which must be
    as many as the outputs (a field f(x, t): t a conditioning input, or a feature of x held
    fixed by wrt).

    method: "auto" (the exact strategy of least predicted cost: jacext.explain(model, x,
    quantity="divergence")), "forward" (carry the n input columns; the last layer only forms the
    diagonal, never J), "gram" (one hidden layer: sum_k d_k (W_1 W_2)_kk-style closed forms with a
    matrix computed once per batch; two hidden layers and a linear output: d_2^T (W_2 .* (W_1 W_3)^T) d_1),
    "hutchinson": div[b] = mean_j v_j^T J_b v_j over n_proj random v with E[v v^T] = I
    (`distribution` "rademacher" or "gaussian", drawn from `generator`; `orthogonal` rows scaled
    by sqrt(n) are exact at n_proj = n), carried forward as n_proj columns: unbiased, or
    "autograd" (the generic path, any module; "auto" and "hutchinson" take it for a model that
    does not lower). With `return_variance`, (y, div, var): var[b] the sample variance of the
    n_proj terms divided by n_proj, an unbiased estimate of the estimator's variance (for
    independent projections). Differentiable twice w.r.t. x and the parameters; the projections
    are held fixed."""
    check_estimator_options(method, ("hutchinson",), n_proj, generator, distribution, orthogonal, return_variance)
    cond = as_cond(cond)
    # with wrt, the engine's divergence comes from J's columns (the reverse family), which takes no skip
    lowered = engine_or_generic(model, x, cond, method, "divergence", ANY_MODULE + ("hutchinson",), skips=wrt is None)
    if lowered is None:
        return generic.divergence(model, x, *cond, wrt=wrt, max_memory=max_memory,
                                  **_generic_estimator(method, n_proj, generator, distribution, orthogonal,
                                                       return_variance))
    spec, x = lowered.spec, lowered.flatten(x)
    columns = _square_columns(spec, wrt)
    if columns is not None:
        y, jac = _columns(spec, x, columns)
        if method != "hutchinson":
            return y, jac.diagonal(dim1=1, dim2=2).sum(1)
        return hutchinson(lambda v: (y, ((v.to(jac.dtype) @ jac) * v.to(jac.dtype)).sum(2)), x.shape[0], n_proj,
                          len(columns), distribution=distribution, orthogonal=orthogonal, generator=generator,
                          dtype=x.dtype, device=x.device, return_variance=return_variance)
    if method != "hutchinson":
        return _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations,
                                          spec.act_params, method=method, trace=True, residual=spec.residual)

    def terms_of(v):  # each term v^T J v is unbiased for tr J
        return _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                          method="hutchinson", projections=v, residual=spec.residual)

    return hutchinson(terms_of, x.shape[0], n_proj, spec.widths[0], distribution=distribution, orthogonal=orthogonal,
                      generator=generator, dtype=x.dtype, device=x.device, return_variance=return_variance)


def jacobian_diagonal(model, x: torch.Tensor, method: str = "auto", *, wrt=None, cond=None, max_memory=None):
    """(y, diag): y == model(x, *cond) (B, n) and diag[b, i] = dy_b,i / dx_b,wrt[i] (B, n), exact,
    without forming J on the engine (with wrt: from J's chosen columns). method "auto", "forward"
    (the input columns; the last layer forms the diagonal alone), "gram" (one hidden layer:
    diag = d_2 .* (d_1 (W_1 .* W_2^T)), the matrix once per batch) or "autograd" (the generic
    path). Differentiable twice."""
    if method == "hutchinson":
        raise ValueError("method='hutchinson' estimates the divergence (jacext.divergence); the diagonal is exact")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "jacobian_diagonal", skips=wrt is None)
    if lowered is None:
        return generic.jacobian_diagonal(model, x, *cond, wrt=wrt, max_memory=max_memory)
    spec, x = lowered.spec, lowered.flatten(x)
    columns = _square_columns(spec, wrt)
    if columns is not None:
        y, jac = _columns(spec, x, columns)
        return y, jac.diagonal(dim1=1, dim2=2)
    return _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                      method=method, residual=spec.residual)
