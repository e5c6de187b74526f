"""The generic path (method="autograd"): every Jacobian quantity of jacext for any module torch
can differentiate (CNNs, LayerNorm, attention, Dropout in train()), in plain torch.autograd.

The model is called as model(x, *cond): x is (B, ...), and every quantity is per sample with
respect to the flattened input x.reshape(B, -1), restricted to the features chosen by `wrt`
(jacext._wrt.resolve_wrt; the others are held fixed); cond are conditioning inputs, passed
through positionally (ordinary gradients reach them, the Jacobian is not taken with respect to
them). The output is flattened too: y = model(x, *cond).reshape(B, -1), (B, m).

The model runs once, on the whole batch, as it would by itself: Dropout in train() draws its
masks exactly as model(x, *cond) would under the same seed (y equals that call's output, and the
random state after it is the same), and every derivative is that of the realized function (the
masks held fixed). One exception to "as it would": normalization layers (LayerNorm, GroupNorm,
RMSNorm, InstanceNorm, BatchNorm on running statistics) run as their formulas in elementary ops,
equal to the fused kernels up to rounding, because the fused ops' third derivatives are wrong
(see _ComposedNorms). The Jacobian's rows come from reverse-mode products with the same graph, all
rows of a chunk in one batched call (torch.autograd.grad with is_grads_batched; a loop over the
rows where an op has no batching rule). This assumes the samples do not interact, so per-sample
Jacobians are defined: BatchNorm on batch statistics is refused.

Everything is differentiable twice w.r.t. x, cond and the parameters (when grad mode is on; under
torch.no_grad the results carry no graph). max_memory (bytes, None for no limit) caps the rows
of one chunk by an estimate of their memory: one row costs about twice the forward's saved
tensors (the graph of its backward, kept for the double backward) plus its (B, k) product; the
forward's own graph and the outputs are not counted. The batch itself is never split: that would
draw different Dropout masks than the module's one call. When a graph is built, each chunk
beyond the first holds no graph: it is computed without one, and again in the backward (the
forward too, with the forward's random state), so that one chunk's graph is held at a time
(_Recomputed).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._wrt import resolve_wrt
from .estimators import check_estimator_options, mean_and_variance, random_projections

__all__ = ["ModelJacobian", "jacobian", "jacobian_frobenius", "jacobian_gram", "jacobian_spectral_norm",
           "laplacian", "divergence", "jacobian_diagonal", "check_per_sample"]

ESTIMATOR_METHODS = ("exact", "hutchinson")


def check_per_sample(model) -> None:
    """Raise if a module of the model normalizes with the batch's statistics (BatchNorm in
    train(), or without running statistics): its samples interact, so a per-sample Jacobian is
    not defined."""
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        where = f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
        if module.training:
            raise ValueError(f"{where} is in train() mode: it normalizes with the batch's statistics, so the samples "
                             f"interact and per-sample Jacobians are not defined; call model.eval() to normalize "
                             f"with its running statistics")
        if module.running_mean is None:
            raise ValueError(f"{where} has no running statistics (track_running_stats=False) and normalizes with "
                             f"the batch's statistics even in eval(), so the samples interact and per-sample "
                             f"Jacobians are not defined; build it with track_running_stats=True and use eval()")


def _check_call(model, x):
    if not callable(model):
        raise TypeError(f"model must be an nn.Module (or a callable), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, ...) with the features after the batch dimension, got "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_per_sample(model)


def _normalized(x, dims, eps):
    centered = x - x.mean(dims, keepdim=True)
    return centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)


def _per_channel(t, x):
    """A (C,) tensor broadcast over x's channel dimension 1."""
    return None if t is None else t.view(-1, *([1] * (x.dim() - 2)))


def _affine(h, weight, bias):
    h = h if weight is None else h * weight
    return h if bias is None else h + bias


def _layer_norm(input, normalized_shape, weight, bias, eps):
    return _affine(_normalized(input, tuple(range(-len(normalized_shape), 0)), eps), weight, bias)


def _group_norm(input, num_groups, weight, bias, eps):
    grouped = _normalized(input.reshape(input.shape[0], num_groups, -1), -1, eps).reshape(input.shape)
    return _affine(grouped, _per_channel(weight, input), _per_channel(bias, input))


def _rms_norm(input, normalized_shape, weight, eps):
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    return _affine(input * torch.rsqrt(input.square().mean(dims, keepdim=True) + eps), weight, None)


def _running_norm(input, running_mean, running_var, weight, bias, eps):
    scale = torch.rsqrt(_per_channel(running_var, input) + eps)
    return _affine((input - _per_channel(running_mean, input)) * scale, _per_channel(weight, input),
                   _per_channel(bias, input))


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    if training:  # batch statistics (refused by check_per_sample for modules): the native op
        return None
    return _running_norm(input, running_mean, running_var, weight, bias, eps)


def _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    if not use_input_stats:
        return _running_norm(input, running_mean, running_var, weight, bias, eps)
    if running_mean is not None:  # it updates running statistics: the native op does that
        return None
    return _affine(_normalized(input, tuple(range(2, input.dim())), eps), _per_channel(weight, input),
                   _per_channel(bias, input))


_NORM_FORMULAS = {F.layer_norm: _layer_norm, F.group_norm: _group_norm, F.rms_norm: _rms_norm,
                  F.batch_norm: _batch_norm, F.instance_norm: _instance_norm}
_SIGNATURES = {function: inspect.signature(function) for function in _NORM_FORMULAS}


class _ComposedNorms(TorchFunctionMode):
    """Runs the normalization functions (layer, group, RMS, instance norm, batch norm on running
    statistics) as their formulas in elementary torch ops. The fused ops' double backward reads
    the mean and inverse deviation saved by the forward kernel, with no autograd history, so the
    third and higher derivatives through them are silently wrong (pytorch/pytorch#175754, and
    #186256 for batch norm): a Laplacian's gradient, or any quantity's second derivative. The
    formulas differ from the fused kernels by rounding only. Under autocast the fused ops run (in
    float32, as autocast casts them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = _NORM_FORMULAS.get(func)
        if formula is not None and isinstance(args[0], torch.Tensor) \
                and not torch.is_autocast_enabled(args[0].device.type):
            bound = _SIGNATURES[func].bind(*args, **kwargs)
            bound.apply_defaults()
            out = formula(**bound.arguments)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _random_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _SavedBytes:
    """Counts the bytes of the tensors autograd saves during a forward (each storage once)."""

    def __init__(self):
        self.storages, self.total = set(), 0

    def pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: count its elements
            self.total += tensor.numel() * tensor.element_size()
            return tensor
        key = (tensor.device, storage.data_ptr())
        if key not in self.storages:
            self.storages.add(key)
            self.total += storage.nbytes()
        return tensor


# A vmapped backward over r rows holds about r copies of the forward's saved tensors at once: past
# this many bytes it runs slower than r plain backwards (memory-bound), so the rows go in groups.
VMAP_BYTES = 32 * 2 ** 20


def _batched_vjp(y, anchor, rows, create_graph, group=None):
    """(B, r, k): rows (r, *y.shape) of output cotangents times each sample's Jacobian dy/d anchor, by
    vmapped backwards over `group` rows at a time (all of them by default; a plain backward for a
    group of one, and one backward a row where an op's backward has no batching rule); for a tuple
    of anchors (B, ...), the tuple of their products, each flattened per sample to (B, r, n_i),
    from the same backwards."""
    anchors = anchor if isinstance(anchor, tuple) else (anchor,)
    if not y.requires_grad:  # the output does not depend on anything differentiable
        products = tuple(a.new_zeros(a.shape[0], rows.shape[0], math.prod(a.shape[1:])) for a in anchors)
        return products if isinstance(anchor, tuple) else products[0]
    options = dict(retain_graph=True, create_graph=create_graph, allow_unused=True, materialize_grads=True)

    def backward(part):
        if part.shape[0] > 1:
            try:
                return torch.autograd.grad(y, anchors, part, is_grads_batched=True, **options)
            except RuntimeError:
                pass
        per_row = [torch.autograd.grad(y, anchors, row, **options) for row in part]
        return tuple(torch.stack(parts) for parts in zip(*per_row))

    with torch.set_grad_enabled(create_graph):  # under no_grad, create_graph alone would record nothing
        parts = [backward(part) for part in rows.split(group or rows.shape[0])]
        products = tuple(torch.cat(p) for p in zip(*parts)) if len(parts) > 1 else parts[0]
        flat = tuple(p.reshape(rows.shape[0], a.shape[0], -1).transpose(0, 1) for p, a in zip(products, anchors))
        return flat if isinstance(anchor, tuple) else flat[0]


class _Recomputed(torch.autograd.Function):
    """run(params, *inputs) -> a tensor (or a tuple of them), computed without keeping its graph: the backward runs it
    again and differentiates that. params: the model's parameters by name (handed to run, which
    calls the model with them); inputs: the other tensors run reads. In the backward every one of
    them enters run through an identity view, so that the gradients returned are those with
    respect to the tensors themselves (not through their history) and, under create_graph, are
    differentiable with respect to them in turn: a double backward sees the whole graph, which
    torch.utils.checkpoint's reentrant form does not give, and its non-reentrant form keeps the
    recomputed tensors of a backward taken inside the region (the products), which defeats it."""

    @staticmethod
    def forward(ctx, run, names, *tensors):
        ctx.run, ctx.names = run, names
        ctx.save_for_backward(*tensors)
        detached = [t.detach() for t in tensors]
        with torch.enable_grad():
            out = run(dict(zip(names, detached)), *detached[len(names):])
        return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()

    @staticmethod
    def backward(ctx, *grad_outs):
        tensors = ctx.saved_tensors
        with torch.enable_grad():
            views = [t.view_as(t) if t.requires_grad else t for t in tensors]
            out = ctx.run(dict(zip(ctx.names, views)), *views[len(ctx.names):])
        outs = out if isinstance(out, tuple) else (out,)  # a tuple: the products at several points
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
        wanted = [v for v in views if v.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         create_graph=torch.is_grad_enabled(), allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, None, *(next(grads) if v.requires_grad else None for v in views))


def _unit_rows(start, stop, batch, m, like):
    """(stop - start, B, m): the one-hot output rows e_start .. e_{stop-1}, the same for every sample."""
    rows = torch.zeros(stop - start, batch, m, dtype=like.dtype, device=like.device)
    rows[torch.arange(stop - start, device=like.device), :, torch.arange(start, stop, device=like.device)] = 1
    return rows


class ModelJacobian:
    """model(x, *cond) run once on the batch, and products with its per-sample Jacobian
    J_b = d y_b / d x_b[wrt] (B, m, k) from that one forward (see the module docstring).

    y: the flattened output (B, m), with its graph (built whatever the grad mode, since the
    products need it); index: the chosen features (None: all); create_graph: the grad mode at
    construction, which decides whether output() carries the graph. Products are differentiable
    when grad mode is on where they are taken (e.g. held constant under torch.no_grad while y
    keeps its graph, as the large-margin loss's use_approximation wants).

    points: None, or the representations to differentiate with respect to instead of x alone, in
    order: None for the input (its `wrt` features) or the name of a submodule (as in
    model.named_modules()) whose output, captured by a forward hook in the one forward, is the
    representation. With points, `anchor` is the tuple of them and products give one product per
    point (gradients())."""

    def __init__(self, model, x: torch.Tensor, *cond, wrt=None, max_memory: Optional[int] = None, points=None):
        _check_call(model, x)
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                       or not max_memory > 0):
            raise ValueError(f"max_memory must be a positive number of bytes (an int) or None, got {max_memory!r}")
        self.model, self.x, self.cond, self.max_memory = model, x, cond, max_memory
        self.batch = x.shape[0]
        self.n_features = math.prod(x.shape[1:])
        index = resolve_wrt(wrt, self.n_features)
        self.index = None if index is None else index.to(x.device)
        self.k = self.n_features if index is None else len(index)
        self.points = None if points is None else _check_points(model, points)
        self.create_graph = torch.is_grad_enabled()
        self.state = _random_state(x.device) if max_memory is not None else None
        counter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            self.y, self.anchor = self._run(x, cond)
        self.m = self.y.shape[1]
        self.saved_bytes = counter.total
        group = VMAP_BYTES // max(self.saved_bytes, 1)
        self.row_group = group if group >= 4 else 1  # rows per vmapped backward (a few gain nothing)
        # features per sample of each variable: the chosen inputs, or each point's representation
        self.sizes = (self.k,) if points is None else tuple(math.prod(a.shape[1:]) for a in self.anchor)

    def _run(self, x, cond, params=None):
        """(y (B, m), anchor (B, k)): the forward, with the chosen features as the variable (and the
        parameters `params` by name in place of the model's, for a recomputed chunk); with points,
        anchor is the tuple of the points' tensors (the captured outputs as they are)."""
        with torch.enable_grad():
            flat = x.reshape(self.batch, self.n_features)
            if self.index is None:
                anchor = flat if flat.requires_grad else flat.detach().requires_grad_()
                full = anchor
            else:
                anchor = flat.index_select(1, self.index)
                if not anchor.requires_grad:
                    anchor = anchor.detach().requires_grad_()
                full = flat.index_copy(1, self.index, anchor)  # the other features: held fixed, x's own
            with _ComposedNorms(), _Capture(self.model, self.points or (), self.batch) as captured:
                if params is None:
                    out = self.model(full.view(x.shape), *cond)
                else:
                    out = torch.func.functional_call(self.model, params, (full.view(x.shape), *cond))
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != self.batch:
            raise TypeError(f"the model must return one tensor of shape ({self.batch}, ...) for x of shape "
                            f"{tuple(x.shape)}; got {type(out).__name__}"
                            f"{' of shape ' + str(tuple(out.shape)) if isinstance(out, torch.Tensor) else ''}")
        if self.points is not None:
            anchor = tuple(anchor if point is None else captured.output(point) for point in self.points)
        with torch.enable_grad():  # a view taken under no_grad would leave the graph
            return out.reshape(self.batch, math.prod(out.shape[1:])), anchor

    def output(self):
        """y as returned by the functions: with its graph when building one, else detached."""
        return self.y if self.create_graph else self.y.detach()

    def _rerun(self, params, x, cond):
        """The forward again, drawing the same random numbers as the first (for a recomputed chunk)."""
        cpu, device_state = self.state
        with torch.random.fork_rng(devices=[x.device] if device_state is not None else []):
            torch.set_rng_state(cpu)
            if device_state is not None:
                torch.cuda.set_rng_state(device_state, x.device)
            return self._run(x, cond, params)

    def chunked(self, n_rows: int, row_bytes: int, create_graph: bool, compute, *tensors):
        """[compute(y, anchor, start, stop, *tensors) for each chunk of the n_rows rows], as many
        rows a chunk as max_memory holds at row_bytes a row. With create_graph, the chunks after
        the first hold no graph (_Recomputed: computed without, and again in the backward, the
        forward too); pass the differentiable tensors compute reads (other than the model's and
        x and cond) as `tensors`. A model that is not an nn.Module (whose parameters cannot be
        found) keeps every chunk's graph."""
        step = n_rows if self.max_memory is None else max(1, min(n_rows, int(self.max_memory // row_bytes)))
        recompute = create_graph and isinstance(self.model, nn.Module)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad] if recompute else []
        names = tuple(name for name, _ in named)
        slots = [i for i, c in enumerate(self.cond) if isinstance(c, torch.Tensor)]  # inputs of a recomputed chunk
        results = []
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            if recompute and start > 0:
                def run(params, x, *inputs, start=start, stop=stop):
                    cond = list(self.cond)
                    for slot, tensor in zip(slots, inputs):
                        cond[slot] = tensor
                    y, anchor = self._rerun(params, x, cond)
                    return compute(y, anchor, start, stop, *inputs[len(slots):])

                results.append(_Recomputed.apply(run, names, *(p for _, p in named), self.x,
                                                 *(self.cond[i] for i in slots), *tensors))
            else:
                results.append(compute(self.y, self.anchor, start, stop, *tensors))
        return results

    def products(self, reduce, directions: Optional[torch.Tensor] = None):
        """[reduce(start, stop, P) per chunk] with P (B, r, k) the rows start..stop-1 of J (directions
        None) or of u^T J for directions u (B, R, m) (e.g. depending on y, differentiably), with
        points the tuple of those products at each point (B, r, n_i); at least one chunk. A row
        costs about its product and the graph of one backward: the forward's saved tensors, about
        as much again when the backward keeps its own graph."""
        n_rows = self.m if directions is None else directions.shape[1]
        if self.batch == 0 or n_rows == 0:
            empty = tuple(self.y.new_zeros(self.batch, n_rows, size) for size in self.sizes)
            return [reduce(0, n_rows, empty if self.points is not None else empty[0])]
        create_graph = torch.is_grad_enabled()

        def compute(y, anchor, start, stop, *u):
            rows = _unit_rows(start, stop, self.batch, self.m, y) if not u else u[0][:, start:stop].transpose(0, 1)
            return reduce(start, stop, _batched_vjp(y, anchor, rows, create_graph, self.row_group))

        row_bytes = 2 * self.saved_bytes + self.batch * sum(self.sizes) * self.y.element_size()
        return self.chunked(n_rows, row_bytes, create_graph, compute, *([] if directions is None else [directions]))

    def jacobian(self) -> torch.Tensor:
        """J (B, m, k)."""
        return torch.cat(self.products(lambda start, stop, p: p), 1)

    def input_gradients(self, directions: torch.Tensor) -> torch.Tensor:
        """(B, r, k): the gradients of u_j . y_b w.r.t. x_b[wrt] for the directions u (B, r, m), e.g.
        the large-margin loss's u = e_y - e_j or rows of the softmax Jacobian (which may depend on y,
        differentiably: their gradient flows too)."""
        if self.points is not None:
            raise ValueError("this ModelJacobian differentiates with respect to points: use gradients()")
        return self.gradients(directions)[0]

    def gradients(self, directions: torch.Tensor) -> list:
        """[(B, r, n_i)]: input_gradients at each point (the input alone without points), the
        representation flattened per sample, all from one batched reverse product per chunk."""
        if not isinstance(directions, torch.Tensor) or directions.dim() != 3 or \
                directions.shape[0] != self.batch or directions.shape[2] != self.m:
            raise ValueError(f"directions must be a tensor of shape ({self.batch}, r, {self.m}) (r output directions "
                             f"per sample), got {_shape(directions)}")
        chunks = self.products(lambda start, stop, p: p if isinstance(p, tuple) else (p,), directions)
        return [torch.cat(parts, 1) for parts in zip(*chunks)]


def _check_points(model, points) -> tuple:
    """points as a tuple of None (the input) and submodule names, checked against the model."""
    if isinstance(points, (str, bytes)) or not hasattr(points, "__iter__"):
        raise TypeError(f"points must be a sequence of submodule names (None for the input), got {points!r}")
    points = tuple(points)
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    for point in points:
        if point is not None and point not in modules:
            raise ValueError(f"{point!r} names no submodule of the model; the names are those of "
                             f"model.named_modules(), e.g. {[name for name in modules if name][:6]}")
    if len(set(points)) != len(points):
        raise ValueError(f"points must be distinct, got {points}")
    return points


class _Capture:
    """Forward hooks that keep the output of each named submodule during one forward. A point
    must be one tensor (B, ...), computed once per forward and not changed in place afterwards
    (e.g. by a ReLU(inplace=True)): its derivative would otherwise be that of another value."""

    def __init__(self, model, names, batch):
        self.model, self.names, self.batch = model, [n for n in names if n is not None], batch
        self.outputs, self.handles = {}, []

    def __enter__(self):
        for name in self.names:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(
                lambda module, args, output, name=name: self._keep(name, output)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False

    def _keep(self, name, output):
        if name in self.outputs:
            raise ValueError(f"submodule {name!r} runs more than once in the model's forward, so its output names "
                             f"no single representation; name a submodule that runs once")
        if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != self.batch:
            raise TypeError(f"submodule {name!r} must return one tensor of shape ({self.batch}, ...) to be a point; "
                            f"got {_shape(output)}")
        self.outputs[name] = (output, output._version)

    def output(self, name):
        if name not in self.outputs:
            raise ValueError(f"submodule {name!r} did not run in the model's forward")
        output, version = self.outputs[name]
        if output._version != version:
            raise ValueError(f"the output of submodule {name!r} is changed in place later in the forward (e.g. by "
                             f"an inplace activation), so its gradient is not that of the representation; make "
                             f"that operation out of place")
        if not output.requires_grad:
            raise ValueError(f"the output of submodule {name!r} does not depend on x")
        return output


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_estimator(method, n_proj, generator, distribution, return_variance):
    if method not in ESTIMATOR_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {ESTIMATOR_METHODS}")
    check_estimator_options("exact" if method == "exact" else "hutchinson", ("hutchinson",), n_proj, generator,
                            distribution, False, return_variance)
    if return_variance and n_proj < 2:
        raise ValueError("return_variance needs n_proj >= 2 (a sample variance of the projections)")


def _projections(batch, n_proj, size, distribution, generator, like):
    """(batch, n_proj, size) rows with E[v v^T] = I, as jacext.random_projections draws them (one
    generator seed gives the engine's projections)."""
    return random_projections(batch, n_proj, size, distribution=distribution, generator=generator, dtype=like.dtype,
                              device=like.device)


def jacobian(model, x: torch.Tensor, *cond, wrt=None, max_memory: Optional[int] = None):
    """(y, J): y = model(x, *cond).reshape(B, -1) (B, m) and J[b] = dy_b / dx_b[wrt] (B, m, k),
    x_b the flattened sample x.reshape(B, -1)[b] and k the number of chosen features (n without
    wrt). Differentiable twice w.r.t. x, cond and the parameters."""
    lin = ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
    return lin.output(), lin.jacobian()


def jacobian_frobenius(model, x: torch.Tensor, *cond, wrt=None, method: str = "exact", n_proj: int = 1,
                       generator=None, distribution: str = "rademacher", return_variance: bool = False,
                       max_memory: Optional[int] = None):
    """(y, sq): sq[b] = ||J_b||_F^2 (B,), J as in jacobian; each chunk of rows is reduced as it
    comes, so J is never held whole. method="hutchinson": sq[b] = mean_i ||v_i^T J_b||^2 over
    n_proj random v (B, n_proj, m) with E[v v^T] = I (`distribution` "rademacher" or "gaussian",
    drawn from `generator`), n_proj products instead of m: unbiased, its gradient the gradient of
    the estimate (v held fixed). return_variance: (y, sq, var), var[b] the sample variance of the
    n_proj terms divided by n_proj."""
    _check_estimator(method, n_proj, generator, distribution, return_variance)
    lin = ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
    if method == "exact":
        return lin.output(), sum(lin.products(lambda start, stop, p: p.square().sum((1, 2))))
    v = _projections(lin.batch, n_proj, lin.m, distribution, generator, lin.y)
    terms = torch.cat(lin.products(lambda start, stop, p: p.square().sum(2), v), 1)
    return (lin.output(), *mean_and_variance(terms, return_variance))


def jacobian_gram(model, x: torch.Tensor, *cond, wrt=None, max_memory: Optional[int] = None):
    """(y, G): G[b] = J_b J_b^T (B, m, m), J as in jacobian."""
    lin = ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
    jac = lin.jacobian()
    return lin.output(), jac @ jac.transpose(1, 2)


def jacobian_spectral_norm(model, x: torch.Tensor, *cond, wrt=None, max_memory: Optional[int] = None):
    """(y, s): s[b] = ||J_b||_2 (B,), the largest singular value of J as in jacobian, exact
    (torch.linalg.svdvals, differentiable twice where the top singular value is simple)."""
    lin = ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
    jac = lin.jacobian()
    if min(lin.m, lin.k) == 0:
        return lin.output(), jac.new_zeros(lin.batch)
    return lin.output(), torch.linalg.svdvals(jac)[:, 0]


def laplacian(model, x: torch.Tensor, *cond, wrt=None, return_gradient: bool = False,
              max_memory: Optional[int] = None):
    """(y, lap): lap[b, i] = sum_j d^2 y_b,i / dx_b,j^2 over the chosen features j (B, m); with
    return_gradient, (y, grad, lap) with grad[b] = dy_b/dx_b over EVERY feature of the flattened
    x (B, m, n): a PDE residual needs u_t beside u_xx. The gradient comes from m reverse products
    (kept differentiable), the Hessian's diagonal entries from m k reverse products of the
    gradient, one per pair (output i, chosen feature j), chunked under max_memory (a pair runs
    through the graphs of the forward and of its backward, and keeps one of its own).
    Differentiable twice."""
    lin = ModelJacobian(model, x, *cond, max_memory=max_memory)
    batch, m, n = lin.batch, lin.m, lin.n_features
    chosen = resolve_wrt(wrt, n)
    chosen = torch.arange(n, device=x.device) if chosen is None else chosen.to(x.device)
    k = len(chosen)

    def gradient(y, anchor):  # (B, m, n), differentiable whatever the grad mode: the Hessian is its derivative
        return _batched_vjp(y, anchor, _unit_rows(0, m, batch, m, y), create_graph=True, group=lin.row_group)

    grad = gradient(lin.y, lin.anchor) if batch and m else lin.y.new_zeros(batch, m, n)

    def diagonal_sum(y, anchor, start, stop):
        """(B, m): the sum over the pairs p = i k + j in start..stop-1 of d grad[b, i, chosen[j]] / dx_b,chosen[j]."""
        first = grad if y is lin.y else gradient(y, anchor)  # a recomputed chunk has its own forward
        if not first.requires_grad:  # the model is linear in x
            return y.new_zeros(batch, m)
        pairs = torch.arange(start, stop, device=y.device)
        outputs, features = pairs // k, chosen[pairs % k]
        rows = torch.zeros(stop - start, batch, m, n, dtype=y.dtype, device=y.device)
        rows[torch.arange(stop - start, device=y.device), :, outputs, features] = 1
        hess = _batched_vjp(first, anchor, rows, lin.create_graph, lin.row_group)  # (B, r, n)
        entries = hess.gather(2, features.expand(batch, -1).unsqueeze(2)).squeeze(2)  # (B, r)
        return y.new_zeros(batch, m).index_add(1, outputs, entries)

    if batch and m:
        row_bytes = 3 * lin.saved_bytes + batch * (m + 1) * n * lin.y.element_size()
        lap = sum(lin.chunked(m * k, row_bytes, lin.create_graph, diagonal_sum))
    else:
        lap = lin.y.new_zeros(batch, m)
    if not lin.create_graph:
        lap, grad = lap.detach(), grad.detach()
    return (lin.output(), grad, lap) if return_gradient else (lin.output(), lap)


def _check_square(lin):
    if lin.m != lin.k:
        raise ValueError(f"the divergence and the Jacobian diagonal pair output i with the i-th chosen feature, so "
                         f"they need as many outputs as chosen features; the model maps its {lin.k} chosen "
                         f"features to {lin.m} outputs")


def _diagonal_parts(lin):
    """[J_b[i, i] for the chunk's rows i (B, r)] per chunk."""
    def reduce(start, stop, p):
        rows = torch.arange(stop - start, device=p.device)
        return p[:, rows, rows + start]

    return lin.products(reduce)


def divergence(model, x: torch.Tensor, *cond, wrt=None, method: str = "exact", n_proj: int = 1, generator=None,
               distribution: str = "rademacher", return_variance: bool = False, max_memory: Optional[int] = None):
    """(y, div): div[b] = sum_i dy_b,i / dx_b,wrt[i] (B,), the trace of J as in jacobian; needs as
    many outputs as chosen features (ValueError otherwise). method="hutchinson": div[b] = mean_i
    v_i^T J_b v_i over n_proj random v (B, n_proj, m), as jacobian_frobenius's (return_variance
    too): unbiased, n_proj products instead of m."""
    _check_estimator(method, n_proj, generator, distribution, return_variance)
    lin = ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
    _check_square(lin)
    if method == "exact":
        return lin.output(), sum(part.sum(1) for part in _diagonal_parts(lin))
    v = _projections(lin.batch, n_proj, lin.m, distribution, generator, lin.y)

    def reduce(start, stop, p):
        return (p * v[:, start:stop]).sum(2)

    terms = torch.cat(lin.products(reduce, v), 1)
    return (lin.output(), *mean_and_variance(terms, return_variance))


def jacobian_diagonal(model, x: torch.Tensor, *cond, wrt=None, max_memory: Optional[int] = None):
    """(y, diag): diag[b, i] = dy_b,i / dx_b,wrt[i] (B, k); needs as many outputs as chosen features."""
    lin = ModelJacobian(model, x, *cond, wrt=wrt, max_memory=max_memory)
    _check_square(lin)
    return lin.output(), torch.cat(_diagonal_parts(lin), 1)
