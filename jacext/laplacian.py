"""Second-order and diagonal functionals of an MLP, each from one fused op (csrc/mlp_laplacian.h):
the exact Laplacian with the input gradient (physics-informed nets), and the divergence and
Jacobian diagonal of a square net (continuous normalizing flows, score matching)."""
from __future__ import annotations

import operator

import torch

from . import ops as _ops
from ._checks import check_input, check_square
from .estimators import check_estimator_options, hutchinson
from .nn import parse_model

__all__ = ["laplacian", "divergence", "jacobian_diagonal"]


def laplacian(model, x: torch.Tensor, return_gradient: bool = False, *, wrt=None):
    """(y, lap): y == model(x) (B, m) and lap[b, i] = sum_j d^2 y_i / dx_j^2 at x_b (B, m), exact;
    with return_gradient, (y, grad, lap) and grad[b] = dy_b/dx_b (B, m, n_0).

    wrt: the features j the Laplacian sums over: None (all), an int k (0..k-1), a slice, or a
    sequence of feature indices (e.g. wrt=[0] on (x, t) gives u_xx of a heat-equation residual);
    the gradient still covers every feature (u_t beside u_xx).

    The forward Laplacian: each layer carries h, the chosen columns of dh/dx (every column with the
    gradient) and Delta h in one GEMM over the batch's B (columns + 2) rows, then one fused pass
    (Delta <- act' (W Delta) + act'' sum_j (W J)_j^2 over the chosen j). Differentiable w.r.t. x and
    the parameters (the backward needs act''', compiled), and again to any order (through torch
    ops). Piecewise-linear activations (relu, leaky_relu) have a zero second derivative almost
    everywhere: their kinks do not count."""
    spec = parse_model(model)
    check_input(spec, x)
    directions, rows, order = _laplacian_directions(spec.widths[0], wrt, return_gradient, x.dtype, x.device)
    out = _ops.mlp_laplacian(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                             return_gradient=return_gradient, directions=directions, laplacian_rows=rows)
    if order is None:
        return out
    y, grad, lap = out
    return y, grad[:, :, order], lap


def _wrt_features(n0: int, wrt) -> list:
    """The feature indices that wrt names (None: all), checked: distinct, in range, at least one."""
    if wrt is None:
        return list(range(n0))
    if isinstance(wrt, bool):
        raise TypeError("wrt must be an int, a slice or a sequence of feature indices, got a bool")
    if isinstance(wrt, int):
        if not 1 <= wrt <= n0:
            raise ValueError(f"wrt={wrt} names the features 0..{wrt - 1}; it must be in [1, {n0}] (the model "
                             f"takes {n0} features)")
        return list(range(wrt))
    if isinstance(wrt, slice):
        features = list(range(n0)[wrt])
    else:
        try:
            features = [operator.index(j) for j in wrt]
        except TypeError:
            raise TypeError(f"wrt must be an int, a slice or a sequence of feature indices, got {wrt!r}") from None
    if not features:
        raise ValueError(f"wrt={wrt!r} names no feature")
    if any(not 0 <= j < n0 for j in features):
        raise ValueError(f"wrt={wrt!r} names a feature outside 0..{n0 - 1} (the model takes {n0} features)")
    if len(set(features)) != len(features):
        raise ValueError(f"wrt={wrt!r} names a feature twice")
    return features


def _laplacian_directions(n0: int, wrt, gradient: bool, dtype, device):
    """(directions, laplacian_rows, order) of mlp_laplacian for the features wrt names: the chosen
    unit vectors first, then, with the gradient, the other features' (the Laplacian sums the first
    k rows); `order` puts the gradient's columns back in feature order (None: already). The leading
    features 0..k-1, in any order, need no directions: they are the op's own first k unit vectors."""
    chosen = _wrt_features(n0, wrt)
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
               distribution: str = "rademacher", orthogonal: bool = False, return_variance: bool = False):
    """(y, div): y == model(x) (B, n) and div[b] = tr(dy_b/dx_b) (B,) for a square net (n outputs
    for n inputs).

    method: "auto" (the exact strategy of least predicted cost: jacext.explain(model, x,
    quantity="divergence")), "forward" (carry the n input columns; the last layer only forms the
    diagonal, never J), "gram" (one hidden layer: sum_k d_k (W_1 W_2)_kk-style closed forms with a
    matrix computed once per batch; two hidden layers and a linear output: d_2^T (W_2 .* (W_1 W_3)^T) d_1),
    or "hutchinson": div[b] = mean_j v_j^T J_b v_j over n_proj random v with E[v v^T] = I
    (`distribution` "rademacher" or "gaussian", drawn from `generator`; `orthogonal` rows scaled
    by sqrt(n) are exact at n_proj = n), carried forward as n_proj columns: unbiased. With
    `return_variance`, (y, div, var): var[b] the sample variance of the n_proj terms divided by
    n_proj, an unbiased estimate of the estimator's variance (for independent projections).
    Differentiable twice w.r.t. x and the parameters; the projections are held fixed."""
    spec = parse_model(model)
    check_input(spec, x)
    check_square(spec.widths)
    check_estimator_options(method, ("hutchinson",), n_proj, generator, distribution, orthogonal, return_variance)
    if method != "hutchinson":
        return _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations,
                                                    spec.act_params, method=method, trace=True)

    def terms_of(v):  # each term v^T J v is unbiased for tr J
        return _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                          method="hutchinson", projections=v)

    return hutchinson(terms_of, x.shape[0], n_proj, spec.widths[0], distribution=distribution, orthogonal=orthogonal,
                      generator=generator, dtype=x.dtype, device=x.device, return_variance=return_variance)


def jacobian_diagonal(model, x: torch.Tensor, method: str = "auto"):
    """(y, diag): y == model(x) (B, n) and diag[b] = diag(dy_b/dx_b) (B, n) for a square net,
    exact, without forming J. method "auto", "forward" (the input columns; the last layer forms
    the diagonal alone) or "gram" (one hidden layer: diag = d_2 .* (d_1 (W_1 .* W_2^T)), the matrix
    once per batch). Differentiable twice."""
    spec = parse_model(model)
    check_input(spec, x)
    check_square(spec.widths)
    if method == "hutchinson":
        raise ValueError("method='hutchinson' estimates the divergence (jacext.divergence); the diagonal is exact")
    return _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                                method=method)
