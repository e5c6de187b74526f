"""Large-margin distances and loss (Elsayed et al. 2018, "Large Margin Deep Networks for
Classification") on jacext's layer Jacobians.

The distance of sample b to the boundary between its class y and class j, measured at layer l, is
(f_y - f_j) / (eps + ||grad_{h_l}(f_y - f_j)||_q), q the dual of the distance norm, f the softmax
probabilities (as the official code) or the logits. Every gradient is a row combination of the
layer Jacobian J = df/dh_l (all layers from one reverse sweep, differentiable twice): with u = e_y - e_j
(logits) or u = S_y - S_j (probabilities, S = diag(s) - s s^T the softmax Jacobian),
grad(f_y - f_j) = u^T J. For q = 2 its norm is u^T (J J^T) u, from the m x m Gram matrix, with no
per-class gradient formed (at the input layer J J^T comes from the Gram epilogue S G S^T where that
is cheaper than J); for q = 1 or inf only the needed rows u^T J are formed. For q = inf at the input
layer, J = S W_1 (S = R^(1) D_1, the reverse carry one layer up) is not formed either: the rows
(u^T S) W_1 are, and their max-norm's backward reads one column of W_1 per row instead of two GEMMs
with W_1 (the max depends on one entry of each row)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import activations as act
from . import generic
from . import ops as _ops
from ._route import ANY_MODULE, as_cond, engine_or_generic

__all__ = ["margin_distances", "large_margin_loss", "LargeMarginLoss"]

DUAL_NORM = {1: math.inf, 2: 2, math.inf: 1}
SCORES = ("probs", "logits")


def _check(m, depth, x, target, layers, dist_norm, on):
    """m: the number of classes; depth: the engine's number of layers (None on the generic path,
    where the margin is taken at the input only)."""
    if (not isinstance(target, torch.Tensor) or target.shape != (x.shape[0],)
            or target.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"target must be an integer tensor of shape ({x.shape[0]},) with class indices")
    if target.numel():
        valid = ((target >= 0) & (target < m)).all()
        message = f"target holds class indices outside [0, {m - 1}]"
        if target.device.type == "cpu":
            if not valid:
                raise ValueError(message)
        else:  # checked on the device: no host sync in the training step (a failure is a device assert)
            torch._assert_async(valid, f"jacext: {message}")
    if m < 2:
        raise ValueError("a margin needs at least two classes (outputs)")
    if depth is None and layers != (0,):
        raise ValueError(f"layers={layers!r}: margins at hidden layers need a model that runs on the fused engine; "
                         "the generic path takes the margin at the input (layers=(0,))")
    if depth is not None and (len(layers) == 0 or len(set(layers)) != len(layers)
                              or any(not isinstance(l, int) or not 0 <= l < depth for l in layers)):
        raise ValueError(f"layers must be distinct integers in [0, {depth - 1}] (0 = input, l = output of "
                         f"the l-th activation), got {tuple(layers)}")
    if dist_norm not in DUAL_NORM:
        raise ValueError(f"dist_norm must be 1, 2 or math.inf, got {dist_norm!r}")
    if on not in SCORES:
        raise ValueError(f"on must be 'probs' or 'logits', got {on!r}")


def _layer_grams(spec, x, layers):
    """logits and G_l = J_l J_l^T (B, m, m) for each layer, differentiable twice: one reverse sweep,
    the input layer's by the Gram epilogue where it is cheaper (ops.mlp_jacobian_grams)."""
    return _ops.mlp_jacobian_grams(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=layers)


def _layer_jacobians(spec, x, layers):
    """logits (B, m) and J_l = dlogits/dh_l (B, m, n_l) for each layer, differentiable twice: one
    op in the planner's mode for one layer, one reverse sweep for several (it passes them all)."""
    if len(layers) == 1:
        y, jac = _ops.mlp_jacobian(x, spec.weights, spec.biases, spec.activations, spec.act_params, layer=layers[0])
        return y, [jac]
    return _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=layers)


def _layer_matrices(q):
    """What the norms are computed from: J J^T for q = 2, the input layer's J in factors for
    q = inf, the Jacobians for q = 1 (whose gradient needs every entry of each row)."""
    return _layer_grams if q == 2 else _layer_factors if q == math.inf else _layer_jacobians


class _InputFactor:
    """The input-layer Jacobian J_0 = S W_1 kept as its two factors: S = R^(1) D_1 (B, m, n_1), the
    reverse carry at layer 1 scaled by the first activation's derivative, and W_1 (n_1, n_0)."""

    def __init__(self, s, w):
        self.s, self.w = s, w


def _layer_factors(spec, x, layers):
    """As _layer_jacobians, but the input layer's J_0 as an _InputFactor (q = inf): the sweep stops
    at layer 1, and D_1 comes from x W_1^T + b_1 by torch ops (differentiable twice, like the carry)."""
    if 0 not in layers or len(spec.weights) < 2:
        return _layer_jacobians(spec, x, layers)
    above = sorted(set(layers) - {0} | {1})
    y, jacobians = _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=above)
    carry = dict(zip(above, jacobians))
    dtype = carry[1].dtype  # float32 under autocast, as the op's outputs
    w, b = spec.weights[0].to(dtype), spec.biases[0]
    with torch.autocast(x.device.type, enabled=False):
        pre = x.to(dtype) @ w.t() if b is None else torch.addmm(b.to(dtype), x.to(dtype), w.t())
        d1 = act.activation_derivative(pre, spec.activations[0], *spec.act_params[:2])
        # under no_grad (use_approximation) the factors are constants, W_1 included
        factor = _InputFactor(carry[1] * d1.unsqueeze(1), w if torch.is_grad_enabled() else w.detach())
    return y, [factor if l == 0 else carry[l] for l in layers]


class _MaxAbsOfProduct(torch.autograd.Function):
    """max_i |(a @ w)[..., i]| for a (B, k, n) and w (n, n_0), one matrix for every sample, or
    w (B, n, n_0), one per sample. The max depends on one entry of each row, so the backward
    gathers one column of w per row and scatters into one column of dw: O(B k n) instead of the
    two batched products (and the passes over |a w| and its sign) autograd would run. The forward
    takes the max and the min of a w, not |a w|: no (B, k, n_0) temporary. Ties (probability zero)
    go to one of the maximal entries (torch.amax would split the gradient between them). The
    backward is made of differentiable torch ops, so this is differentiable twice (the max is
    piecewise linear)."""

    @staticmethod
    def forward(a, w):
        rows = a @ w
        high, high_index = rows.max(dim=-1)
        low, low_index = rows.min(dim=-1)
        positive = high >= -low
        value = torch.where(positive, high, -low)
        index = torch.where(positive, high_index, low_index)
        return value, index, torch.where(positive, high, low).sign()

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, w = inputs
        _, index, sign = output
        ctx.mark_non_differentiable(index, sign)
        ctx.save_for_backward(a, w, index, sign)

    @staticmethod
    def backward(ctx, grad_value, grad_index, grad_sign):
        a, w, index, sign = ctx.saved_tensors
        g = (grad_value * sign).unsqueeze(-1)  # (B, k, 1): d value = g . (da w + a dw) at the maximal column
        grad_a = grad_w = None
        if w.dim() == 3:  # per sample: column index[b, j] of w[b]
            columns = index.unsqueeze(1).expand(-1, w.shape[1], -1)  # (B, n, k)
            if ctx.needs_input_grad[0]:
                grad_a = w.gather(2, columns).transpose(1, 2) * g
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(w).scatter_add(2, columns, (a * g).transpose(1, 2))
            return grad_a, grad_w
        columns = index.reshape(-1)
        if ctx.needs_input_grad[0]:
            # rows of a contiguous W^T: gathering W's columns in place would read it with a stride
            grad_a = w.t().contiguous().index_select(0, columns).view_as(a) * g
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w.t()).index_add(0, columns, (a * g).reshape(-1, a.shape[-1])).t()
        return grad_a, grad_w


def _scores(logits, on):
    """The scores f (B, m) and the rows of df/dlogits (B, m, m), or None for the identity."""
    if on == "logits":
        return logits, None
    s = torch.softmax(logits, dim=1)
    return s, torch.diag_embed(s) - s.unsqueeze(2) * s.unsqueeze(1)


def _directions(score_jacobian, target, classes, m, dtype):
    """u (B, k, m) with u^T J = grad(f_y - f_j) for the k classes j of each sample."""
    if score_jacobian is None:  # logits: e_y - e_j
        rows = torch.eye(m, dtype=dtype, device=target.device)
        return rows[target].unsqueeze(1) - rows[classes]
    u_y = score_jacobian.gather(1, target.view(-1, 1, 1).expand(-1, 1, m))
    u_j = score_jacobian.gather(1, classes.unsqueeze(2).expand(-1, -1, m))
    return u_y - u_j


def _gradient_norms(jac, u, q):
    """||u_k^T J||_q per sample and class (B, k), in the Jacobian's precision (float32 under
    autocast); for q = 2, `jac` is the Gram matrix J J^T (B, m, m)."""
    with torch.autocast(u.device.type, enabled=False):
        dtype = (jac.s.dtype if isinstance(jac, _InputFactor) else u.dtype if isinstance(jac, _InputGradients)
                 else jac.dtype)
        return _gradient_norms_full_precision(jac, u.to(dtype), q)


def _gradient_norms_full_precision(jac, u, q):
    if isinstance(jac, _InputGradients):
        rows = jac.rows(u)
        if q == 2:
            sq = rows.square().sum(2)
            return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq.new_zeros(()))
        return rows.abs().amax(2) if q == math.inf else rows.abs().sum(2)
    if isinstance(jac, _InputFactor):  # q = inf at the input layer: the rows (u^T S) W_1
        return _MaxAbsOfProduct.apply(torch.bmm(u, jac.s), jac.w)[0]
    if q == 2:  # Gram identity: u^T (J J^T) u
        sq = (torch.bmm(u, jac) * u).sum(2)
        # sqrt's derivative is infinite at 0 (u = 0 for j = y): keep it out of the graph there
        return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq.new_zeros(()))
    if q == math.inf:  # only the k needed gradients, and one entry of each in the backward
        return _MaxAbsOfProduct.apply(u, jac)[0]
    return torch.bmm(u, jac).abs().sum(2)  # q = 1


class _InputGradients:
    """The generic path's Jacobian at the input: the gradients u^T J for the directions u, by
    batched reverse products of the model's one forward (generic.ModelJacobian); held constant
    (computed without a graph) for the large-margin loss's use_approximation."""

    def __init__(self, jacobian, constant):
        self.jacobian, self.constant = jacobian, constant

    def rows(self, u):
        if self.constant:
            with torch.no_grad():
                return self.jacobian.input_gradients(u.detach())
        return self.jacobian.input_gradients(u)


def _margin_parts(model, x, cond, layers, q, wrt, method, max_memory, target, dist_norm, on, constant_norms=False,
                  quantity="margin_distances"):
    """(logits, [what each layer's norms come from], m) on the engine or the generic path."""
    if method not in ANY_MODULE:
        raise ValueError(f"unknown method {method!r}; expected one of {ANY_MODULE}")
    cond = as_cond(cond)
    lowered = engine_or_generic(model, x, cond, method, quantity, stacklevel=4)
    if lowered is None:
        lin = generic.ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
        logits = lin.output()
        _check(logits.shape[1], None, x, target, layers, dist_norm, on)
        return logits, [_InputGradients(lin, constant_norms)], logits.shape[1]
    if wrt is not None:
        raise ValueError("wrt applies to the generic path's margin (method='autograd'); the engine's margins are "
                         "with respect to whole layers")
    spec, flat = lowered.spec, lowered.flatten(x)
    m = spec.widths[-1]
    _check(m, len(spec.weights), flat, target, layers, dist_norm, on)
    layer_matrices = _layer_matrices(q)
    if constant_norms:  # the norms are constants: no graph through the Jacobians
        logits = model(x, *cond)
        with torch.no_grad():
            _, jacobians = layer_matrices(spec, flat, layers)
        return logits, jacobians, m
    logits, jacobians = layer_matrices(spec, flat, layers)
    return logits, jacobians, m


def _competitors(score, target, top_k):
    """The top_k classes other than the target, by score, highest first (B, top_k)."""
    others = score.detach().scatter(1, target.view(-1, 1), -math.inf)
    return others.topk(top_k, dim=1).indices


def margin_distances(model, x: torch.Tensor, target: torch.Tensor, layers: Sequence[int] = (0,),
                     dist_norm=2, on: str = "probs", top_k: Optional[int] = None, epsilon: float = 1e-8, *,
                     wrt=None, cond=None, method: str = "auto", max_memory=None):
    """(logits, dist): dist[b, i, j] = (f_y - f_j) / (epsilon + ||grad_{h_l}(f_y - f_j)||_q), the
    signed distance of sample b to the boundary between its class y = target[b] and class j,
    measured at layer l = layers[i] (0 = input, l = output of the l-th activation), with q the
    dual of dist_norm (1 -> inf, 2 -> 2, inf -> 1) and f the softmax probabilities (on="probs")
    or the logits. Without top_k, j runs over all m classes and dist[b, i, y] = inf; with top_k,
    over the top_k classes other than y by score, highest first. Differentiable twice.

    model(x, *cond) may be any module: "auto" runs the engine when it lowers, else (and with
    method="autograd") the generic path, at the input layer, with `wrt` choosing input features
    and max_memory bounding its chunks."""
    layers = tuple(layers)
    logits, jacobians, m = _margin_parts(model, x, cond, layers, DUAL_NORM.get(dist_norm), wrt, method, max_memory,
                                         target, dist_norm, on)
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= m - 1):
        raise ValueError(f"top_k must be an integer in [1, {m - 1}] or None, got {top_k!r}")
    q = DUAL_NORM[dist_norm]
    score, score_jacobian = _scores(logits, on)
    if top_k is None:
        classes = torch.arange(m, device=x.device).expand(x.shape[0], m)
    else:
        classes = _competitors(score, target, top_k)
    diff = score.gather(1, target.view(-1, 1)) - score.gather(1, classes)
    u = _directions(score_jacobian, target, classes, m, logits.dtype)
    dist = torch.stack([diff / (epsilon + _gradient_norms(jac, u, q)) for jac in jacobians], dim=1)
    if top_k is None:
        dist = dist.masked_fill((classes == target.view(-1, 1)).unsqueeze(1), math.inf)
    return logits, dist


def large_margin_loss(model, x: torch.Tensor, target: torch.Tensor, layers: Sequence[int] = (0,),
                      gamma: float = 10000.0, alpha_factor: float = 2.0, top_k: int = 1, dist_norm=2,
                      epsilon: float = 1e-8, use_approximation: bool = True, worst_case_loss: bool = True,
                      layers_weights: Optional[Sequence[float]] = None, on: str = "probs", *, wrt=None,
                      cond=None, method: str = "auto", max_memory=None) -> torch.Tensor:
    """The large-margin loss with the options of the official code (google-research/large_margin,
    margin_loss.large_margin), as a scalar.

    Per layer l: d = (f_y - f_j) / (||grad_{h_l}(f_y - f_j)||_q / w_l + epsilon) for the top_k
    classes j other than y (w_l from layers_weights, default 1); the minimum over them
    (worst_case_loss) or each of them; the loss max(0, gamma - max(d, gamma (1 - alpha_factor)))
    - gamma, summed over the classes kept, averaged over the batch, then over the layers. The
    constant -gamma is the official code's (it does not change the gradient). With
    use_approximation the gradient norms are held constant (no second derivative); without it the
    norms' own gradient flows (double backward through the Jacobian). model, cond, wrt, method
    and max_memory as in margin_distances."""
    layers = tuple(layers)
    logits, jacobians, m = _margin_parts(model, x, cond, layers, DUAL_NORM.get(dist_norm), wrt, method, max_memory,
                                         target, dist_norm, on, constant_norms=use_approximation,
                                         quantity="large_margin_loss")
    if not (isinstance(top_k, int) and 1 <= top_k <= m - 1):
        raise ValueError(f"top_k must be an integer in [1, {m - 1}], got {top_k!r}")
    if not gamma > 0 or not alpha_factor > 0 or not epsilon >= 0:
        raise ValueError(f"need gamma > 0, alpha_factor > 0 and epsilon >= 0, got {gamma}, {alpha_factor}, {epsilon}")
    weights = [1.0] * len(layers) if layers_weights is None else [float(w) for w in layers_weights]
    if len(weights) != len(layers) or any(not w > 0 for w in weights):
        raise ValueError(f"layers_weights must hold {len(layers)} positive numbers, got {layers_weights!r}")

    q = DUAL_NORM[dist_norm]
    score, score_jacobian = _scores(logits, on)
    classes = _competitors(score, target, top_k)
    diff = score.gather(1, target.view(-1, 1)) - score.gather(1, classes)
    if use_approximation and score_jacobian is not None:
        score_jacobian = score_jacobian.detach()
    u = _directions(score_jacobian, target, classes, m, logits.dtype)
    lower = gamma * (1 - alpha_factor)
    losses = []
    for jac, weight in zip(jacobians, weights):
        dist = diff / (_gradient_norms(jac, u, q) / weight + epsilon)
        if worst_case_loss:
            dist = dist.amin(1, keepdim=True)
        loss = torch.relu(gamma - torch.maximum(dist, dist.new_tensor(lower))) - gamma
        losses.append(loss.sum(1).mean())
    return torch.stack(losses).mean()


class LargeMarginLoss(nn.Module):
    """large_margin_loss as a module: LargeMarginLoss(layers=(0, 1), gamma=...)(model, x, target)."""

    def __init__(self, layers: Sequence[int] = (0,), gamma: float = 10000.0, alpha_factor: float = 2.0,
                 top_k: int = 1, dist_norm=2, epsilon: float = 1e-8, use_approximation: bool = True,
                 worst_case_loss: bool = True, layers_weights: Optional[Sequence[float]] = None,
                 on: str = "probs"):
        super().__init__()
        self.options = dict(layers=tuple(layers), gamma=gamma, alpha_factor=alpha_factor, top_k=top_k,
                            dist_norm=dist_norm, epsilon=epsilon, use_approximation=use_approximation,
                            worst_case_loss=worst_case_loss, layers_weights=layers_weights, on=on)

    def forward(self, model, x, target, *cond):
        return large_margin_loss(model, x, target, cond=cond, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
