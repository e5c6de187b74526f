"""Large-margin distances and loss (Elsayed et al. 2018, "Large Margin Deep Networks for
Classification") on jacext's layer Jacobians.

The distance of sample b to the boundary between its class y and class j, measured at layer l, is
(f_y - f_j) / (eps + ||grad_{h_l}(f_y - f_j)||_q), q the dual of the distance norm, f the softmax
probabilities (as the official code) or the logits. Every gradient is a row combination of the
layer Jacobian J = df/dh_l: with u = e_y - e_j (logits) or u = S_y - S_j (probabilities,
S = diag(s) - s s^T the softmax Jacobian), grad(f_y - f_j) = u^T J. The loss needs k = top_k of
them per sample and layer. On the engine the planner (planner.margin_costs) picks one of two paths:

- rows: the k directions u carried back from the logits through the net, giving u^T J_l at every
  requested layer from one reverse sweep (torch ops over one forward's activation derivatives;
  with use_approximation no graph at all, so the loss's graph is the logits');
- jacobian: all m rows in the engine's sweep (differentiable twice), then J J^T for q = 2 (at the
  input layer by the Gram epilogue S G S^T where that is cheaper than J), u^T J for q = 1, and for
  q = inf at the input layer the rows (u^T S) W_1 from J = S W_1 (S = R^(1) D_1, the reverse carry
  one layer up), whose max-norm's backward reads one column of W_1 per row.

Both engine paths take the model's dropout masks in train() (drawn as the model draws them: the
logits are model(x)'s under the same seed) and residual skips (MARGIN_FACTORS): the ops through
**spec.jacobian_factors, the rows path's own forward and sweep by adding each skip (the adjoint at
a block's output passes on to its input). A hidden layer must be a block boundary: h_l inside a
block is refused (the logits depend on the block's input besides h_l).

On the generic path (any module) the points are the input and the outputs of named submodules,
and the rows come from batched reverse products of the model's one forward."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import activations as act
from . import generic
from . import ops as _ops
from ._checks import check_block_boundary, check_input, check_weights
from ._route import ANY_MODULE, as_cond, engine_or_generic
from .frontend import NotLowerable, dropout_listing, lower, skip_listing
from .functional import JACOBIAN_FAMILY
from .planner import CARRY_ELEMENT_COST, margin_costs, margin_path

__all__ = ["margin_distances", "large_margin_loss", "LargeMarginLoss", "margin_plan", "MarginPlan", "MARGIN_METHODS"]

DUAL_NORM = {1: math.inf, 2: 2, math.inf: 1}
SCORES = ("probs", "logits")
# "auto": the engine's cheaper path when the model lowers and the layers are ints, else the generic
# path; "rows" / "jacobian": that engine path; "autograd": the generic path.
MARGIN_METHODS = ANY_MODULE + ("rows", "jacobian")
INPUT = "input"  # the name of layer 0 (x) in `layers`
# The factors the engine paths take: masks and skips. Not conditioning inputs concatenated with x
# (the input layer's norms would run over their columns too), nor per-sample biases and gates (the
# rows path's forward, sweep and _ReusedRows's backward carry neither): those run the generic path.
MARGIN_FACTORS = JACOBIAN_FAMILY & frozenset(("dropout", "residual", "dropout_with_residual"))
Layer = Union[int, str]


def _check(m, x, target, dist_norm, on):
    """m: the number of classes."""
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
    if dist_norm not in DUAL_NORM:
        raise ValueError(f"dist_norm must be 1, 2 or math.inf, got {dist_norm!r}")
    if on not in SCORES:
        raise ValueError(f"on must be 'probs' or 'logits', got {on!r}")


def _names_points(layers) -> bool:
    """Whether `layers` names submodules (then the margin runs on the generic path)."""
    return any(isinstance(l, str) and l != INPUT for l in layers)


def _engine_layers(layers, depth) -> tuple:
    """layers as the engine's ints ("input" is 0), checked."""
    layers = tuple(0 if l == INPUT else l for l in layers)
    if (len(layers) == 0 or len(set(layers)) != len(layers)
            or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < depth for l in layers)):
        raise ValueError(f"layers must be distinct integers in [0, {depth - 1}] (0 or 'input' = input, l = output "
                         f"of the l-th activation), or names of submodules, got {layers}")
    return layers


def _generic_points(layers) -> tuple:
    """layers as generic.ModelJacobian's points: None for the input (0 or "input"), else names."""
    points = tuple(None if (l == INPUT or (isinstance(l, int) and not isinstance(l, bool) and l == 0)) else l
                   for l in layers)
    if len(points) == 0 or len(set(points)) != len(points) or any(
            p is not None and not isinstance(p, str) for p in points):
        raise ValueError(f"layers={layers!r}: on the generic path the layers are 0 or 'input' for x and names of "
                         "submodules (model.named_modules()) whose outputs are the representations, distinct; "
                         "integer hidden layers need a model that runs on the fused engine")
    return points


def _top_k(top_k, m, optional):
    """The number of direction rows per sample: top_k, or m (every class) for None where allowed."""
    if top_k is None and optional:
        return m
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k <= m - 1):
        raise ValueError(f"top_k must be an integer in [1, {m - 1}]{' or None' if optional else ''}, got {top_k!r}")
    return top_k


def _layer_grams(spec, x, layers):
    """logits and G_l = J_l J_l^T (B, m, m) for each layer, differentiable twice: one reverse sweep,
    the input layer's by the Gram epilogue where it is cheaper and no skip is in the way
    (ops.mlp_jacobian_grams)."""
    return _ops.mlp_jacobian_grams(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=layers,
                                   **spec.jacobian_factors)


def _layer_jacobians(spec, x, layers):
    """logits (B, m) and J_l = dlogits/dh_l (B, m, n_l) for each layer, differentiable twice: one
    op in the planner's mode for one layer, one reverse sweep for several (it passes them all)."""
    if len(layers) == 1:
        y, jac = _ops.mlp_jacobian(x, spec.weights, spec.biases, spec.activations, spec.act_params, layer=layers[0],
                                   **spec.jacobian_factors)
        return y, [jac]
    return _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=layers,
                              **spec.jacobian_factors)


def _layer_matrices(q):
    """What the norms are computed from: J J^T for q = 2, the input layer's J in factors for
    q = inf, the Jacobians for q = 1 (whose gradient needs every entry of each row)."""
    return _layer_grams if q == 2 else _layer_factors if q == math.inf else _layer_jacobians


class _InputFactor:
    """The input-layer Jacobian J_0 = S W_1 kept as its two factors: S = R^(1) D_1 (B, m, n_1), the
    reverse carry at layer 1 scaled by the first activation's derivative, and W_1 (n_1, n_0)."""

    def __init__(self, s, w):
        self.s, self.w = s, w


def _skip_sources(spec) -> set:
    """The layers l whose input h_l a residual skip adds to a later layer's output."""
    return set() if spec.residual is None else {j for j in spec.residual if j >= 0}


def _layer_factors(spec, x, layers):
    """As _layer_jacobians, but the input layer's J_0 as an _InputFactor (q = inf): the sweep stops
    at layer 1, and D_1 (times layer 1's dropout mask) comes from x W_1^T + b_1 by torch ops
    (differentiable twice, like the carry). Not where a skip leaves x (J_0 = S W_1 + the skip's
    carry): then J_0 itself."""
    if 0 not in layers or len(spec.weights) < 2 or 0 in _skip_sources(spec):
        return _layer_jacobians(spec, x, layers)
    above = sorted(set(layers) - {0} | {1})
    y, jacobians = _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=above,
                                      **spec.jacobian_factors)
    carry = dict(zip(above, jacobians))
    dtype = carry[1].dtype  # float32 under autocast, as the op's outputs
    w, b = spec.weights[0].to(dtype), spec.biases[0]
    with torch.autocast(x.device.type, enabled=False):
        pre = x.to(dtype) @ w.t() if b is None else torch.addmm(b.to(dtype), x.to(dtype), w.t())
        d1 = act.activation_derivative(pre, spec.activations[0], *spec.act_params[:2])
        mask = _mask(spec, 0, dtype)
        if mask is not None:
            d1 = d1 * mask
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


def _sqrt_or_zero(sq):
    """sqrt(sq), with no gradient where sq = 0 (u = 0 for j = y): sqrt's derivative is infinite there."""
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq.new_zeros(()))


def _row_norms(rows, q):
    """||rows_j||_q over the last dimension of rows (B, k, n): (B, k)."""
    if q == 2:
        return _sqrt_or_zero(rows.square().sum(2))
    return rows.abs().amax(2) if q == math.inf else rows.abs().sum(2)


def _gradient_norms(jac, u, q):
    """||u_k^T J||_q per sample and class (B, k), in the Jacobian's precision (float32 under
    autocast); for q = 2, `jac` is the Gram matrix J J^T (B, m, m)."""
    with torch.autocast(u.device.type, enabled=False):
        dtype = jac.s.dtype if isinstance(jac, _InputFactor) else jac.dtype
        return _gradient_norms_full_precision(jac, u.to(dtype), q)


def _gradient_norms_full_precision(jac, u, q):
    if isinstance(jac, _InputFactor):  # q = inf at the input layer: the rows (u^T S) W_1
        return _MaxAbsOfProduct.apply(torch.bmm(u, jac.s), jac.w)[0]
    if q == 2:  # Gram identity: u^T (J J^T) u
        return _sqrt_or_zero((torch.bmm(u, jac) * u).sum(2))
    if q == math.inf:  # only the k needed gradients, and one entry of each in the backward
        return _MaxAbsOfProduct.apply(u, jac)[0]
    return torch.bmm(u, jac).abs().sum(2)  # q = 1


def _mask(spec, i, dtype):
    """Layer i's dropout mask in `dtype`, or None."""
    return None if spec.masks is None or spec.masks[i] is None else spec.masks[i].to(dtype)


def _forward(spec, x, dtype=None, visit=None):
    """The lowered MLP's output from x by torch ops in `dtype` (default float32 under autocast, as
    the ops run), with its dropout masks and residual skips applied as the model applies them;
    visit(i, h_i, z_i), where given, sees each layer's input and pre-activation."""
    if dtype is None:
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    h, inputs = x.to(dtype), []
    with torch.autocast(x.device.type, enabled=False):
        for i, (w, b, code) in enumerate(zip(spec.weights, spec.biases, spec.activations)):
            inputs.append(h)
            z = F.linear(h, w.to(dtype), None if b is None else b.to(dtype))
            if visit is not None:
                visit(i, h, z)
            h = act.activation_value(z, code, *spec.act_params[2 * i:2 * i + 2])
            mask = _mask(spec, i, dtype)
            if mask is not None:
                h = mask * h
            if spec.residual is not None and spec.residual[i] >= 0:
                h = h + inputs[spec.residual[i]]
    return h


class _RowSweep:
    """The rows path: the lowered MLP's forward in torch ops, keeping each layer's weight W_i and
    activation derivative D_i (times its dropout mask); then norms(u, q), the norms of the rows
    u^T J_l at every requested layer from one reverse sweep of the k rows u (B, k, m):
    r <- (r D_i) W_i from the logits down to the lowest layer, a skip from h_j into layer i's output
    adding r at h_{i+1} to r at h_j (pending until the sweep reaches h_j; none crosses a requested
    layer: check_block_boundary). With constant norms (use_approximation) neither the derivatives nor the sweep
    carry a graph, so the loss's graph is the logits' alone; otherwise the sweep is torch ops over
    differentiable derivatives, so the norms' gradient flows (the double backward). Under autocast
    it runs in float32, as the ops do."""

    def __init__(self, spec, x, layers, constant, reuse=False):
        check_weights(spec, x)
        self.layers, self.low, self.constant = layers, min(layers), constant
        self.device_type = x.device.type
        self.dtype = torch.float32 if torch.is_autocast_enabled(self.device_type) else x.dtype
        # reuse (constant norms, down to the input): the forward keeps no graph, and the sweep keeps
        # its rows for _ReusedRows, the backward of the margins' differences
        self.reuse = reuse and constant and self.low == 0
        self.spec, self.x, self.inputs, self.scaled, self.input_rows = spec, x, [], {}, None
        self.maps = []  # (W_i, D_i or None for an identity activation) for the layers above the lowest
        # per map, the index of the layer whose input its skip adds to its output, or -1
        self.skips = [-1] * len(spec.weights[self.low:]) if spec.residual is None else spec.residual[self.low:]
        self.sources = _skip_sources(spec)

        def visit(i, h, z):
            if self.reuse:
                self.inputs.append(h)
            if i >= self.low:
                code, (p0, p1) = spec.activations[i], spec.act_params[2 * i:2 * i + 2]
                with torch.set_grad_enabled(torch.is_grad_enabled() and not constant):
                    d = None if code == act.IDENTITY else act.activation_derivative(z, code, p0, p1)
                    mask = _mask(spec, i, self.dtype)
                    if mask is not None:
                        d = mask if d is None else d * mask
                self.maps.append((spec.weights[i].to(self.dtype), d))

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.reuse):
            self.logits = _forward(spec, x, self.dtype, visit)

    def norms(self, u, q):
        """[||u_j^T J_l||_q (B, k) for each requested layer l]."""
        norms, pending = {}, {}  # pending: the rows that skips pass on to the input of layer j
        with torch.autocast(self.device_type, enabled=False), \
                torch.set_grad_enabled(torch.is_grad_enabled() and not self.constant):
            rows = u.to(self.dtype)
            for layer in range(len(self.maps) - 1 + self.low, self.low - 1, -1):
                (w, d), j = self.maps[layer - self.low], self.skips[layer - self.low]
                if j >= 0:
                    pending[j] = pending[j] + rows if j in pending else rows
                if d is not None:
                    rows = rows * d.unsqueeze(1)
                if self.reuse:
                    self.scaled[layer] = rows
                if (layer == self.low and q == math.inf and torch.is_grad_enabled()
                        and layer not in self.sources):
                    # the last product's max-norm: its backward reads one column of W per row
                    norms[layer] = _MaxAbsOfProduct.apply(rows, w)[0]
                    break
                rows = rows @ w
                if layer in pending:
                    rows = rows + pending.pop(layer)
                if layer in self.layers:
                    norms[layer] = _row_norms(rows, q)
        if self.reuse:
            self.input_rows = rows
        return [norms[l] for l in self.layers]

    def differences(self, diff):
        """diff (B, k), computed from the graph-free logits, as a function of x and the parameters
        whose backward reuses the sweep's rows (norms() must have run with the directions u of
        d diff / d logits)."""
        present = [b for b in self.spec.biases if b is not None]
        return _ReusedRows.apply(diff, self, self.x, *self.spec.weights, *present)


class _ReusedRows(torch.autograd.Function):
    """The margins' differences diff_j = f_y - f_j with the rows path's backward: d diff_j / d logits
    is the sweep's direction u_j, so the gradient of sum_j c_j diff_j at layer i's pre-activation is
    sum_j c_j (u_j^T d logits / d z_i), the sweep's rows there, per sample. The backward combines
    them (a (1, k) x (k, n) product per sample) and runs only the weight gradients' GEMMs: no reverse
    GEMM through the network again, which the logits' own backward would run."""

    @staticmethod
    def forward(ctx, diff, sweep, x, *params):
        ctx.sweep = sweep
        return diff.clone()

    @staticmethod
    def backward(ctx, c):
        sweep = ctx.sweep
        c = c.to(sweep.dtype).unsqueeze(1)  # (B, 1, k)
        weights, n_layers = sweep.spec.weights, len(sweep.spec.weights)
        grad_w, grad_b = [None] * n_layers, []
        for i, (w, b, h) in enumerate(zip(weights, sweep.spec.biases, sweep.inputs)):
            g_z = (c @ sweep.scaled[i]).squeeze(1)  # (B, n_{i+1})
            if ctx.needs_input_grad[3 + i]:
                grad_w[i] = (g_z.t() @ h).to(w.dtype)
            if b is not None:
                grad_b.append(g_z.sum(0).to(b.dtype))
        grad_x = None
        if ctx.needs_input_grad[2]:
            grad_x = (c @ sweep.input_rows).squeeze(1).to(sweep.x.dtype)
        return (None, None, grad_x, *grad_w, *grad_b)


def _generic_norms(lin, constant):
    """u, q -> [||u_j^T dy/dh_p||_q (B, k) at each point p] by lin.gradients (generic.ModelJacobian):
    one batched reverse product per chunk for every point; held constant (computed without a
    graph) for use_approximation."""
    def norms(u, q):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not constant):
            return [_row_norms(rows, q) for rows in lin.gradients(u.detach() if constant else u)]
    return norms


def _plan(model, x, cond, layers, method, quantity, stacklevel=5):
    """(lowered model or None for the generic path, layers as that path takes them)."""
    if method not in MARGIN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {MARGIN_METHODS}")
    layers = tuple(layers) if not isinstance(layers, (int, str)) else (layers,)
    if _names_points(layers):
        if method not in ANY_MODULE:
            raise ValueError(f"layers {layers} name submodules, which the generic path differentiates at; "
                             f"method={method!r} is a path of the fused engine (integer layers)")
        return None, _generic_points(layers)
    lowered = engine_or_generic(model, x, cond, method, quantity, stacklevel=stacklevel, supports=MARGIN_FACTORS)
    if lowered is None:
        return None, _generic_points(layers)
    return lowered, _engine_layers_of(lowered.spec, layers, quantity)


def _engine_layers_of(spec, layers, quantity):
    """_engine_layers, each a block boundary of a residual net (check_block_boundary)."""
    layers = _engine_layers(layers, len(spec.weights))
    for layer in layers:
        check_block_boundary(spec.residual, layer, quantity)
    return layers


def _margin_parts(model, x, cond, layers, top_k, top_k_optional, wrt, method, max_memory, target, dist_norm, on,
                  constant_norms, quantity, reuse=False):
    """(logits, norms, m, k, differences): norms(u, q) gives [||u_j^T J_l||_q (B, k) for each layer]
    for the k = top_k (or m) directions u (B, k, m), on the engine (by the planner's path) or the
    generic path. With reuse (the loss, norms held constant) on the rows path down to the input,
    the logits carry no graph and differences(diff) gives diff = f_y - f_j its gradient from the
    sweep's rows (_ReusedRows); else differences is None and the gradient flows through logits."""
    cond = as_cond(cond)
    lowered, layers = _plan(model, x, cond, layers, method, quantity)
    if lowered is None:
        lin = generic.ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory, points=layers)
        logits = lin.output()
        m = logits.shape[1]
        _check(m, x, target, dist_norm, on)
        return logits, _generic_norms(lin, constant_norms), m, _top_k(top_k, m, top_k_optional), None
    if wrt is not None:
        raise ValueError("wrt applies to the generic path's margin (method='autograd'); the engine's margins are "
                         "with respect to whole layers")
    spec, flat = lowered.spec, lowered.input(x)
    m = spec.widths[-1]
    _check(m, flat, target, dist_norm, on)
    k = _top_k(top_k, m, top_k_optional)
    q = DUAL_NORM[dist_norm]
    path = method if method in ("rows", "jacobian") else margin_path(spec.widths, flat.shape[0], layers, k, q,
                                                                        constant_norms, spec.residual)
    if path == "rows":
        sweep = _RowSweep(spec, flat, layers, constant_norms, reuse)
        return sweep.logits, sweep.norms, m, k, (sweep.differences if sweep.reuse else None)
    layer_matrices = _layer_matrices(q)
    if constant_norms:  # the norms are constants: no graph through the Jacobians
        # the model's own forward, but with the masks drawn for the Jacobians (another call draws new ones)
        logits = model(x, *cond) if spec.masks is None else _forward(spec, flat)
        with torch.no_grad():
            _, jacobians = layer_matrices(spec, flat, layers)
    else:
        logits, jacobians = layer_matrices(spec, flat, layers)

    def norms(u, q):
        return [_gradient_norms(jac, u, q) for jac in jacobians]
    return logits, norms, m, k, None


def _competitors(score, target, top_k):
    """The top_k classes other than the target, by score, highest first (B, top_k)."""
    others = score.detach().scatter(1, target.view(-1, 1), -math.inf)
    return others.topk(top_k, dim=1).indices


def margin_distances(model, x: torch.Tensor, target: torch.Tensor, layers: Sequence[Layer] = (0,),
                     dist_norm=2, on: str = "probs", top_k: Optional[int] = None, epsilon: float = 1e-8, *,
                     wrt=None, cond=None, method: str = "auto", max_memory=None):
    """(logits, dist): dist[b, i, j] = (f_y - f_j) / (epsilon + ||grad_{h_l}(f_y - f_j)||_q), the
    signed distance of sample b to the boundary between its class y = target[b] and class j,
    measured at layer l = layers[i], with q the dual of dist_norm (1 -> inf, 2 -> 2, inf -> 1) and
    f the softmax probabilities (on="probs") or the logits. Without top_k, j runs over all m
    classes and dist[b, i, y] = inf; with top_k, over the top_k classes other than y by score,
    highest first. Differentiable twice. An empty batch gives empty tensors.

    layers: where the margins are taken. On the engine (a model that lowers), integers: 0 (or
    "input") for x, l for the output of the l-th activation. On any module (the generic path),
    0 or "input" for x and names of submodules (as in model.named_modules(), e.g. "features.0" or
    a conv block's name) whose outputs, flattened per sample, are the representations; such a
    module must run once per forward, and its output must not be changed in place later.

    Dropout in train() (its masks drawn as the model draws them: the logits are model(x)'s under
    the same seed) and residual blocks run on the engine; a hidden integer layer must be a block
    boundary (h_l inside a residual block raises a ValueError).

    model(x, *cond) may be any module: "auto" runs the engine when it lowers and the layers are
    integers (the planner's cheaper path: "rows", the direction rows only, or "jacobian", all m
    rows; either can be forced by that method), else (and with method="autograd") the generic
    path, with `wrt` choosing input features and max_memory bounding its chunks."""
    logits, norms, m, k, _ = _margin_parts(model, x, cond, layers, top_k, True, wrt, method, max_memory, target,
                                        dist_norm, on, False, "margin_distances")
    q = DUAL_NORM[dist_norm]
    score, score_jacobian = _scores(logits, on)
    if top_k is None:
        classes = torch.arange(m, device=x.device).expand(x.shape[0], m)
    else:
        classes = _competitors(score, target, top_k)
    diff = score.gather(1, target.view(-1, 1)) - score.gather(1, classes)
    u = _directions(score_jacobian, target, classes, m, logits.dtype)
    dist = torch.stack([diff / (epsilon + norm) for norm in norms(u, q)], dim=1)
    if top_k is None:
        dist = dist.masked_fill((classes == target.view(-1, 1)).unsqueeze(1), math.inf)
    return logits, dist


def large_margin_loss(model, x: torch.Tensor, target: torch.Tensor, layers: Sequence[Layer] = (0,),
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
    use_approximation the gradient norms are held constant (no second derivative; on the rows
    path no graph beyond the logits'); without it the norms' own gradient flows (double backward
    through the Jacobian). The official MNIST settings are top_k=1, dist_norm=math.inf,
    use_approximation=True. An empty batch raises a ValueError (the batch mean is undefined).
    layers, model, cond, wrt, method and max_memory as in margin_distances."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 0:
        raise ValueError("x holds no samples: the large-margin loss averages over the batch, which is undefined "
                         "for an empty batch (skip the step, or weight the loss by the batch size)")
    if not gamma > 0 or not alpha_factor > 0 or not epsilon >= 0:
        raise ValueError(f"need gamma > 0, alpha_factor > 0 and epsilon >= 0, got {gamma}, {alpha_factor}, {epsilon}")
    n_layers = len(layers) if not isinstance(layers, (int, str)) else 1
    weights = [1.0] * n_layers if layers_weights is None else [float(w) for w in layers_weights]
    if len(weights) != n_layers or any(not w > 0 for w in weights):
        raise ValueError(f"layers_weights must hold {n_layers} positive numbers, got {layers_weights!r}")
    logits, norms, m, k, differences = _margin_parts(model, x, cond, layers, top_k, False, wrt, method, max_memory,
                                                     target, dist_norm, on, use_approximation, "large_margin_loss",
                                                     reuse=True)
    q = DUAL_NORM[dist_norm]
    score, score_jacobian = _scores(logits, on)
    classes = _competitors(score, target, top_k)
    diff = score.gather(1, target.view(-1, 1)) - score.gather(1, classes)
    if use_approximation and score_jacobian is not None:
        score_jacobian = score_jacobian.detach()
    u = _directions(score_jacobian, target, classes, m, logits.dtype)
    floor = gamma * (1 - alpha_factor)
    losses, layer_norms = [], norms(u, q)
    if differences is not None:
        diff = differences(diff)
    for norm, weight in zip(layer_norms, weights):
        dist = diff / (norm / weight + epsilon)
        if worst_case_loss:
            dist = dist.amin(1, keepdim=True)
        loss = torch.relu(gamma - torch.maximum(dist, dist.new_tensor(floor))) - gamma
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


class MarginPlan:
    """What large_margin_loss (or margin_distances) runs for a model and options, with each
    engine path's predicted cost (planner.margin_costs); `reason` says why a call runs the generic
    path (costs then None)."""

    def __init__(self, widths, batch, layers, rows, dist_norm, use_approximation, method, costs, choice, reason=None,
                 dropout=(), residual=None):
        self.widths, self.batch, self.layers, self.rows = widths, batch, layers, rows
        self.dist_norm, self.use_approximation, self.method = dist_norm, use_approximation, method
        self.costs, self.choice, self.reason = costs, choice, reason
        self.dropout = dropout  # per layer, its Dropouts in train() (frontend.Plan.dropout)
        self.residual = residual  # the model's skips (MLPSpec.residual), None without

    def path_name(self, path: str) -> str:
        m = self.widths[-1]
        if path == "rows":
            return f"rows: {self.rows} direction row{'s' if self.rows > 1 else ''} u^T J, one sweep"
        q = DUAL_NORM[self.dist_norm]
        what = "J J^T" if q == 2 else "J, then u^T J"
        return f"jacobian: all {m} rows, {what}"

    def _factor_lines(self) -> list:
        """How the model's dropout masks and residual skips run on the chosen path."""
        lines = []
        masked = dropout_listing(self.dropout)
        if masked:
            lines.append("  dropout masks, drawn per call as the model draws them (the logits are model(x)'s under the "
                         "same seed): a diagonal factor of J on both paths: " + masked)
        if self.residual is not None:
            skips = skip_listing(self.residual)
            q, sources = DUAL_NORM[self.dist_norm], {j for j in self.residual if j >= 0}
            lines.append(f"  residual skips (i, j), layer i's output adds layer j's input: {skips}; the rows path's "
                         "sweep passes the rows at each block's output on to its input, the Jacobian op's carry does "
                         "the same")
            if 0 in self.layers and (q == 2 or q == math.inf and 0 in sources):
                lines.append("  with skips the jacobian path forms J at the input (the Gram epilogue S (W_1 W_1^T) S^T "
                             "and the factors (u^T S) W_1 do not apply across a skip)")
        return lines

    def __repr__(self):
        norms = "held constant (use_approximation)" if self.use_approximation else "differentiated (exact gradient)"
        head = (f"large-margin loss, layers {self.layers}, {self.rows} row{'s' if self.rows > 1 else ''} per sample "
                f"(top_k), dist_norm={self.dist_norm} (gradient norm q={DUAL_NORM[self.dist_norm]}), norms {norms}, "
                f"method={self.method!r}")
        if self.costs is None:
            return (f"{head}: runs the generic path ({self.reason}): one forward of the module, then the "
                    f"{self.rows} rows u^T dy/dh at every point from batched reverse products")
        lines = [f"{head}\n  MLP {self.widths}, batch {self.batch}: runs {self.path_name(self.choice)}",
                 f"  {'path':44}{'GEMM multiply-adds':>20}{'predicted cost':>17}"]
        for path, (macs, cost) in self.costs.items():
            mark = "  <- chosen" if path == self.choice else ""
            lines.append(f"  {self.path_name(path):44}{macs / 1e9:>17.4g} G{cost / 1e9:>14.4g} G{mark}")
        lines.append(f"  (forward + backward of the loss; cost = multiply-adds + CARRY_ELEMENT_COST "
                     f"({CARRY_ELEMENT_COST}) x carried elements; the least cost wins, rows on a tie)")
        return "\n".join(lines + self._factor_lines())


def margin_plan(model, x: torch.Tensor, target: Optional[torch.Tensor] = None, layers: Sequence[Layer] = (0,),
                top_k: Optional[int] = 1, dist_norm=2, use_approximation: bool = True, method: str = "auto",
                cond=None) -> MarginPlan:
    """The plan of large_margin_loss(model, x, target, layers, top_k=top_k, dist_norm=dist_norm,
    use_approximation=use_approximation, method=method): `print(jacext.explain(model, x,
    quantity="margin", top_k=1, dist_norm=math.inf))`. top_k=None with use_approximation=False
    is margin_distances' plan over every class. target, where given, is checked as the loss
    checks it (the plan does not depend on its values)."""
    cond = as_cond(cond)
    if method not in MARGIN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {MARGIN_METHODS}")
    layers = tuple(layers) if not isinstance(layers, (int, str)) else (layers,)
    reason = None
    if method == "autograd":
        reason = "method='autograd'"
    elif _names_points(layers):
        reason = "layers name submodules"
    else:
        try:
            lowered = lower(model, supports=MARGIN_FACTORS)  # without x: no dropout mask drawn
        except NotLowerable as error:
            if method != "auto":
                raise TypeError(f"{error}; method={method!r} runs on the fused engine only") from None
            reason = f"the model does not lower: {error.path} ({error.op})"
    if reason is not None:
        points = _generic_points(layers)
        with torch.no_grad():
            m = generic.ModelJacobian(model, x, *cond, points=points).m
        _check(m, x, x.new_zeros(x.shape[0], dtype=torch.long) if target is None else target, dist_norm, "probs")
        rows = _top_k(top_k, m, True)
        return MarginPlan(None, x.shape[0], layers, rows, dist_norm, use_approximation, method, None, None, reason)
    spec = lowered.spec
    check_input(spec, lowered.input(x))
    layers = _engine_layers_of(spec, layers, "large_margin_loss")
    m = spec.widths[-1]
    _check(m, lowered.input(x), x.new_zeros(x.shape[0], dtype=torch.long) if target is None else target,
           dist_norm, "probs")
    rows = _top_k(top_k, m, True)
    q = DUAL_NORM[dist_norm]
    costs = margin_costs(spec.widths, x.shape[0], layers, rows, q, use_approximation, spec.residual)
    choice = method if method in ("rows", "jacobian") else margin_path(spec.widths, x.shape[0], layers, rows, q,
                                                                        use_approximation, spec.residual)
    return MarginPlan(spec.widths, x.shape[0], layers, rows, dist_norm, use_approximation, method, costs, choice,
                      dropout=lowered.dropout, residual=spec.residual)
