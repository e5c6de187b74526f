"""Second-order and diagonal functionals, each from one fused op (csrc/mlp_laplacian.h) for a
model that lowers to the engine, else by the generic path: the exact Laplacian with the input
gradient (physics-informed nets), and the divergence and Jacobian diagonal of a square map
(continuous normalizing flows, score matching). `wrt`, `cond` and `method` as in functional.py."""
from __future__ import annotations

import torch

from . import generic
from . import ops as _ops
from ._checks import check_square
from ._route import ANY_MODULE, as_cond, engine_or_generic
from .estimators import check_estimator_options, hutchinson
from .frontend import MLPSpec
from .functional import _generic_estimator

# what the forward-carry ops take: skips, per-sample biases and gates, dropout masks, and each with the masks
FORWARD_CARRY = frozenset(("input_concat", "residual", "sample_bias", "gate", "dropout", "dropout_with_residual",
                           "dropout_with_conditioning"))

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
    lowered = engine_or_generic(model, x, cond, method, "laplacian", supports=FORWARD_CARRY)
    if lowered is None:
        return generic.laplacian(model, x, *cond, wrt=wrt, return_gradient=return_gradient, max_memory=max_memory)
    spec, flat = lowered.spec, lowered.input(x, cond)
    directions, rows, order = _laplacian_directions(lowered, wrt, return_gradient, flat.dtype, flat.device)
    out = _ops.mlp_laplacian(flat, spec.weights, spec.biases, spec.activations, spec.act_params,
                             return_gradient=return_gradient, directions=directions, laplacian_rows=rows,
                             **spec.carry_factors)
    if order is None:
        return out
    y, grad, lap = out
    return y, grad[:, :, order], lap


def _square_columns(lowered, wrt):
    """The chosen columns (None: all) after checking that they are as many as the outputs."""
    columns, widths = lowered.columns(wrt), lowered.spec.widths
    check_square([widths[0] if columns is None else len(columns), widths[-1]])
    return columns


def _laplacian_directions(lowered, wrt, gradient: bool, dtype, device):
    """(directions, laplacian_rows, order) of mlp_laplacian for the features wrt names: the chosen
    unit vectors first, then, with the gradient, x's other features' (the Laplacian sums the first
    k rows); `order` puts the gradient's columns back in x's feature order (None: already). The
    leading columns 0..k-1, in any order, need no directions: they are the op's own first k unit
    vectors. x's features are columns x_offset.. of the engine's input when the model concatenates
    conditioning inputs with x (their columns are held fixed: no direction of theirs)."""
    n0 = lowered.spec.widths[0]
    columns = lowered.columns(wrt)
    chosen = list(range(n0)) if columns is None else columns.tolist()
    features = lowered.columns(None)
    features = list(range(n0)) if features is None else features.tolist()
    k = len(chosen)
    if sorted(chosen) == list(range(k)) and (not gradient or features == list(range(n0))):
        return None, (None if k == n0 else k), None
    rows = chosen + [j for j in features if j not in chosen] if gradient else chosen
    directions = torch.eye(n0, dtype=dtype, device=device)[rows].unsqueeze(0)
    order = None
    if gradient and rows != features:
        order = torch.empty(len(rows), dtype=torch.long)
        order[torch.tensor(rows) - features[0]] = torch.arange(len(rows))
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
    lowered = engine_or_generic(model, x, cond, method, "divergence", ANY_MODULE + ("hutchinson",),
                                supports=FORWARD_CARRY)
    if lowered is None:
        return generic.divergence(model, x, *cond, wrt=wrt, max_memory=max_memory,
                                  **_generic_estimator(method, n_proj, generator, distribution, orthogonal,
                                                       return_variance))
    spec, x = lowered.spec, lowered.input(x, cond)
    columns = _square_columns(lowered, wrt)
    spec, outputs = _squared_up(spec, columns)
    if method != "hutchinson":
        y, div = _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations,
                                            spec.act_params, method=method, trace=True,
                                            **spec.carry_factors)
        return outputs(y), div

    def terms_of(v):  # each term v^T J v is unbiased for tr J
        if columns is not None:  # v over the chosen features, zero on the others
            v = _spread(v, 2, columns, spec.widths[0], 0.0)
        y, terms = _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                              method="hutchinson", projections=v,
                                              **spec.carry_factors)
        return outputs(y), terms

    n = spec.widths[0] if columns is None else len(columns)
    return hutchinson(terms_of, x.shape[0], n_proj, n, distribution=distribution, orthogonal=orthogonal,
                      generator=generator, dtype=x.dtype, device=x.device, return_variance=return_variance)


def _squared_up(spec, columns):
    """(spec', outputs) for the diagonal over chosen columns c_0..c_{m-1} of the engine's input
    (None: all, and spec' = spec): spec' maps output i to row c_i of a square net and leaves its
    other rows zero (zero weights and bias), so that diag(J')[c_i] = dy_i/dx_{c_i}, J' has no other
    nonzero diagonal entry, and the fused diagonal ops (every strategy) apply; outputs(y') takes
    y back from y'. Differentiable in the last layer's weight and bias; the last layer's per-sample
    bias, gate and dropout mask go to the same rows (zero bias, unit gate, zero mask elsewhere)."""
    if columns is None:
        return spec, lambda y: y
    if spec.residual is not None and spec.residual[-1] != -1:
        raise ValueError("the divergence and the Jacobian diagonal over chosen features (wrt, or x beside "
                         "conditioning inputs) take no residual skip into the output layer on the engine; "
                         "method='autograd' runs them on the generic path")
    n0, w, b = spec.widths[0], spec.weights[-1], spec.biases[-1]
    weights = spec.weights[:-1] + [_spread(w, 0, columns, n0, 0.0)]
    biases = spec.biases[:-1] + [None if b is None else _spread(b, 0, columns, n0, 0.0)]

    def rows(per_sample, fill):  # a per-sample list with the last entry's columns spread like the weight's rows
        if per_sample is None or per_sample[-1] is None:
            return per_sample
        return per_sample[:-1] + [_spread(per_sample[-1], 1, columns, n0, fill)]

    return (MLPSpec(weights, biases, spec.activations, spec.act_params, masks=rows(spec.masks, 0.0),
                    residual=spec.residual, sample_biases=rows(spec.sample_biases, 0.0), gates=rows(spec.gates, 1.0)),
            lambda y: _gathered(y, columns))


def _spread(t, dim, columns, size, fill):
    """t (size len(columns) along dim) placed at `columns` of a dimension of `size`, `fill`
    elsewhere; differentiable. A run of consecutive columns (x beside conditioning inputs) is a
    pad, whose backward is a view."""
    first = _run_start(columns)
    if first is not None:
        pad = [0, 0] * (t.dim() - 1 - dim) + [first, size - first - len(columns)]
        return torch.nn.functional.pad(t, pad, value=fill)
    shape = list(t.shape)
    shape[dim] = size
    return t.new_full(shape, fill).index_copy(dim, columns.to(t.device), t)


def _gathered(y, columns):
    """y's entries at `columns` along dim 1 (_spread's inverse)."""
    first = _run_start(columns)
    return y.narrow(1, first, len(columns)) if first is not None else y.index_select(1, columns.to(y.device))


def _run_start(columns):
    """The first column if the columns are consecutive and increasing, else None."""
    values = columns.tolist()
    return values[0] if values and values == list(range(values[0], values[0] + len(values))) else None


def jacobian_diagonal(model, x: torch.Tensor, method: str = "auto", *, wrt=None, cond=None, max_memory=None):
    """(y, diag): y == model(x, *cond) (B, n) and diag[b, i] = dy_b,i / dx_b,wrt[i] (B, n), exact,
    without forming J on the engine. method "auto", "forward"
    (the input columns; the last layer forms the diagonal alone), "gram" (one hidden layer:
    diag = d_2 .* (d_1 (W_1 .* W_2^T)), the matrix once per batch) or "autograd" (the generic
    path). Differentiable twice."""
    if method == "hutchinson":
        raise ValueError("method='hutchinson' estimates the divergence (jacext.divergence); the diagonal is exact")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "jacobian_diagonal", supports=FORWARD_CARRY)
    if lowered is None:
        return generic.jacobian_diagonal(model, x, *cond, wrt=wrt, max_memory=max_memory)
    spec, x = lowered.spec, lowered.input(x, cond)
    columns = _square_columns(lowered, wrt)
    spec, outputs = _squared_up(spec, columns)
    y, diag = _ops.mlp_jacobian_diagonal(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                         method=method, **spec.carry_factors)
    return outputs(y), outputs(diag)
