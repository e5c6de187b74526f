"""The model-level API of the penalty, the Jacobians and the Gram: pass any nn.Module and a batch.

Every function takes `wrt` (the input features to differentiate with respect to), `cond`
(conditioning inputs: the model is called as model(x, *cond)) and `method`: the fused engine runs
a model that lowers (frontend.py), the generic autograd path (generic.py) anything else."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from . import activations as act
from . import generic
from . import ops as _ops
from ._checks import check_weights
from ._route import ANY_MODULE, as_cond, engine_or_generic
from .estimators import check_estimator_options, hutch_plus_plus, hutchinson, random_projections

__all__ = ["jacobian_frobenius", "JacobianFrobenius", "jacobian", "Jacobian", "jacobian_gram", "JacobianGram",
           "random_projections", "METHODS"]

METHODS = ("auto", "reverse", "forward", "gram", "hutchinson", "hutch++", "autograd")
ESTIMATORS = ("hutchinson", "hutch++")
# what the Jacobian ops take: masks, residual skips, per-sample biases and gates, together too
# (frontend.FACTOR_NAMES)
JACOBIAN_FAMILY = frozenset(("input_concat", "dropout", "residual", "dropout_with_residual", "sample_bias", "gate",
                             "dropout_with_conditioning"))


def jacobian_frobenius(model, x: torch.Tensor, method: str = "auto", n_proj: int = 1, generator=None, *,
                       wrt=None, cond=None, distribution: str = "rademacher", orthogonal: bool = False,
                       return_variance: bool = False, max_memory=None):
    """(y, sq): y == model(x, *cond) (B, m) and sq[b] = ||dy_b/dx_b[wrt]||_F^2 (B,), x_b the
    flattened sample and wrt the chosen features (all by default; see jacext.jacobian).

    method: "auto" (the exact strategy with the fewest multiply-adds), "reverse" (carry the m
    output rows back; end with the Gram epilogue instead of forming J when cheaper), "forward"
    (carry the n_0 input columns forward; end with the mirror Gram epilogue when cheaper), "gram"
    (one hidden layer and a linear output: d^T M d with M = (W_1 W_1^T) .* (W_2^T W_2) shared by
    the batch; deeper nets: the cheapest Gram epilogue, or J = A C split at the hidden layer where
    sum((A^T A) .* (C C^T)) is cheapest, e.g. a bottleneck), "hutchinson" (an unbiased random estimate
    from n_proj projections, see below), "hutch++", or "autograd" (the generic path: any module
    torch can differentiate, one batched reverse product per output row). "auto" and
    "hutchinson" run the generic path for a model that does not lower to the engine (with one
    warning per model class); the engine's own strategies raise a TypeError naming the node.
    With wrt, the engine forms J's chosen columns (one sweep) and reduces them. Differentiable
    twice w.r.t. x, cond and the parameters.

    "hutchinson": sq[b] = mean_i ||v_i^T J_b||^2 over n_proj random v with E[v v^T] = I
    (`distribution` "rademacher" or "gaussian", drawn from `generator`), all carried back in one
    fused pass. `orthogonal=True` draws orthonormal rows instead (scaled by sqrt(m); needs
    n_proj <= m), which lowers the variance and is exact at n_proj = m. `return_variance=True`
    returns (y, sq, var) with var[b] the sample variance of the n_proj terms divided by n_proj
    (an unbiased variance estimate of sq[b] for independent projections; for orthogonal ones it
    overstates it). The projections are held fixed: the gradient is the gradient of the
    estimate, itself an unbiased estimate of the penalty's gradient.

    "hutch++" (Meyer et al. 2021): the same budget of n_proj >= 3 Jacobian-vector products, spent
    on a sketch Q = orth(J G) of r = min(n_proj // 3, m) Gaussian columns G (forward products,
    no gradient), the exact part ||Q^T J||_F^2 (r reverse rows) and Hutchinson's estimate of the
    residual ||(I - Q Q^T) J||_F^2 from the other n_proj - 2 r rows (I - Q Q^T) v
    (`distribution`), all reverse rows in one fused pass. Unbiased for every Q, so with Q held
    fixed the value and its gradient are unbiased; where J's singular values decay, the
    residual is small and so is the variance (exact once r = m, at n_proj >= 3 m); on a flat
    spectrum (a net at initialization) its variance is above Hutchinson's at equal n_proj.
    `return_variance=True` (n_proj - 2 r >= 2) gives the residual terms' sample variance divided
    by their number: an unbiased estimate of the estimate's variance.

    max_memory: a budget in bytes for the op's estimated peak (default: a quarter of the device's
    memory). A plan over budget runs the batch in chunks, each recomputed in the backward: same
    result, peak memory of one chunk, about a third more multiply-adds. `jacext.explain` shows the
    chunking.

    A Dropout in train() after a Linear or its activation runs on the engine: its mask is drawn as
    the module draws it (y equals model(x) under the same seed) and J is the masked network's,
    every method above included. A residual block h + g(h) runs on the engine too (with Dropout
    as well), by every method but "gram" (which factors J through single layers and raises a
    ValueError for such a model). A model conditioned inside the network (a conditioning input
    concatenated into a hidden Linear, FFJORD's ConcatSquash) runs on the engine by every method,
    its per-sample biases and gates computed from `cond` on each call (differentiable); a gate on
    the output layer rules out the forms that need a linear output (the planner does not pick them)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    check_estimator_options(method, ESTIMATORS, n_proj, generator, distribution, orthogonal, return_variance)
    if orthogonal and method == "hutch++":
        raise ValueError("orthogonal applies to method='hutchinson'; 'hutch++' orthonormalizes its sketch itself")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "jacobian_frobenius", ANY_MODULE + ("hutchinson",),
                                supports=JACOBIAN_FAMILY)
    if lowered is None:
        return generic.jacobian_frobenius(model, x, *cond, wrt=wrt, max_memory=max_memory,
                                          **_generic_estimator(method, n_proj, generator, distribution, orthogonal,
                                                               return_variance))
    spec, x = lowered.spec, lowered.input(x, cond)
    columns = lowered.columns(wrt)
    if columns is not None:
        return _frobenius_of_columns(spec, x, columns, method, n_proj, generator, distribution, orthogonal,
                                     return_variance)
    if method == "hutchinson":
        return hutchinson(_frobenius_terms(spec, x, max_memory), x.shape[0], n_proj, spec.widths[-1],
                          distribution=distribution, orthogonal=orthogonal, generator=generator, dtype=x.dtype,
                          device=x.device, return_variance=return_variance)
    if method == "hutch++":
        return hutch_plus_plus(_frobenius_terms(spec, x, max_memory), Linearization(spec, x).forward_product,
                               x.shape[0], n_proj, spec.widths[0], spec.widths[-1], distribution=distribution,
                               generator=generator, dtype=x.dtype, device=x.device, return_variance=return_variance)
    return _ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                       method=method, max_memory=max_memory,
                                       **spec.jacobian_factors)


def _generic_estimator(method, n_proj, generator, distribution, orthogonal, return_variance) -> dict:
    """The generic path's method and estimator options for a call with `method` (exact unless it is
    "hutchinson"; orthogonal projections are the engine's only)."""
    if orthogonal:
        raise ValueError("orthogonal projections run on the fused engine only; this call runs the generic path")
    if method != "hutchinson":
        return {"method": "exact"}
    return dict(method="hutchinson", n_proj=n_proj, generator=generator, distribution=distribution,
                return_variance=return_variance)


def _input_layer_columns(lowered, layer, wrt):
    """The chosen columns of the engine's input (None: all) for a Jacobian at `layer` (an int or a
    list; wrt only with layer 0, checked before). A hidden layer's Jacobian does not see how the
    input was formed; the input's, of a model that concatenates conditioning inputs with x, is
    taken over x's columns, alone."""
    if layer == 0:
        return lowered.columns(wrt)
    if lowered.input_parts is not None and not isinstance(layer, int) and 0 in list(layer):
        raise ValueError("the model concatenates conditioning inputs with x: ask for the input's Jacobian "
                         "(layer 0, over x's features) on its own, not in a list of layers")
    return None


def _columns(spec, x, columns):
    """(y, J[:, :, columns]) from the engine's Jacobian (one sweep, its strategy the planner's)."""
    y, jac = _ops.mlp_jacobian(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                               **spec.jacobian_factors)
    return y, jac.index_select(2, columns.to(jac.device))


def _frobenius_of_columns(spec, x, columns, method, n_proj, generator, distribution, orthogonal, return_variance):
    """jacobian_frobenius with wrt on the engine: the chosen columns of J, then the norm or the
    estimators' terms from them (the same estimates as without wrt, on the restricted J)."""
    y, jac = _columns(spec, x, columns)
    if method in ("hutchinson", "hutch++"):
        def terms_of(rows):
            return y, (rows.to(jac.dtype) @ jac).square().sum(2)

        common = dict(distribution=distribution, generator=generator, dtype=x.dtype, device=x.device,
                      return_variance=return_variance)
        if method == "hutchinson":
            return hutchinson(terms_of, x.shape[0], n_proj, jac.shape[1], orthogonal=orthogonal, **common)
        return hutch_plus_plus(terms_of, lambda g: (g.to(jac.dtype) @ jac.detach().transpose(1, 2)), x.shape[0],
                               n_proj, jac.shape[2], jac.shape[1], **common)
    return y, jac.square().sum((1, 2))


def _frobenius_terms(spec, x, max_memory):
    """rows -> (y, ||rows_i^T J||^2 per row) by the fused op: the estimators' terms."""
    def terms_of(rows):
        return _ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                           method="hutchinson", projections=rows, max_memory=max_memory,
                                           **spec.jacobian_factors)
    return terms_of


class Linearization:
    """The MLP's Jacobian J = dy/dh_layer at x as a linear map, for products that need no
    gradient (Hutch++'s sketch, the spectral norm's power iteration): the activation derivatives
    of one forward pass, then per sample J t (forward) or u^T J (reverse) by one batched GEMM per
    layer (the dropout masks of spec.masks in them; a residual skip h_{i+1} += h_j adds the product at
    h_j, or in reverse passes the one at h_{i+1} on to h_j, for j >= layer: below it h_j does not
    depend on h_layer; the per-sample biases and gates of spec in the forward values, z = g * (h W^T)
    + b + s, and the gate in d = g * act'(z)). Under torch.autocast it runs in float32, as the ops do."""

    def __init__(self, spec, x: torch.Tensor, layer: int = 0):
        self.device_type = x.device.type
        check_weights(spec, x)
        self.dtype = torch.float32 if torch.is_autocast_enabled(self.device_type) else x.dtype
        self.maps = []  # (W_k, d_k or None for an identity layer) for the layers above `layer`
        # per map, the index into the maps' inputs (0: h_layer) of its skip, or -1
        self.skips = [-1 if spec.residual is None or spec.residual[i] < layer else spec.residual[i] - layer
                      for i in range(layer, len(spec.weights))]
        with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
            h = x.to(self.dtype)
            none = [None] * len(spec.weights)
            masks, sample_biases, gates = spec.masks or none, spec.sample_biases or none, spec.gates or none
            inputs = []  # each layer's input h_i, for the skips
            for i, (w, b, code, mask) in enumerate(zip(spec.weights, spec.biases, spec.activations, masks)):
                inputs.append(h)
                w = w.to(self.dtype)
                pre = h @ w.t()
                if gates[i] is not None:
                    pre = gates[i].to(self.dtype) * pre
                if b is not None:
                    pre = pre + b.to(self.dtype)
                if sample_biases[i] is not None:
                    pre = pre + sample_biases[i].to(self.dtype)
                p0, p1 = spec.act_params[2 * i:2 * i + 2]
                d = None if code == act.IDENTITY else act.activation_derivative(pre, code, p0, p1)
                h = act.activation_value(pre, code, p0, p1)
                if gates[i] is not None:
                    gate = gates[i].to(self.dtype)
                    d = gate if d is None else gate * d
                if mask is not None:
                    mask = mask.to(self.dtype)
                    d, h = (mask if d is None else mask * d), mask * h
                if spec.residual is not None and spec.residual[i] >= 0:  # the next layers' d at the net's h
                    h = h + inputs[spec.residual[i]]
                if i >= layer:
                    self.maps.append((w, d))

    def subset(self, index: torch.Tensor) -> "Linearization":
        """The same maps for the samples `index` only."""
        part = object.__new__(Linearization)
        part.device_type, part.dtype, part.skips = self.device_type, self.dtype, self.skips
        part.maps = [(w, None if d is None else d[index]) for w, d in self.maps]
        return part

    def forward_product(self, t: torch.Tensor) -> torch.Tensor:
        """(B, k, n_layer) rows t_i -> (B, k, m) rows J t_i."""
        with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
            t = t.to(self.dtype)
            inputs = []
            for (w, d), j in zip(self.maps, self.skips):
                inputs.append(t)
                t = t @ w.t()
                if d is not None:
                    t = t * d.unsqueeze(1)
                if j >= 0:
                    t = t + inputs[j]
            return t

    def reverse_product(self, u: torch.Tensor) -> torch.Tensor:
        """(B, k, m) rows u_i -> (B, k, n_layer) rows u_i^T J."""
        with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
            u = u.to(self.dtype)
            pending = {}  # the adjoints that skips pass to the maps' inputs
            for k in range(len(self.maps) - 1, -1, -1):
                (w, d), j = self.maps[k], self.skips[k]
                if k + 1 in pending:
                    u = u + pending.pop(k + 1)
                if j >= 0:
                    pending[j] = pending[j] + u if j in pending else u
                if d is not None:
                    u = u * d.unsqueeze(1)
                u = u @ w
            return u + pending[0] if 0 in pending else u


JACOBIAN_METHODS = ("auto", "reverse", "forward", "autograd")


def _check_layer_and_wrt(layer, wrt, generic_path):
    layers = [layer] if isinstance(layer, int) else list(layer)
    if wrt is not None and layers != [0]:
        raise ValueError(f"wrt chooses input features: it applies to layer 0 only, got layer={layer!r}")
    if generic_path and layers != [0]:
        raise ValueError(f"layer={layer!r}: Jacobians at hidden layers need a model that runs on the fused engine "
                         "(an MLP it reads); the generic path differentiates with respect to the input (layer 0)")


def jacobian(model, x: torch.Tensor, layer: Union[int, Sequence[int]] = 0, *, wrt=None, cond=None,
             method: str = "auto", max_memory=None):
    """J (B, m, k): J[b] = d y_b / d h_layer,b with y = model(x, *cond) (flattened to (B, m)), where
    h_0 = x (flattened per sample: a model that begins with nn.Flatten gives the Jacobian with
    respect to its n = C*H*W inputs) and h_l is the output of the l-th Linear's activation;
    k = n_layer, or at layer 0 the number of features chosen by `wrt` (an int k for features
    0..k-1, a slice, or a sequence of feature indices; the others held fixed; J's columns in
    that order). Differentiable twice.

    With a sequence of layers, the list of their Jacobians, from one reverse sweep down to the
    lowest (it passes every layer above: one op instead of one per layer). method: "auto",
    "reverse" / "forward" (the engine's sweep), or "autograd" (the generic path; layer 0 only);
    max_memory applies to the generic path."""
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {JACOBIAN_METHODS}")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "jacobian", supports=JACOBIAN_FAMILY)
    _check_layer_and_wrt(layer, wrt, lowered is None)
    if lowered is None:
        jac = generic.jacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)[1]
        return jac if isinstance(layer, int) else [jac]
    spec, x = lowered.spec, lowered.input(x, cond)
    columns = _input_layer_columns(lowered, layer, wrt)
    if columns is not None:
        return _columns(spec, x, columns)[1]
    if isinstance(layer, int):
        return _ops.mlp_jacobian(x, spec.weights, spec.biases, spec.activations, spec.act_params, layer=layer,
                                 method=method, **spec.jacobian_factors)[1]
    return _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=layer,
                              **spec.jacobian_factors)[1]


def jacobian_gram(model, x: torch.Tensor, layer: Union[int, Sequence[int]] = 0, *, wrt=None, cond=None,
                  method: str = "auto", max_memory=None):
    """G (B, m, m) = J J^T with J = jacobian(model, x, layer, wrt=wrt, cond=cond); a list for
    several layers (one reverse sweep). At the input layer of a net whose first hidden layer is
    narrower than its input, J J^T = S G S^T (G = W_1 W_1^T once per batch) without forming J.
    method: "auto" or "autograd" (the generic path)."""
    if method not in ANY_MODULE:
        raise ValueError(f"unknown method {method!r}; expected one of {ANY_MODULE}")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, "jacobian_gram", supports=JACOBIAN_FAMILY)
    _check_layer_and_wrt(layer, wrt, lowered is None)
    if lowered is None:
        gram = generic.jacobian_gram(model, x, *cond, wrt=wrt, max_memory=max_memory)[1]
        return gram if isinstance(layer, int) else [gram]
    spec, x = lowered.spec, lowered.input(x, cond)
    columns = _input_layer_columns(lowered, layer, wrt)
    if columns is not None:
        jac = _columns(spec, x, columns)[1]
        return _ops.batched_gram(jac)
    layers = [layer] if isinstance(layer, int) else list(layer)
    _, grams = _ops.mlp_jacobian_grams(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                       layers=layers, **spec.jacobian_factors)
    return grams[0] if isinstance(layer, int) else grams


class JacobianFrobenius(nn.Module):
    """jacobian_frobenius as a module: JacobianFrobenius(model)(x) -> (y, sq). Wrap this, not the
    bare model, in DistributedDataParallel: DDP synchronizes the gradients of what its forward
    runs, and here that is the fused op (see README, distributed training). As a module it also
    goes through torch.func.functional_call, so an ensemble of stacked weights can be vmapped
    (docs/api.md). Keyword arguments (method, n_proj, generator, ...) are jacobian_frobenius's."""

    def __init__(self, model: nn.Module, method: str = "auto", **options):
        super().__init__()
        self.model, self.method, self.options = model, method, options

    def forward(self, x: torch.Tensor, *cond):
        return jacobian_frobenius(self.model, x, method=self.method, cond=cond, **self.options)


class Jacobian(nn.Module):
    """jacobian as a module: Jacobian(model, layer)(x) -> J (for DDP and functional_call)."""

    def __init__(self, model: nn.Module, layer: Union[int, Sequence[int]] = 0, **options):
        super().__init__()
        self.model, self.layer, self.options = model, layer, options

    def forward(self, x: torch.Tensor, *cond):
        return jacobian(self.model, x, layer=self.layer, cond=cond, **self.options)


class JacobianGram(nn.Module):
    """jacobian_gram as a module: JacobianGram(model, layer)(x) -> J J^T (for DDP and functional_call)."""

    def __init__(self, model: nn.Module, layer: Union[int, Sequence[int]] = 0, **options):
        super().__init__()
        self.model, self.layer, self.options = model, layer, options

    def forward(self, x: torch.Tensor, *cond):
        return jacobian_gram(self.model, x, layer=self.layer, cond=cond, **self.options)
