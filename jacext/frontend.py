"""The front-end: reads the user's nn.Module with torch.fx and lowers it to the engine's MLP.

A model is traced once (per module instance and structure) into a plan: a list of layers that
name the modules and parameters to read, never the tensors themselves. Each call rebuilds the
MLPSpec from the plan with the module's current parameters; what is folded (BatchNorm1d in eval)
is folded with differentiable torch ops, so that gradients reach the module's own parameters.

A model that does not lower raises NotLowerable, naming the node that kept it off the engine:
its module path, op and source line."""
from __future__ import annotations

import inspect
import math
import operator
import os
import sys
import traceback
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import activations as act
from ._wrt import wrt_columns

__all__ = ["lower", "Lowered", "NotLowerable", "MLPSpec", "parse_model", "FACTORS"]

SUPPORTED = ("nn.Linear / F.linear, the activations " + ", ".join(sorted(act.NAMES))
             + " (modules or functions), nn.Identity, nn.Flatten / flatten / view / reshape of the input to "
             "(B, n), torch.cat of the input with conditioning inputs, nn.Dropout / F.dropout (in train(): after a "
             "Linear or its activation), nn.BatchNorm1d in eval(), residual skips h + g(h), conditioning inside the "
             "network: torch.cat([h, c], 1) into a hidden Linear, and a Linear's output times a gate and plus a "
             "per-sample bias computed from conditioning inputs (FFJORD's ConcatSquash: "
             "lin(h) * sigmoid(gate(t)) + bias(t), with nn.Linear, sigmoid and view(-1, 1) on t)")

# The parts of a lowered model beyond a plain MLP (Plan.factors), what each is for the messages; a
# quantity runs on the engine only the parts its ops take (lower's `supports`), the rest on the
# generic path. Dropout beside a residual skip or conditioning inside the network: a family takes the
# combination only where its ops take the masks together with that factor (the forward-carry family
# takes all three; the Jacobian family skips and masks).
FACTOR_NAMES = {"input_concat": "conditioning inputs concatenated with x", "dropout": "Dropout in train()",
                "residual": "a residual skip (h + g(h))",
                "dropout_with_residual": "Dropout in train() in a model with residual skips",
                "sample_bias": "a per-sample bias from conditioning inputs inside the network (torch.cat into a "
                               "hidden Linear, or a shift C t)",
                "gate": "a per-sample gate on a Linear's output (ConcatSquash's sigmoid(A t + a))",
                "dropout_with_conditioning": "Dropout in train() in a model conditioned inside the network"}
FACTORS = frozenset(("input_concat", "dropout", "residual", "sample_bias", "gate"))


class NotLowerable(TypeError):
    """The model does not run on the fused engine: path (the module's qualified name), op (module
    class or function), where ('file:line' of the user's code; for a step with no line of the
    user's own, such as an nn.Sequential's, the line that first called jacext on the model) name
    the node, why says why. args: (message, path, op, where, why); no __init__ of its own, so
    that torch.compile can build and catch it."""

    def __str__(self):
        return self.args[0]

    path = property(lambda self: self.args[1])
    op = property(lambda self: self.args[2])
    where = property(lambda self: self.args[3])
    why = property(lambda self: self.args[4])


def _not_lowerable(path, op, where, why):
    return NotLowerable(f"jacext: {path} ({op}) at {where} does not run on the fused engine: {why}",
                        path, op, where, why)


@dataclass
class MLPSpec:
    """What the ops need to know about an MLP. weights[i] is (n_{i+1}, n_i). masks: None, or one
    (B, n_{i+1}) tensor or None per layer, the dropout masks of one call (a constant factor after
    the layer's activation). residual: None without a skip, else per layer i -1 or the j <= i whose
    input is added to layer i's output (h + g(h); the forward-carry ops' `residual`).
    sample_biases, gates: None, or one (B, n_{i+1}) tensor or None per layer, computed from the call's
    conditioning inputs (differentiable): z = gate * (h W^T) + b + sample_bias (the forward-carry
    and the Jacobian ops' arguments of the same names)."""

    weights: list
    biases: list
    activations: list
    act_params: list
    masks: Optional[list] = None
    residual: Optional[list] = None
    sample_biases: Optional[list] = None
    gates: Optional[list] = None

    @property
    def widths(self) -> list:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    @property
    def jacobian_factors(self) -> dict:
        """The factor arguments of the Jacobian ops (mlp_jacobian_frobenius, mlp_jacobian(s),
        mlp_jacobian_grams): every call passes them all, so a factor they learn reaches every caller."""
        return dict(masks=self.masks, residual=self.residual, sample_biases=self.sample_biases, gates=self.gates)

    @property
    def carry_factors(self) -> dict:
        """The factor arguments of the forward-carry ops (mlp_laplacian, mlp_jacobian_diagonal)."""
        return dict(masks=self.masks, residual=self.residual, sample_biases=self.sample_biases, gates=self.gates)


def parse_model(model: nn.Module, *, supports: frozenset = frozenset()) -> MLPSpec:
    """The engine's MLPSpec of a model (lower's spec): nn.Linear and supported
    activations, Flatten of the input, Dropout and BatchNorm1d in eval(), the user's own modules
    made of these. Raises NotLowerable (a TypeError) naming the node that does not lower, or a
    part of it beyond a plain MLP (FACTORS) that `supports` does not name (a spec without x draws
    no dropout masks: lower(model, x) does)."""
    return lower(model, supports=supports).spec


@dataclass(frozen=True)
class Layer:
    """One Linear of the plan: the qualified names (split at the dots) of its weight and bias
    (None: F.linear without a bias; an nn.Linear's bias is read, None or not), of the BatchNorm1d
    modules folded into its input side (in the order the model applies them) and into its output
    side, its activation, the Dropouts in train() after it: (p, path, op, where) each, a mask
    factor drawn per call, and residual: None, or the index j of the Linear whose input is added
    to this layer's output (a skip h + g(h), j <= this layer's index). concat: None, or the parts
    of a torch.cat([h, c, ...], 1) that feeds this Linear, in order: None for h, else a recipe
    (below) of a conditioning value, whose columns of the weight give a per-sample bias.
    post: the steps on the Linear's output before its activation, ("mul" or "add", recipe) each: a
    per-sample gate and per-sample biases. A recipe computes a conditioning value from the call's
    conditioning inputs: ("cond", k), ("view", recipe, to_batch) (v.view(-1, 1), or v.view(B, -1)
    with to_batch), ("linear", recipe, weight, bias) (an nn.Linear's qualified names), ("sigmoid",
    recipe)."""

    weight: tuple
    bias: Optional[tuple]
    before: tuple
    after: tuple
    activation: int
    act_params: tuple
    dropout: tuple = ()
    residual: Optional[int] = None
    concat: Optional[tuple] = None
    post: tuple = ()


@dataclass(frozen=True)
class Plan:
    """layers; flatten_input: x is flattened to (B, n) first; input_parts: None, or the order in
    which the model concatenates x (-1) with its conditioning inputs (k: cond[k]) into the first
    Linear's input, each as (index, expanded to the batch); concat, skip: (path, op, where) of that
    concatenation and of the first residual sum, None without."""
    layers: tuple
    flatten_input: bool
    input_parts: Optional[tuple] = None
    dropout: tuple = ()  # per layer, its Layer.dropout; empty when no layer has a Dropout in train()
    concat: Optional[tuple] = None
    skip: Optional[tuple] = None
    factors: tuple = ()  # ((factor name, (path, op, where) of a node that has it), ...): FACTOR_NAMES
    conditioned: bool = False  # a layer takes a per-sample bias or gate from the conditioning inputs


def _factors(input_parts, concat, dropout, skip, conditioning=()) -> tuple:
    """Plan.factors: the parts of the plan beyond a plain MLP, each with a node to name;
    conditioning: (factor name, node) of the first per-sample bias and gate inside the network."""
    found = []
    if input_parts is not None:
        found.append(("input_concat", concat))
    dropout_node = next(d for layer in dropout for d in layer)[1:] if dropout else None
    if dropout:
        found.append(("dropout", dropout_node))
    if skip is not None:
        found.append(("residual", skip))
    if dropout and skip is not None:
        found.append(("dropout_with_residual", dropout_node))
    found += conditioning
    if dropout and conditioning:
        found.append(("dropout_with_conditioning", conditioning[0][1]))
    return tuple(found)


@dataclass(frozen=True)
class Lowered:
    """What the engine needs for one call. spec holds the current parameters (derived tensors
    where BatchNorm is folded); flatten_input: the model flattens x to (B, n) before its first
    Linear (the Jacobian is with respect to the flattened input); input_shape: x's per-sample
    shape when the model flattens it and lower() was given x, else None. input_parts: Plan's;
    x_offset, x_features: the columns of the engine's input that hold x's (flattened) features
    (conditioning inputs concatenated before x come first); x_features is None without x."""

    spec: MLPSpec
    flatten_input: bool
    input_shape: Optional[tuple] = None
    input_parts: Optional[tuple] = None
    x_offset: int = 0
    x_features: Optional[int] = None
    dropout: tuple = ()  # Plan.dropout: per layer, its Dropouts in train(), whose masks spec.masks holds

    def input(self, x: torch.Tensor, cond: tuple = ()) -> torch.Tensor:
        """The (B, n) matrix the engine takes: x flattened, concatenated with the conditioning
        inputs as the model concatenates them (so that their gradients flow as in the model)."""
        x = x.flatten(1) if self.flatten_input else x
        if self.input_parts is None:
            return x
        return torch.cat([x if k < 0 else cond[k].expand(x.shape[0], -1) if expand else cond[k]
                          for k, expand in self.input_parts], 1)

    def columns(self, wrt) -> Optional[torch.Tensor]:
        """The engine-input columns of the features of x that wrt chooses; None for every column
        of the engine's input, in order."""
        n = self.spec.widths[0] if self.x_features is None else self.x_features
        return wrt_columns(wrt, n, self.x_offset, self.spec.widths[0])

    @property
    def residual(self) -> Optional[list]:
        return self.spec.residual

def lower(model: nn.Module, x: Optional[torch.Tensor] = None, *cond, supports: frozenset = frozenset()) -> Lowered:
    """The model lowered to the engine for a call model(x, *cond); raises NotLowerable (a
    TypeError) naming the node that does not lower, or a part beyond a plain MLP (FACTORS) that the
    caller's quantity does not take (`supports`; checked before any dropout mask is drawn). With x,
    also checks x's shape against the model's first Linear (TypeError / ValueError) and draws the
    call's dropout masks (spec.masks) as the model would."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"jacext needs an nn.Module, got {type(model).__name__}")
    plan = _plan(model, 1 + len(cond))
    for factor, node in plan.factors:
        if factor not in supports:
            raise _not_lowerable(*node, f"{FACTOR_NAMES[factor]}: this quantity does not run it on the engine "
                                        "(the generic path does)")
    spec = _build(model, plan)
    if plan.conditioned and x is None:
        raise ValueError("the model is conditioned inside the network (a per-sample bias or gate from its "
                         "conditioning inputs): lower it with x and the conditioning inputs, lower(model, x, *cond)")
    input_shape, x_offset, n = None, 0, None
    if x is not None:
        n = spec.widths[0]
        if plan.input_parts is not None:
            x_offset = _check_cond(x, cond, plan, n)
            n -= sum(cond[k].shape[1] for k, _ in plan.input_parts if k >= 0)
        _check_input(x, n, plan.flatten_input)
        input_shape = tuple(x.shape[1:]) if plan.flatten_input else None
        if plan.conditioned:
            _condition(model, plan, spec, cond, x.shape[0])
        if plan.dropout:
            spec.masks = draw_masks(plan, spec, x.shape[0], x.dtype, x.device)
    return Lowered(spec, plan.flatten_input, input_shape, plan.input_parts, x_offset, n, plan.dropout)


def _evaluate(model, recipe, cond, batch):
    """A conditioning value from the call's conditioning inputs (Layer's recipes), in torch ops, so
    that gradients reach the inputs and the modules' parameters."""
    kind = recipe[0]
    if kind == "cond":
        if recipe[1] >= len(cond):
            raise ValueError(f"the model computes a per-sample bias or gate from conditioning input {recipe[1]}, but "
                             f"the call passes {len(cond)} (cond=...)")
        return cond[recipe[1]]
    v = _evaluate(model, recipe[1], cond, batch)
    if kind == "view":
        return v.reshape(batch, -1) if recipe[2] else v.reshape(-1, 1)
    if kind == "linear":
        return F.linear(v, _attribute(model, recipe[2]), None if recipe[3] is None else _attribute(model, recipe[3]))
    return torch.sigmoid(v)


def _per_sample(value, batch, width, what):
    """A conditioning value as a (batch, width) per-sample vector (one row or one column broadcasts,
    as in the model's product or sum)."""
    if value.dim() != 2 or value.shape[0] not in (1, batch) or value.shape[1] not in (1, width):
        raise ValueError(f"{what} must be a ({batch}, {width}) tensor (or one row or column to broadcast), got "
                         f"{tuple(value.shape)}")
    return value.expand(batch, width)


def _condition(model, plan, spec, cond, batch):
    """Sets spec.sample_biases and spec.gates of one call (and splits a Linear fed by torch.cat([h,
    c], 1) into W_h, whose c columns give the per-sample bias c W_c^T): differentiable in the
    weights and the conditioning inputs."""
    sample_biases, gates = [], []
    for i, layer in enumerate(plan.layers):
        n_out, shift, gate = spec.weights[i].shape[0], None, None
        if layer.concat is not None:
            w = spec.weights[i]
            values = [None if part is None else _evaluate(model, part, cond, batch) for part in layer.concat]
            n_h = spec.widths[i] if i == 0 else spec.weights[i - 1].shape[0]
            widths = [n_h if v is None else v.shape[-1] for v in values]
            if sum(widths) != w.shape[1]:
                raise ValueError(f"layer {i} takes torch.cat of widths {widths} ({sum(widths)} features) but its "
                                 f"Linear expects {w.shape[1]}")
            start, keep = 0, None
            for v, width in zip(values, widths):
                part = w[:, start:start + width]
                if v is None:
                    keep = part
                else:
                    term = _per_sample(v, batch, width, f"the conditioning input concatenated at layer {i}") @ part.t()
                    shift = term if shift is None else shift + term
                start += width
            spec.weights[i] = keep
        for kind, recipe in layer.post:
            v = _per_sample(_evaluate(model, recipe, cond, batch), batch, n_out,
                            f"the per-sample {'gate' if kind == 'mul' else 'bias'} of layer {i}")
            if kind == "add":
                shift = v if shift is None else shift + v
                continue
            # (W h + b + s) * g = g * (W h) + (g * b + g * s): the layer's bias becomes per sample
            gate = v if gate is None else gate * v
            if spec.biases[i] is not None:
                shift = spec.biases[i] if shift is None else shift + spec.biases[i]
                spec.biases[i] = None
            shift = None if shift is None else shift * v
        sample_biases.append(None if shift is None else shift.expand(batch, n_out))
        gates.append(gate)
    spec.sample_biases = sample_biases if any(s is not None for s in sample_biases) else None
    spec.gates = gates if any(g is not None for g in gates) else None


def _check_cond(x, cond, plan, n):
    """Checks the conditioning inputs the model concatenates with x; returns x's column offset."""
    offset, before = 0, True
    for k, expand in plan.input_parts:
        if k < 0:
            before = False
            continue
        c = cond[k]
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or (not expand and c.shape[0] != x.shape[0]):
            raise ValueError(f"the model concatenates cond[{k}] with x along the features: it must be a "
                             f"({x.shape[0] if x.dim() else 'B'}, k) tensor, got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if before:
            offset += c.shape[1]
    return offset


def dropout_listing(dropout) -> str:
    """The Dropouts of a lowered model (Lowered.dropout: per layer, (p, path, op, where) each) as the
    plans print them, "layer i: path (op, p=...), ...; ..."; "" without any."""
    return "; ".join(f"layer {i}: " + ", ".join(f"{path} ({op}, p={p:g})" for p, path, op, _ in d)
                     for i, d in enumerate(dropout) if d)


def skip_listing(residual) -> str:
    """A model's residual skips (MLPSpec.residual) as the plans print them, "(i, j), ...": layer i's
    output adds layer j's input."""
    return ", ".join(f"({i}, {j})" for i, j in enumerate(residual) if j >= 0)


def draw_masks(plan, spec, batch, dtype, device) -> list:
    """The dropout masks of one call, one per layer (None for a layer without Dropout in train()):
    F.dropout of ones of the layer's output shape, dtype and device draws the same random numbers as
    the model's dropout on that layer's activation, and the layers draw in the model's order, so
    that the engine's y equals model(x) under the same seed. Several Dropouts in a row multiply."""
    masks = []
    for dropout, width in zip(plan.dropout, spec.widths[1:]):
        mask = None
        for p, *_ in dropout:
            draw = F.dropout(torch.ones(batch, width, dtype=dtype, device=device), p, True)
            mask = draw if mask is None else mask * draw
        masks.append(mask)
    return masks


def _check_input(x, n, flatten_input):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if flatten_input:
        if x.dim() < 2:
            raise ValueError(f"x must have shape (batch, ...) with {n} features per sample, got {tuple(x.shape)}")
        if math.prod(x.shape[1:]) != n:
            raise ValueError(f"x has {math.prod(x.shape[1:])} features per sample (shape {tuple(x.shape[1:])}) but the "
                             f"model flattens them for a first Linear that expects {n}")
        return
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, {n}), got {tuple(x.shape)}")
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} features but the model's first Linear expects {n}")


# ---- per call: the spec from the plan -------------------------------------------------------

def _module(model, parts):
    for part in parts:
        model = model._modules[part]
    return model


def _get(module, name):
    """module.name, through nn.Module's dicts first (its __getattr__ is slow); getattr for the
    rest, e.g. a parametrized weight (torch.nn.utils.parametrize), which is a property."""
    for table in (module._parameters, module._buffers):
        if name in table:
            return table[name]
    return getattr(module, name)


def _attribute(model, parts):
    return _get(_module(model, parts[:-1]), parts[-1])


def _bn_affine(bn):
    """BatchNorm1d in eval as h -> s h + t (differentiable in its weight and bias)."""
    weight, bias = _get(bn, "weight"), _get(bn, "bias")
    s = torch.rsqrt(_get(bn, "running_var") + bn.eps)
    if weight is not None:
        s = weight * s
    t = -_get(bn, "running_mean") * s
    if bias is not None:
        t = t + bias
    return s, t


def _build(model, plan):
    weights, biases, codes, params = [], [], [], []
    residual = None if plan.skip is None else [-1 if layer.residual is None else layer.residual
                                               for layer in plan.layers]
    for layer in plan.layers:
        w = _attribute(model, layer.weight)
        b = None if layer.bias is None else _attribute(model, layer.bias)
        for path in reversed(layer.before):  # W (s h + t) + b, nearest BatchNorm first
            s, t = _bn_affine(_module(model, path))
            b = w @ t if b is None else b + w @ t
            w = w * s
        for path in layer.after:  # s (W h + b) + t
            s, t = _bn_affine(_module(model, path))
            w = s[:, None] * w
            b = t if b is None else s * b + t
        weights.append(w)
        biases.append(b)
        codes.append(layer.activation)
        params += layer.act_params
    return MLPSpec(weights, biases, codes, params, residual=residual)


# ---- the plan, cached per module instance and structure -------------------------------------

_CACHE = weakref.WeakKeyDictionary()  # model -> {(n_inputs, signature): Plan or NotLowerable's args}
_CACHE_SIZE = 8  # structures kept per model (train() / eval() toggles keep both)


def _hyper_reader(m):
    """The function that reads what the plan depends on in a module of m's class besides its class
    and training flag (None: nothing)."""
    if act.from_module(m) is not None:
        return act.from_module
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return operator.attrgetter("p")
    if isinstance(m, nn.BatchNorm1d):
        return lambda bn: (bn.track_running_stats, bn.running_mean is None)
    if isinstance(m, nn.Flatten):
        return operator.attrgetter("start_dim", "end_dim")
    return None


_HYPER = {}  # module class -> its _hyper_reader


def _signature(model):
    """The model's structure as far as a plan depends on it: the module tree (names, classes,
    training flags, hyperparameters, forward hooks). Parameters are not in it: the plan names them."""
    out = []

    def walk(m):
        cls = type(m)
        if cls not in _HYPER:
            _HYPER[cls] = _hyper_reader(m)
        read = _HYPER[cls]
        out.append((cls, m.training, read and read(m), bool(m._forward_hooks or m._forward_pre_hooks)))
        for name, child in m._modules.items():
            out.append(name)
            if child is not None:
                walk(child)

    walk(model)
    return tuple(out)


def _plan(model, n_inputs):
    plan = _lookup(model, n_inputs, _signature(model))
    if not isinstance(plan, Plan):
        raise NotLowerable(*plan)  # a new one each call: a raised exception keeps its traceback
    return plan


@torch.compiler.assume_constant_result
def _lookup(model, n_inputs, signature):
    """The cached Plan (or NotLowerable's args) of the model for this signature; traced on a miss. Under
    torch.compile it runs at compile time, its result a constant: the signature, computed in the
    compiled code, is what torch.compile guards on, so a changed structure recompiles."""
    plans = _CACHE.get(model)
    if plans is None:
        plans = _CACHE[model] = {}
    key = (n_inputs, signature)
    plan = plans.get(key)
    if plan is None:
        try:
            plan = _read(model, n_inputs)
        except NotLowerable as e:
            plan = e.args
        if len(plans) >= _CACHE_SIZE:
            plans.clear()
        plans[key] = plan
    return plan


# ---- reading: trace and lower ---------------------------------------------------------------

_SKIP = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _parts(qualname):
    return tuple(qualname.split(".")) if qualname else ()


def _user_frame(frames):
    """'file:line' of the innermost frame outside torch and jacext (frames innermost first)."""
    last = None
    for filename, line in frames:
        last = f"{filename}:{line}"
        if not filename.startswith(_SKIP):
            return last
    return last or "?"


def _stack():
    frame = sys._getframe(1)
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back


class _Tracer(fx.Tracer):
    """fx's tracer with jacext's activation modules as leaves, recording each node's user line."""

    def is_leaf_module(self, m, qualname):
        return super().is_leaf_module(m, qualname) or type(m).forward is act.SmoothLeakyReLU.forward

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["jacext_where"] = _user_frame(_stack())
        return node


def _trace(model, n_inputs):
    params = list(inspect.signature(model.forward).parameters.values())
    # the arguments the call does not pass take their defaults (forward(x, mask=None): mask is None)
    concrete = {p.name: p.default for p in params[n_inputs:]
                if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        return _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:  # data-dependent control flow, len() of a proxy, ...
        where = _user_frame((f.filename, f.lineno) for f in reversed(traceback.extract_tb(e.__traceback__)))
        raise _not_lowerable(type(model).__name__, "torch.fx trace", where,
                           f"torch.fx cannot trace it ({type(e).__name__}: {e})") from None


_ACTIVATION_FUNCTIONS = {  # function -> (code, the arguments that give its two parameters, defaults)
    torch.tanh: (act.TANH, ()), torch.sigmoid: (act.SIGMOID, ()), torch.relu: (act.RELU, ()),
    F.relu: (act.RELU, ()), F.silu: (act.SILU, ()), F.gelu: (act.GELU, ()),
    F.leaky_relu: (act.LEAKY_RELU, (("negative_slope", 0.01),)), F.elu: (act.ELU, (("alpha", 1.0),)),
    F.softplus: (act.SOFTPLUS, (("beta", 1.0), ("threshold", 20.0))),
}
_ACTIVATION_METHODS = {"tanh": act.TANH, "sigmoid": act.SIGMOID, "relu": act.RELU}


class _Reader:
    """Walks the traced graph once: the model must be a chain from x to the output."""

    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.layers = []          # finished Layers
        self.layer = None         # the Layer being read: dict of its fields
        self.pending = []         # BatchNorm1d nodes after an activation, for the next Linear
        self.flatten_input = False
        self.started = False      # a step other than Identity / eval Dropout / Flatten has run
        self.batch = set()        # nodes holding x.shape, and the batch size x.shape[0]
        self.cond = {}            # conditioning-input nodes -> (cond index, expanded to the batch)
        self.input_parts = None   # Plan.input_parts
        self.concat = None        # that concatenation's (path, op, where)
        self.current = None       # the chain's value
        self.inputs = {}          # chain node -> the value it took
        self.kept = set()         # chain nodes whose value is their input's (Identity, Dropout in eval())
        self.carries = {}         # value -> k: it entered the k-th Linear (the engine's carry C_k)
        self.skip = None          # the first residual sum's (path, op, where)
        self.hidden_concat = {}   # a torch.cat([h, c], 1) node -> its Layer.concat, until its Linear
        self.derived = {}         # conditioning values (the inputs and what is computed from them) -> recipe
        self.conditioning = {}    # "sample_bias" / "gate" -> (path, op, where) of the first node that has it

    # naming
    def refuse(self, node, why):
        raise _not_lowerable(*self.name(node), node.meta.get("jacext_where", "?"), why)

    def name(self, node):
        if node.op == "call_module":
            return node.target, type(self.model.get_submodule(node.target)).__name__
        stack = node.meta.get("nn_module_stack")
        path = next(reversed(stack.values()))[0] if stack else type(self.model).__name__
        if node.op == "call_function":
            op = fx.node._get_qualified_name(node.target)
            op = op.replace("torch._C._nn.", "torch.nn.functional.").replace("_operator.", "operator.")
        elif node.op == "call_method":
            op = f"Tensor.{node.target}"
        else:
            op = node.op
        return path, op

    # steps
    COND_WHY = ("a conditioning input joins the engine only by torch.cat with x at the input (torch.cat([x, c], 1)) or "
                "with a hidden layer's input before its Linear (torch.cat([h, c], 1)), or through nn.Linear, "
                "sigmoid and view(-1, 1) into a Linear's output as a gate (times) or a per-sample bias (plus); "
                "elsewhere the model runs on the generic path")

    def unsupported(self, node, kind):
        if any(a in self.hidden_concat for a in node.all_input_nodes):
            self.refuse(node, "a torch.cat([h, c], 1) inside the network runs on the engine only when it feeds an "
                              "nn.Linear")
        if any(a in self.cond for a in node.all_input_nodes):
            self.refuse(node, self.COND_WHY)
        self.refuse(node, f"unsupported {kind}; the engine runs {SUPPORTED}")

    def chain(self, node, value):
        if value in self.cond:
            self.refuse(node, self.COND_WHY)
        if value is not self.current:
            self.refuse(node, "it takes a value other than the previous step's output (branches, a skip "
                              "other than h + g(h), and several inputs do not run on the engine)")
        self.inputs[node] = value
        self.current = node

    def linear(self, node, weight, bias):
        self.close()
        if not self.pending:  # its input (and what that kept) is the carry C_k; after a BatchNorm it is not
            value = self.inputs[node]
            self.carries[value] = len(self.layers)
            while value in self.kept:
                value = self.inputs[value]
                self.carries[value] = len(self.layers)
        concat = self.inputs[node]
        concat = self.hidden_concat.pop(concat) if concat in self.hidden_concat else None
        self.layer = dict(weight=weight, bias=bias, before=tuple(_parts(n.target) for n in self.pending), after=[],
                          activation=act.IDENTITY, act_params=(0.0, 0.0), dropout=(), residual=None,
                          concat=concat, post=())
        self.pending = []
        self.started = True

    def residual(self, node, a, b):
        """h + g(h) or g(h) + h: the chain's value plus a value that entered an earlier (or this
        block's own) Linear ends a residual block: the engine adds carry C_j to this layer's output."""
        if self.current not in (a, b) or a is b:
            self.refuse(node, "a sum that is not h + g(h) (the chain's value plus a block's input)")
        other = b if a is self.current else a
        if other in self.cond:
            self.refuse(node, self.COND_WHY)
        j = self.carries.get(other) if isinstance(other, fx.Node) else None
        if j is None:
            self.refuse(node, "it adds a value other than the input of an earlier nn.Linear (a residual skip "
                              "h + g(h) adds a block's input to its output)")
        if self.pending:
            self.refuse(self.pending[-1], "a BatchNorm1d between a residual block's last activation and its sum")
        if self.layer["residual"] is not None:
            self.refuse(node, "a second residual sum at the same layer")
        n_in = _attribute(self.model, self.layers[j].weight if j < len(self.layers) else self.layer["weight"]).shape[1]
        n_out = _attribute(self.model, self.layer["weight"]).shape[0]
        if n_in != n_out:
            self.refuse(node, f"a residual sum of widths {n_in} and {n_out} (it broadcasts); the engine's skip adds "
                              "two carries of one width")
        self.layer["residual"] = j
        self.inputs[node] = self.current
        self.current = node
        if self.skip is None:
            self.skip = (*self.name(node), node.meta.get("jacext_where", "?"))

    def where(self, node):
        return (*self.name(node), node.meta.get("jacext_where", "?"))

    def derive(self, node, recipe):
        """node computes a conditioning value (recipe: Layer's)."""
        self.derived[node] = recipe

    def conditioning_step(self, node, kind, a, b):
        """The chain's value times ("mul") or plus ("add") a conditioning value, between a Linear and
        its activation: a per-sample gate or bias of that layer."""
        if self.current not in (a, b) or (a in self.derived) == (b in self.derived):
            self.refuse(node, "a product or sum of the chain's value with something other than one value computed "
                              "from the conditioning inputs")
        recipe = self.derived[b if a is self.current else a]
        layer = self.layer
        if layer is None or layer["activation"] != act.IDENTITY or layer["dropout"] or layer["residual"] is not None:
            self.refuse(node, "a per-sample gate or bias runs on the engine between a Linear and its activation only")
        if self.pending:
            self.refuse(node, "a per-sample gate or bias after a BatchNorm1d that folds into the next nn.Linear")
        layer["post"] += ((kind, recipe),)
        self.conditioning.setdefault("gate" if kind == "mul" else "sample_bias", self.where(node))
        self.inputs[node] = self.current
        self.current = node

    def activation(self, node, code, p0=0.0, p1=0.0):
        if code == act.IDENTITY:
            self.kept.add(node)
            return
        if self.layer is None:
            self.refuse(node, "an activation before the first nn.Linear")
        if self.layer["dropout"]:
            self.refuse(node, "an activation after a Dropout in train(); the engine takes the dropout mask after "
                              "a layer's activation")
        if self.layer["residual"] is not None:
            self.refuse(node, "an activation after a residual sum (sigma(h + g(h))); the engine's skip adds the "
                              "block's input after the block's last activation")
        if self.layer["activation"] != act.IDENTITY:
            self.refuse(node, "it follows another activation; one activation per Linear is supported")
        self.layer.update(activation=code, act_params=(float(p0), float(p1)))

    def batchnorm(self, node, bn):
        if bn.training:
            self.refuse(node, "BatchNorm in train() mixes the samples of the batch, so per-sample Jacobians "
                              "are not defined; use eval() (its running statistics)")
        if not bn.track_running_stats or bn.running_mean is None:
            self.refuse(node, "BatchNorm1d without running statistics normalizes with the batch's own, which mix "
                              "the samples, so per-sample Jacobians are not defined")
        if self.layer is not None and self.layer["activation"] == act.IDENTITY and self.layer["post"]:
            self.refuse(node, "a BatchNorm1d after a per-sample gate or bias, before the activation")
        if (self.layer is None or self.layer["activation"] != act.IDENTITY or self.layer["dropout"]
                or self.layer["residual"] is not None):
            self.pending.append(node)
        else:
            self.layer["after"].append(_parts(node.target))
        self.started = True

    def dropout(self, node, p, training):
        if not training or p == 0:
            self.kept.add(node)
            return  # the identity
        if self.layer is None:
            self.refuse(node, "Dropout in train() on the input, before the first nn.Linear: its mask is not a factor "
                              "of a layer (the generic path draws it)")
        if self.pending:
            self.refuse(node, "Dropout in train() after a BatchNorm1d that folds into the next nn.Linear: its mask "
                              "is not a factor of a layer's output (the generic path draws it)")
        if self.layer["residual"] is not None:
            self.refuse(node, "Dropout in train() after a residual sum")
        if not 0 <= p <= 1:
            self.refuse(node, f"dropout probability {p}; expected one in [0, 1]")
        self.layer["dropout"] += ((float(p),) + self.name(node) + (node.meta.get("jacext_where", "?"),),)

    def flatten(self, node):
        if self.started:
            self.refuse(node, "a flatten runs on the engine only on the input, before the first nn.Linear")
        self.flatten_input = True

    def close(self):
        if self.layer is not None:
            self.layers.append(Layer(**dict(self.layer, after=tuple(self.layer["after"]))))
            self.layer = None

    # the walk
    def read(self):
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.current = placeholders[0]
        self.cond = {extra: (k, False) for k, extra in enumerate(placeholders[1:])}
        self.derived = {extra: ("cond", k) for k, extra in enumerate(placeholders[1:])}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
            elif node.op == "output":
                self.output(node)
        dropout = tuple(layer.dropout for layer in self.layers)
        dropout = dropout if any(dropout) else ()
        if self.hidden_concat:
            self.refuse(next(iter(self.hidden_concat)), "a torch.cat([h, c], 1) that does not feed an nn.Linear")
        return Plan(tuple(self.layers), self.flatten_input, self.input_parts, dropout, self.concat, self.skip,
                    _factors(self.input_parts, self.concat, dropout, self.skip, tuple(self.conditioning.items())),
                    bool(self.conditioning))

    def output(self, node):
        result = node.args[0]
        if not isinstance(result, fx.Node):
            self.refuse(node, f"the model returns a {type(result).__name__}; the engine computes one tensor")
        self.chain(node, result)
        if self.pending:
            self.refuse(self.pending[-1], "a BatchNorm1d after the last activation has no nn.Linear after it "
                                          "to fold into")
        self.close()
        if not self.layers:
            self.refuse(node, "the model has no nn.Linear layer")

    def call_module(self, node):
        m = self.model.get_submodule(node.target)
        if m._forward_hooks or m._forward_pre_hooks:
            self.refuse(node, "forward hooks run on the generic path")
        if len(node.args) != 1 or node.kwargs:
            self.refuse(node, "unsupported call: the engine's modules take one tensor")
        if node.args[0] in self.derived:  # a module on a conditioning value: nn.Linear or nn.Sigmoid
            source = self.derived[node.args[0]]
            if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
                path = _parts(node.target)
                self.derive(node, ("linear", source, path + ("weight",), None if m.bias is None else path + ("bias",)))
            elif act.from_module(m) is not None and act.from_module(m)[0] == act.SIGMOID:
                self.derive(node, ("sigmoid", source))
            else:
                self.refuse(node, self.COND_WHY)
            return
        self.chain(node, node.args[0])
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            path = _parts(node.target)
            self.linear(node, path + ("weight",), path + ("bias",))
        elif act.from_module(m) is not None:
            self.activation(node, *act.from_module(m))
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            if m.training and m.p > 0 and type(m) is not nn.Dropout:  # channels, or alpha dropout's affine map
                self.refuse(node, f"{type(m).__name__} in train(): only nn.Dropout's elementwise mask is a factor "
                                  "of a layer (the generic path draws it)")
            self.dropout(node, m.p, m.training)
        elif isinstance(m, nn.BatchNorm1d):
            self.batchnorm(node, m)
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                self.refuse(node, f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}); the engine flattens "
                                  "the input to (B, n) only: start_dim=1, end_dim=-1")
            self.flatten(node)
        else:
            self.refuse(node, f"unsupported module; the engine runs {SUPPORTED}")

    def arguments(self, node):
        """The node's arguments by name, its input (the chain's value) under "input"."""
        if len(node.args) == 1 and not node.kwargs:
            return {"input": node.args[0]}
        if node.op == "call_method":  # the few methods read here: x.flatten(start_dim, end_dim)
            return {**dict(zip(("input", "start_dim", "end_dim"), node.args)), **node.kwargs}
        try:
            pair = node.normalized_arguments(self.model, normalize_to_only_use_kwargs=True)
        except Exception:  # an ambiguous schema: an unusual call of a supported function
            pair = None
        if pair is None:
            self.refuse(node, "arguments the engine cannot read")
        return pair.kwargs

    def step(self, node):
        """The node's arguments after the chain check of its input; the others must be constants."""
        a = self.arguments(node)
        self.chain(node, a.pop("input", None))
        if any(isinstance(v, fx.Node) for v in a.values()) and node.target is not F.linear:
            self.refuse(node, "an argument computed in the model; the engine needs constants")
        return a

    def call_function(self, node):
        target = node.target
        if target is fx._symbolic_trace._assert_is_none:
            return
        if target is getattr and node.args[1] == "shape":
            self.batch.add(node)
        elif target is operator.getitem and node.args[0] in self.batch:
            if node.args[1] != 0:
                self.refuse(node, "a size other than the batch size")
            self.batch.add(node)
        elif target is F.linear:
            a = self.step(node)
            weight, bias = a["weight"], a.get("bias")
            if any(t is not None and (not isinstance(t, fx.Node) or t.op != "get_attr") for t in (weight, bias)):
                self.refuse(node, "F.linear runs on the engine with the model's own parameters only")
            self.linear(node, _parts(weight.target), None if bias is None else _parts(bias.target))
        elif target is torch.sigmoid and len(node.args) == 1 and not node.kwargs and node.args[0] in self.derived:
            self.derive(node, ("sigmoid", self.derived[node.args[0]]))
        elif target in (operator.mul, torch.mul) and len(node.args) == 2 and not node.kwargs:
            self.conditioning_step(node, "mul", *node.args)
        elif target in (operator.add, operator.iadd, torch.add) and any(a in self.derived for a in node.args):
            self.conditioning_step(node, "add", *self.summands(node))
        elif target in _ACTIVATION_FUNCTIONS:
            code, params = _ACTIVATION_FUNCTIONS[target]
            a = self.step(node)
            if code == act.GELU:
                approximate = a.get("approximate", "none")
                if approximate not in ("none", "tanh"):
                    self.refuse(node, f"approximate={approximate!r}")
                code = act.GELU_TANH if approximate == "tanh" else act.GELU
            self.activation(node, code, *[a.get(name, default) for name, default in params])
        elif target is F.dropout:
            a = self.step(node)
            self.dropout(node, a.get("p", 0.5), a.get("training", True))
        elif target is torch.flatten:
            self.flatten_to_matrix(node, self.step(node))
        elif target in (torch.cat, torch.concat, torch.concatenate):
            self.concatenate(node)
        elif target in (operator.add, operator.iadd, torch.add):
            self.residual(node, *self.summands(node))
        else:
            self.unsupported(node, "function")

    def concatenate(self, node):
        """torch.cat([x, c, ...], 1) at the input: x and conditioning inputs (or c.expand(B, k))."""
        a = self.arguments(node)
        tensors, dim = a.get("tensors"), a.get("dim", 0)
        if self.started and dim in (1, -1) and isinstance(tensors, (list, tuple)):
            self.concatenate_hidden(node, tensors)
            return
        if self.started or self.input_parts is not None:
            self.refuse(node, "a concatenation runs on the engine only at the input, of x with conditioning "
                              "inputs, before the first nn.Linear (a per-sample bias inside the network runs on "
                              "the generic path)")
        if dim not in (1, -1) or not isinstance(tensors, (list, tuple)):
            self.refuse(node, f"torch.cat along dim={dim}; the engine concatenates features (dim=1)")
        if sum(t is self.current for t in tensors) != 1 or not all(t is self.current or t in self.cond
                                                                     for t in tensors):
            self.refuse(node, "the engine concatenates x once with conditioning inputs (the model's extra "
                              "arguments, or their .expand(B, k)) only")
        self.input_parts = tuple((-1, False) if t is self.current else self.cond[t] for t in tensors)
        self.concat = (*self.name(node), node.meta.get("jacext_where", "?"))
        self.inputs[node] = self.current
        self.current = node

    def concatenate_hidden(self, node, tensors):
        """torch.cat([h, c, ...], 1) of the chain's value with conditioning values, feeding a Linear:
        that Linear's weight splits into W_h and the columns that give a per-sample bias."""
        if sum(t is self.current for t in tensors) != 1 or not all(t is self.current or t in self.derived
                                                                     for t in tensors):
            self.refuse(node, "a concatenation inside the network of the chain's value once with values computed "
                              "from the conditioning inputs only")
        if self.pending:
            self.refuse(node, "a concatenation after a BatchNorm1d that folds into the next nn.Linear")
        self.hidden_concat[node] = tuple(None if t is self.current else self.derived[t] for t in tensors)
        self.conditioning.setdefault("sample_bias", self.where(node))
        self.inputs[node] = self.current
        self.kept.add(node)  # the Linear's carry is h, the concatenation's input
        self.current = node

    def summands(self, node):
        """The two tensors of a sum a + b (operator.add, +=, torch.add, Tensor.add); alpha must be 1."""
        kwargs = dict(node.kwargs)
        if len(node.args) != 2 or kwargs.pop("alpha", 1) != 1 or kwargs:
            self.refuse(node, "a sum other than a + b (alpha, out= or a third argument)")
        return node.args

    def call_method(self, node):
        target = node.target
        if target == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim not in (None, 0):
                self.refuse(node, "a size other than the batch size")
            self.batch.add(node)
        elif target in ("view", "reshape") and node.args[0] in self.derived:
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            to_batch = len(shape) == 2 and shape[0] in self.batch and shape[1] == -1
            if node.kwargs or not (to_batch or tuple(shape) == (-1, 1)):
                self.refuse(node, "a conditioning input's reshape other than t.view(-1, 1) or t.view(B, -1)")
            self.derive(node, ("view", self.derived[node.args[0]], to_batch))
        elif target == "sigmoid" and len(node.args) == 1 and not node.kwargs and node.args[0] in self.derived:
            self.derive(node, ("sigmoid", self.derived[node.args[0]]))
        elif target == "mul" and len(node.args) == 2 and not node.kwargs:
            self.conditioning_step(node, "mul", *node.args)
        elif target in ("add", "add_") and any(a in self.derived for a in node.args):
            self.conditioning_step(node, "add", *self.summands(node))
        elif target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
            self.chain(node, node.args[0])
            self.activation(node, _ACTIVATION_METHODS[target])
        elif target in ("view", "reshape"):
            self.chain(node, node.args[0])
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if node.kwargs or len(shape) != 2 or shape[0] not in self.batch or shape[1] != -1:
                self.refuse(node, "a reshape other than x to (B, n) (x.view(x.shape[0], -1), x.flatten(1), ...)")
            self.flatten(node)
        elif target == "flatten":
            self.flatten_to_matrix(node, self.step(node))
        elif target == "expand" and node.args[0] in self.cond:
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = tuple(sizes[0])
            if node.kwargs or len(sizes) != 2 or sizes[0] not in self.batch or not isinstance(sizes[1], int):
                self.refuse(node, "a conditioning input's expand other than c.expand(x.shape[0], k)")
            self.cond[node] = (self.cond[node.args[0]][0], True)
            self.derive(node, self.derived[node.args[0]])  # a row broadcasts where the value is used
        elif target in ("add", "add_"):
            self.residual(node, *self.summands(node))
        else:
            self.unsupported(node, "method")

    def flatten_to_matrix(self, node, a):
        if (a.get("start_dim", 0), a.get("end_dim", -1)) != (1, -1):
            self.refuse(node, "a reshape other than x to (B, n) (x.view(x.shape[0], -1), x.flatten(1), ...)")
        self.flatten(node)


def _read(model, n_inputs) -> Plan:
    """Trace the model and lower its graph to a Plan (raises NotLowerable)."""
    return _Reader(model, _trace(model, n_inputs)).read()
