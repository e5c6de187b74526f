"""The spectral norm ||J||_2 of each sample's layer Jacobian J = dy/dh_layer (the local Lipschitz
constant), differentiable, on jacext's ops.

Two paths (jacobian_spectral_norm's `method`, chosen by predicted cost for "auto"):
- exact: the smaller Gram matrix, J J^T (m x m, jacobian_gram) or J^T J (n_layer x n_layer, from
  jacobian), without gradient, and its top eigenvector: the top left singular vector u exactly;
  then s = ||u^T J|| as below (its value is sqrt of the largest eigenvalue, its gradient
  u^T dJ v). With second_order=True instead s = sqrt of the largest eigenvalue of the
  differentiable Gram (its second derivative too, at twice the cost).
- power: alternating products u <- J v / |J v|, v <- J^T u / |J^T u| per sample without
  gradient (functional.Linearization), to a tolerance; then s = ||u^T J|| with u held fixed, the
  fused reverse op with one projection row (ops.mlp_jacobian_frobenius with projections u
  returns ||u^T J||^2). At the top left singular vector u its gradient is u^T dJ v, the
  gradient of ||J||_2 (s is stationary in u there). For a layer l > 0, J is the input Jacobian of
  the layers above l at h_l, which the layers below compute differentiably.

Every path runs the model's Jacobian factors (functional.JACOBIAN_FAMILY: dropout masks, residual
skips, ...) through the ops and Linearization (**spec.jacobian_factors); the one computation of its
own, h_l by the layers below l > 0, applies masks and skips but no conditioning inside the network,
so a layer l > 0 takes BELOW_LAYER's factors only, and a layer inside a residual block is refused.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from . import ops as _ops
from . import activations as act
from . import generic
from ._checks import check_block_boundary, check_input
from ._route import ANY_MODULE, as_cond, engine_or_generic
from .frontend import dropout_listing, lower, skip_listing
from .functional import JACOBIAN_FAMILY, Linearization, _columns
from .planner import REVERSE, predicted_cost, resolve_strategy

__all__ = ["jacobian_spectral_norm", "spectral_plan", "SPECTRAL_METHODS"]

SPECTRAL_METHODS = ("auto", "exact", "power", "autograd")
# The factors a layer l > 0 takes: _power_value's forward below l applies masks and skips, not a
# per-sample bias or gate (the ops above l take every factor of JACOBIAN_FAMILY).
BELOW_LAYER = JACOBIAN_FAMILY & frozenset(("input_concat", "dropout", "residual", "dropout_with_residual"))
# Multiply-add equivalents per k^3 of the batched symmetric eigen-decomposition of a k x k Gram
# matrix (eigenvalues and vectors, which the backward needs: about 9 k^3 flops, Golub & Van Loan).
EIGH_COST = 9
# One small torch op's dispatch in multiply-add equivalents (docs/benchmarks.md, spectral norm): a
# power round runs 4 ops per layer and 8 more, which decides its time for small nets.
OP_OVERHEAD = 250_000


def _macs(widths) -> int:
    """Multiply-adds per sample of one product through the layers (J t or u^T J)."""
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def _path_costs(widths, batch: int, layer: int, n_iter: int, second_order: bool = False,
                skips: bool = False) -> dict:
    """{path: predicted cost of one forward + backward} in the planner's multiply-add equivalents.
    The power path is counted at n_iter iterations, its upper bound. The exact path's Gram runs
    forward only (a third of the op's forward + backward) unless second_order. skips: the model
    has residual skips (the ops' plain carries only; a skip adds elementwise work alone)."""
    n = list(widths)
    m, n_l = n[-1], n[layer]
    k = min(m, n_l)
    jacobian = REVERSE if m <= n_l else resolve_strategy("auto", n, layer, frobenius=False, batch=batch, skips=skips)
    gram = (3 if second_order else 1) * batch * k * k * max(m, n_l)  # J J^T or J^T J (and its backward)
    above = n[layer:]
    final = predicted_cost(above, batch, resolve_strategy("hutchinson", above, batch=batch, projections=1,
                                                          skips=skips),
                           projections=1) + 3 * batch * _macs(n[:layer + 1])
    rounds = n_iter * (2 * batch * _macs(above) + OP_OVERHEAD * (4 * (len(above) - 1) + 8))
    power = batch * _macs(n) + rounds + final
    op = predicted_cost(n, batch, jacobian, layer, frobenius=False)
    exact = (op + gram if second_order else op // 3 + gram + final) + EIGH_COST * batch * k ** 3
    return {"exact": exact, "power": power}


def _choose_path(widths, batch: int, layer: int, n_iter: int, method: str, skips: bool = False) -> str:
    """"exact" or "power" for a method name: the path of lower predicted cost for "auto"."""
    if method != "auto":
        return method
    costs = _path_costs(widths, batch, layer, n_iter, skips=skips)
    return "exact" if costs["exact"] <= costs["power"] else "power"


_cached_path = functools.lru_cache(maxsize=512)(_choose_path)


def choose_path(widths, batch, layer: int, n_iter: int, method: str, skips: bool = False) -> str:
    """_choose_path, cached by its arguments (traced, not cached, under torch.compile)."""
    if not isinstance(batch, int):  # a symbolic size under torch.compile: plan for a typical batch
        batch = 64
    choose = _choose_path if torch.compiler.is_compiling() else _cached_path
    return choose(tuple(widths), batch, layer, n_iter, method, skips)


class SpectralPlan:
    """What jacobian_spectral_norm(model, x, layer, method, n_iter) runs, each path's cost, and how
    the model's factors run: dropout (frontend.Plan.dropout, per layer), residual (MLPSpec.residual),
    concatenated (conditioning inputs concatenated with x: the SVD of J's columns over x's)."""

    def __init__(self, widths, batch, layer, method, n_iter, tol, dropout=(), residual=None, concatenated=False):
        self.widths, self.batch, self.layer, self.method, self.n_iter, self.tol = widths, batch, layer, method, n_iter, tol
        self.dropout, self.residual, self.concatenated = dropout, residual, concatenated
        skips = residual is not None
        self.costs = _path_costs(widths, batch, layer, n_iter, skips=skips)  # (second_order=False: the default)
        self.choice = "columns" if concatenated else choose_path(widths, batch, layer, n_iter, method, skips)

    def path_name(self, path: str) -> str:
        m, n_l = self.widths[-1], self.widths[self.layer]
        if path == "columns":
            return "exact: an SVD of J's columns over x's features"
        if path == "exact":
            return f"exact: eigenvalues of J J^T ({m} x {m})" if m <= n_l else \
                f"exact: eigenvalues of J^T J ({n_l} x {n_l})"
        return f"power iteration (<= {self.n_iter} iterations, tol {self.tol:g})"

    def __repr__(self):
        lines = [f"MLP {self.widths}, batch {self.batch}, spectral norm of dy/dh_{self.layer}, method={self.method!r}: "
                 f"runs {self.path_name(self.choice)}",
                 f"  {'path':48}{'predicted cost':>16}"]
        for path, cost in self.costs.items():
            mark = "  <- chosen" if path == self.choice else ""
            lines.append(f"  {self.path_name(path):48}{cost / 1e9:>14.4g} G{mark}")
        lines.append(f"  (forward + backward, multiply-add equivalents as for the Frobenius plans; the eigen-"
                     f"decomposition at {EIGH_COST} k^3, the power path at all n_iter iterations)")
        if self.concatenated:
            lines.append("  conditioning inputs concatenated with x: J over x's columns alone, formed by the Jacobian "
                         "op (one sweep), then its largest singular value by an SVD")
        masked = dropout_listing(self.dropout)
        if masked:
            lines.append("  dropout masks, drawn per call as the model draws them: a diagonal factor of J on every "
                         "path (the ops, the power products, the layers below h_layer): " + masked)
        if self.residual is not None:
            skips = skip_listing(self.residual)
            lines.append(f"  residual skips (i, j), layer i's output adds layer j's input: {skips}; every path carries "
                         "them (the power products add them, the exact path forms its Gram from J, the Gram "
                         "epilogues do not apply across a skip)")
        return "\n".join(lines)


def _check_options(spec, x, layer, method, n_iter, tol, init):
    depth = len(spec.weights)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
        raise ValueError(f"layer must be an integer in [0, {depth - 1}] (0 = input, l = output of the l-th "
                         f"activation), got {layer!r}")
    if method not in SPECTRAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {SPECTRAL_METHODS}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if init is not None:
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"init must be a torch.Tensor of shape ({x.shape[0]}, {spec.widths[-1]}), "
                            f"got {type(init).__name__}")
        if init.shape != (x.shape[0], spec.widths[-1]):
            raise ValueError(f"init must have shape ({x.shape[0]}, {spec.widths[-1]}) (one left vector per "
                             f"sample), got {tuple(init.shape)}")


def _supports(layer) -> frozenset:
    """The factors jacobian_spectral_norm takes on the engine at `layer` (lower's supports)."""
    return JACOBIAN_FAMILY if layer == 0 else BELOW_LAYER


def spectral_plan(model, x: torch.Tensor, method: str = "auto", layer: int = 0, n_iter: int = 100,
                  tol: float = 1e-3, cond=None) -> SpectralPlan:
    """The plan of jacobian_spectral_norm(model, x, layer, method=method, n_iter=n_iter, cond=cond):
    `print(jacext.explain(model, x, quantity="spectral_norm", layer=1))`; `cond`: the conditioning
    inputs, which a model conditioned inside the network needs. Raises NotLowerable (a TypeError)
    for a model the call runs on the generic path."""
    cond = as_cond(cond)
    if cond:  # lowering with x draws the dropout masks: from a copy of the generator's state
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            lowered = lower(model, x, *cond, supports=_supports(layer))
    else:
        lowered = lower(model, supports=_supports(layer))  # without x: no dropout mask drawn
    spec, concatenated = lowered.spec, lowered.input_parts is not None and layer == 0
    if lowered.input_parts is None:  # x alone is the engine's input (else x's width is checked with cond, by the call)
        check_input(spec, x)
    _check_options(spec, x, layer, method, n_iter, tol, None)
    check_block_boundary(spec.residual, layer, "jacobian_spectral_norm")
    return SpectralPlan(spec.widths, x.shape[0], layer, method, n_iter, tol, lowered.dropout, spec.residual,
                        concatenated)


def _sqrt(sq):
    """sqrt with a zero gradient at 0 (sqrt's is infinite there: J = 0, or u^T J = 0) that keeps
    NaN and inf."""
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq * 0)


def jacobian_spectral_norm(model, x: torch.Tensor, layer: int = 0, *, method: str = "auto", n_iter: int = 100,
                           tol: float = 1e-3, init: Optional[torch.Tensor] = None, generator=None,
                           return_vectors: bool = False, second_order: bool = False, wrt=None, cond=None,
                           max_memory=None):
    """(y, s): y == model(x, *cond) (B, m) and s[b] = ||J_b||_2, the largest singular value of
    J_b = dy_b/dh_layer,b (h_0 = x, h_l the output of the l-th activation); at layer 0, `wrt`
    chooses the input features (see jacext.jacobian). Differentiable.

    method: "exact" (the top eigenpair of the smaller Gram matrix, J J^T or J^T J, formed without
    gradient: u the top left singular vector, then s = ||u^T J|| by the fused op with u held fixed,
    whose value is ||J||_2 and whose gradient is u^T dJ v, exact), "power" (power iteration, below)
    "auto" (the one of lower predicted cost: exact for small m or n_layer;
    `jacext.explain(model, x, quantity="spectral_norm")`), or "autograd" (the generic path, any
    module: J by batched reverse products, then its exact largest singular value; "auto" and
    "exact" take it for a model that does not lower; max_memory applies to it). With wrt, the
    engine forms J's chosen columns and takes their largest singular value by an SVD.

    second_order: the exact path's second derivative too: s = sqrt of the largest eigenvalue of
    the differentiable Gram, about twice the work (the Gram's backward). Without it (and on the power path) the
    second derivative is that of ||u^T J|| with u fixed: what a loss on s needs is the first.
    second_order=True runs the exact path (method "auto" or "exact").

    "power": from u = init (B, m) (e.g. the previous step's vectors, see return_vectors) or a
    Gaussian draw from `generator`, up to n_iter rounds of v = J^T u / |J^T u|,
    u = J v / |J v| per sample, without gradient, until every sample's relative residual
    |J v - sigma u| / sigma (sigma = |J^T u|) is at most tol: then (u, v, sigma) is an exact
    singular triplet of some J + E with ||E||_2 <= tol * sigma. s = ||u^T J|| follows with u held
    fixed, by the fused op; it is a lower bound of ||J||_2 whose error is of order tol^2 s when
    the top singular value is separated, and its gradient u^T dJ v is within order tol of the
    exact one. The residual shrinks by about (s_2 / s_1)^2 a round: at random initialization the
    top values of a net's Jacobian are close (s_2 / s_1 ~ 0.94 for 784-256-256-10 tanh, which
    takes ~100 rounds for tol=1e-3), so warm starts pay. A sample still above tol after n_iter
    rounds gets a RuntimeWarning (its s is still a lower bound). The second derivative is that of
    ||u^T J|| with u fixed, not of ||J||_2. Under torch.compile all n_iter rounds run (no
    data-dependent exit, no warning).

    Repeated top singular value (s_1 = s_2): ||J||_2 is not differentiable there. s stays exact
    (power iteration converges to some vector of the top singular space), and the gradient is
    u^T dJ v for one top singular pair (u, v) of that space, a subgradient, as
    torch.linalg.matrix_norm(J, 2) gives; which pair depends on the start (power) or on LAPACK
    (exact). Close but distinct top values slow the vectors, not s.

    Dropout in train() (J is the masked network's; the masks drawn as the model draws them, y ==
    model(x) under the same seed) and residual blocks run on the engine, every path; a hidden
    `layer` must be a block boundary (h_layer inside a residual block raises a ValueError: y
    depends on the block's input besides h_layer).

    return_vectors=True returns (y, s, u) with u (B, m) the top left singular vectors (no
    gradient), to pass as init= for the same samples at the next step. J = 0 gives s = 0 with a
    zero gradient; NaN/Inf propagate per sample; an empty batch gives empty outputs."""
    if method not in SPECTRAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {SPECTRAL_METHODS}")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "jacobian_spectral_norm", ANY_MODULE + ("exact",),
                                supports=_supports(layer))
    # x's columns of the engine's input (wrt, or conditioning inputs concatenated with x) matter at
    # the input alone: a hidden layer's J does not see how the input was formed
    if lowered is None or (layer == 0 or wrt is not None) and lowered.columns(wrt) is not None:
        return _spectral_of_columns(model, x, cond, lowered, layer, wrt, return_vectors, max_memory)
    spec, x = lowered.spec, lowered.input(x, cond)
    _check_options(spec, x, layer, method, n_iter, tol, init)
    check_block_boundary(spec.residual, layer, "jacobian_spectral_norm")
    if second_order and method == "power":
        raise ValueError("second_order=True is the exact path's (the power path differentiates ||u^T J|| with u "
                         "fixed); use method='exact' or 'auto'")
    path = "exact" if second_order else choose_path(spec.widths, x.shape[0], layer, n_iter, method,
                                                    spec.residual is not None)
    if path == "exact":
        y, s, u = _exact(spec, x, layer, return_vectors, second_order)
    else:
        u = _power_iteration(Linearization(spec, x, layer), _start(spec, x, init, generator), n_iter, tol)
        y, s = _power_value(spec, x, layer, u)
    return (y, s, u) if return_vectors else (y, s)


def _spectral_of_columns(model, x, cond, lowered, layer, wrt, return_vectors, max_memory):
    """The generic path, or wrt on the engine: the largest singular value of the Jacobian's
    (chosen) columns by an SVD, differentiable where it is simple."""
    if layer != 0:
        raise ValueError(f"layer={layer!r}: with wrt or on the generic path the spectral norm is taken with respect "
                         "to the input (layer 0)")
    if lowered is None:
        if return_vectors:
            raise ValueError("return_vectors (warm starts for the power path) applies to models on the fused engine")
        return generic.jacobian_spectral_norm(model, x, *cond, wrt=wrt, max_memory=max_memory)
    spec, x = lowered.spec, lowered.input(x, cond)
    columns = lowered.columns(wrt)
    y, jac = _columns(spec, x, columns) if columns is not None else \
        _ops.mlp_jacobian(x, spec.weights, spec.biases, spec.activations, spec.act_params, **spec.jacobian_factors)
    u, s, _ = torch.linalg.svd(jac, full_matrices=False)
    return (y, s[:, 0], u[:, :, 0].detach()) if return_vectors else (y, s[:, 0])


def _exact(spec, x, layer, vectors, second_order):
    """(y, s, u or None) from the top eigenpair of G = J J^T (m <= n_layer) or J^T J: by default
    s = ||u^T J|| by the one-row op with the top left singular vector u held fixed (exact value,
    gradient u^T dJ v), the Gram formed without gradient; with second_order, s = sqrt of the
    largest eigenvalue of the differentiable Gram."""
    args = (x, spec.weights, spec.biases, spec.activations, spec.act_params)
    left = spec.widths[-1] <= spec.widths[layer]
    with torch.set_grad_enabled(second_order and torch.is_grad_enabled()):
        if left:
            y, (gram,) = _ops.mlp_jacobian_grams(*args, layers=[layer], **spec.jacobian_factors)
        else:
            y, jac = _ops.mlp_jacobian(*args, layer=layer, **spec.jacobian_factors)
        with torch.autocast(x.device.type, enabled=False):  # the ops' float32 results stay float32
            if not left:
                gram = jac.transpose(1, 2) @ jac
    with torch.autocast(x.device.type, enabled=False):
        top_vector = None
        if vectors or not second_order:
            top_vector = _top_eigenvector(gram.detach())
            if not left:  # u = J v / |J v|, any unit vector where J v = 0
                jv = (jac.detach() @ top_vector.unsqueeze(2)).squeeze(2)
                top_vector = _normalized(jv, torch.eye(1, jv.shape[1], dtype=jv.dtype, device=jv.device).expand_as(jv))
        if not second_order:
            y, s = _power_value(spec, x, layer, top_vector)
            return y, s, top_vector if vectors else None
        # LAPACK raises on NaN: decompose the finite Grams only; trace(G) = ||J||_F^2 carries NaN / inf
        finite = gram.isfinite().all(2).all(1)
        safe = torch.where(finite[:, None, None], gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
        top = torch.where(finite, torch.linalg.eigvalsh(safe)[:, -1], gram.diagonal(dim1=1, dim2=2).sum(1))
    return y, _sqrt(top), top_vector


# Squarings of the trace-normalized Gram in _top_eigenvector: G^(2^16), so the other eigenvalues'
# weight is (lambda_2 / lambda_1)^65536 (below 1e-28 for lambda_2 / lambda_1 <= 0.999).
SQUARINGS = 16


def _top_eigenvector(gram: torch.Tensor) -> torch.Tensor:
    """A unit top eigenvector (B, k) of each symmetric positive semi-definite k x k matrix, by
    repeated squaring: P = G / tr(G), P <- P^2 / tr(P^2) tends to the projector onto the top
    eigenspace (u u^T for a simple top eigenvalue), whose largest column is a top eigenvector. A
    few batched products instead of one LAPACK eigendecomposition per sample (the batched eigh
    loops over the samples). A repeated top eigenvalue gives
    some vector of its eigenspace; G = 0 gives e_1; NaN propagates."""
    tiny = torch.finfo(gram.dtype).tiny

    def normalized(p):
        return p / p.diagonal(dim1=1, dim2=2).sum(1).clamp_min(tiny)[:, None, None]

    p = normalized(gram)
    for _ in range(SQUARINGS):
        p = normalized(p @ p)
    column = p.diagonal(dim1=1, dim2=2).argmax(1)
    u = p.gather(2, column[:, None, None].expand(-1, p.shape[1], 1)).squeeze(2)
    fallback = torch.eye(1, p.shape[1], dtype=p.dtype, device=p.device).expand_as(u)
    return _normalized(u, fallback)


def _normalized(u, fallback):
    """u / |u| per row, `fallback` where |u| = 0."""
    norm = u.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, u / norm.clamp_min(torch.finfo(u.dtype).tiny), fallback)


def _start(spec, x, init, generator):
    """The first left vectors (B, m): init where it is nonzero, else Gaussian draws."""
    source = generator.device if generator is not None else x.device
    draw = torch.randn(x.shape[0], spec.widths[-1], generator=generator, device=source, dtype=torch.float64)
    draw = draw.to(device=x.device, dtype=x.dtype)
    if init is None:
        return _normalized(draw, draw)
    return _normalized(init.detach().to(device=x.device, dtype=x.dtype), _normalized(draw, draw))


def _power_iteration(linearization, u, n_iter, tol):
    """Top left singular vectors (B, m) of each J by alternating products, to the relative
    residual tol (see jacobian_spectral_norm). Each round runs on the samples still above tol
    only (one slow sample does not keep the batch's GEMMs going); under torch.compile every round
    runs on the whole batch."""
    compiling = torch.compiler.is_compiling()
    active = None  # the samples still iterating (None: all)
    u = u.to(linearization.dtype)
    for _ in range(n_iter):
        part = u if active is None else u[active]
        w = linearization.reverse_product(part.unsqueeze(1)).squeeze(1)  # u^T J
        sigma = w.norm(dim=1, keepdim=True)
        v = w / sigma.clamp_min(torch.finfo(w.dtype).tiny)  # J = 0: v = 0, and u stays
        z = linearization.forward_product(v.unsqueeze(1)).squeeze(1)  # J v
        relative_residual = (z - sigma * part).norm(dim=1) / sigma.squeeze(1)
        part = _normalized(z, part)
        u = part if active is None else u.index_copy(0, active, part)
        if compiling:
            continue
        unconverged = relative_residual > tol  # NaN samples (and J = 0: 0 / 0) do not hold the others back
        if not unconverged.any():
            return u
        if not unconverged.all():
            keep = unconverged.nonzero().squeeze(1)
            active = keep if active is None else active[keep]
            linearization = linearization.subset(keep)
            relative_residual = relative_residual[keep]
    if not compiling:
        warnings.warn(f"jacext.jacobian_spectral_norm: power iteration left {len(relative_residual)} of {len(u)} "
                      f"samples above tol={tol:g} after n_iter={n_iter} iterations (largest relative residual "
                      f"{relative_residual.max().item():.3g}); their s is a lower bound of ||J||_2",
                      RuntimeWarning, stacklevel=3)
    return u


def _factors_above(spec, layer: int) -> dict:
    """spec.jacobian_factors of the layers from `layer` up, as the ops take them for the net above
    h_layer: each per-layer list from `layer` on, the skips re-indexed (none crosses the layer:
    check_block_boundary)."""
    factors = {}
    for name, value in spec.jacobian_factors.items():
        if value is not None and name == "residual":
            value = [j - layer if j >= 0 else -1 for j in value[layer:]]
        elif value is not None:
            value = value[layer:]
        factors[name] = value
    return factors


def _power_value(spec, x, layer, u):
    """(y, ||u^T J||) with u fixed: h_layer by the layers below (differentiable; their dropout masks
    and skips applied as the model applies them), then the fused op with one projection row on the
    layers above."""
    h, inputs = x, []
    dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype  # as the op runs
    with torch.autocast(x.device.type, enabled=False):
        for i in range(layer):
            h = h.to(dtype)
            inputs.append(h)
            b = spec.biases[i]
            h = act.activation_value(torch.nn.functional.linear(h, spec.weights[i].to(dtype),
                                                                None if b is None else b.to(dtype)),
                                     spec.activations[i], *spec.act_params[2 * i:2 * i + 2])
            if spec.masks is not None and spec.masks[i] is not None:
                h = spec.masks[i].to(dtype) * h
            if spec.residual is not None and spec.residual[i] >= 0:
                h = h + inputs[spec.residual[i]]
    y, sq = _ops.mlp_jacobian_frobenius(h, spec.weights[layer:], spec.biases[layer:], spec.activations[layer:],
                                        spec.act_params[2 * layer:], method="hutchinson",
                                        projections=u.unsqueeze(1), **_factors_above(spec, layer))
    with torch.autocast(x.device.type, enabled=False):
        return y, _sqrt(sq.squeeze(1))
