"""Second-order and diagonal functionals of an MLP, each from one fused op (csrc/mlp_laplacian.h):
the exact Laplacian with the input gradient (physics-informed nets), and the divergence and
Jacobian diagonal of a square net (continuous normalizing flows, score matching)."""
from __future__ import annotations

import torch

from . import ops as _ops
from ._checks import check_input, check_square
from .estimators import check_estimator_options, hutchinson
from .nn import parse_model

__all__ = ["laplacian", "divergence", "jacobian_diagonal"]


def laplacian(model, x: torch.Tensor, return_gradient: bool = False):
    """(y, lap): y == model(x) (B, m) and lap[b, i] = sum_j d^2 y_i / dx_j^2 at x_b (B, m), exact;
    with return_gradient, (y, grad, lap) and grad[b] = dy_b/dx_b (B, m, n_0).

    The forward Laplacian: each layer carries h, the n_0 columns of dh/dx and Delta h in one GEMM
    over the batch's B (n_0 + 2) rows, then one fused pass (Delta <- act' (W Delta) + act''
    sum_j (W J)_j^2). Differentiable w.r.t. x and the parameters (the backward needs act''',
    compiled), and again to any order (through torch ops). Piecewise-linear activations (relu,
    leaky_relu) have a zero second derivative almost everywhere: their kinks do not count."""
    spec = parse_model(model)
    check_input(spec, x)
    return _ops.mlp_laplacian(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                        return_gradient=return_gradient)


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
