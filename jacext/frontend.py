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

__all__ = ["lower", "Lowered", "NotLowerable", "MLPSpec", "parse_model"]

SUPPORTED = ("nn.Linear / F.linear, the activations " + ", ".join(sorted(act.NAMES))
             + " (modules or functions), nn.Identity, nn.Flatten / flatten / view / reshape of the input to "
             "(B, n), nn.Dropout and nn.BatchNorm1d in eval(), residual skips h + g(h) (for the Laplacian, "
             "the divergence and the Jacobian diagonal)")

# The quantities that take residual skips: those on the forward-carry ops (csrc/mlp_laplacian.h).
SKIP_QUANTITIES = "the Laplacian, the divergence and the Jacobian diagonal (without wrt)"


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
    """What the ops need to know about an MLP. weights[i] is (n_{i+1}, n_i). residual: None without
    a skip, else per layer i -1 or the j <= i whose input is added to layer i's output (h + g(h);
    the forward-carry ops' `residual`)."""

    weights: list
    biases: list
    activations: list
    act_params: list
    residual: Optional[list] = None

    @property
    def widths(self) -> list:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]


def parse_model(model: nn.Module, *, skips: bool = False) -> MLPSpec:
    """The engine's MLPSpec of a model (lower's spec): nn.Linear and supported
    activations, Flatten of the input, Dropout and BatchNorm1d in eval(), the user's own modules
    made of these; residual skips with skips=True. Raises NotLowerable (a TypeError) naming the
    node that does not lower."""
    return lower(model, skips=skips).spec


@dataclass(frozen=True)
class Layer:
    """One Linear of the plan: the qualified names (split at the dots) of its weight and bias
    (None: F.linear without a bias; an nn.Linear's bias is read, None or not), of the BatchNorm1d
    modules folded into its input side (in the order the model applies them) and into its output
    side, its activation, and residual: None, or the index j of the Linear whose input is added
    to this layer's output (a skip h + g(h), j <= this layer's index). Per-sample factors beside
    the activation (masks, gates) and a per-sample bias (conditioning) would be more fields of
    the same form."""

    weight: tuple
    bias: Optional[tuple]
    before: tuple
    after: tuple
    activation: int
    act_params: tuple
    residual: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    """skip: (path, op, where) of the first residual sum, None without one."""

    layers: tuple
    flatten_input: bool
    skip: Optional[tuple] = None


@dataclass(frozen=True)
class Lowered:
    """What the engine needs for one call. spec holds the current parameters (derived tensors
    where BatchNorm is folded); flatten_input: the model flattens x to (B, n) before its first
    Linear (the Jacobian is with respect to the flattened input); input_shape: x's per-sample
    shape when the model flattens it and lower() was given x, else None."""

    spec: MLPSpec
    flatten_input: bool
    input_shape: Optional[tuple] = None

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """x as the (B, n) matrix the engine takes."""
        return x.flatten(1) if self.flatten_input else x

    @property
    def residual(self) -> Optional[list]:
        return self.spec.residual


def lower(model: nn.Module, x: Optional[torch.Tensor] = None, *cond, skips: bool = False) -> Lowered:
    """The model lowered to the engine for a call model(x, *cond); raises NotLowerable (a
    TypeError) naming the node that does not lower. With x, also checks x's shape against the
    model's first Linear (TypeError / ValueError). skips: whether the caller runs residual skips
    (the forward-carry quantities); without, a model with a skip does not lower (the skip node
    named), so that no quantity drops one silently."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"jacext needs an nn.Module, got {type(model).__name__}")
    plan = _plan(model, 1 + len(cond))
    if plan.skip is not None and not skips:
        raise _not_lowerable(*plan.skip, f"a residual skip (h + g(h)) runs on the engine for {SKIP_QUANTITIES} only")
    spec = _build(model, plan)
    input_shape = None
    if x is not None:
        _check_input(x, spec.widths[0], plan.flatten_input)
        input_shape = tuple(x.shape[1:]) if plan.flatten_input else None
    return Lowered(spec, plan.flatten_input, input_shape)


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
    return MLPSpec(weights, biases, codes, params, residual)


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
        self.current = None       # the chain's value
        self.inputs = {}          # chain node -> the value it took
        self.kept = set()         # chain nodes whose value is their input's (Identity, Dropout in eval())
        self.carries = {}         # value -> k: it entered the k-th Linear (the engine's carry C_k)
        self.skip = None          # the first residual sum's (path, op, where)

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
    def chain(self, node, value):
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
        self.layer = dict(weight=weight, bias=bias, before=tuple(_parts(n.target) for n in self.pending), after=[],
                          activation=act.IDENTITY, act_params=(0.0, 0.0), residual=None)
        self.pending = []
        self.started = True

    def residual(self, node, a, b):
        """h + g(h) or g(h) + h: the chain's value plus a value that entered an earlier (or this
        block's own) Linear ends a residual block: the engine adds carry C_j to this layer's output."""
        if self.current not in (a, b) or a is b:
            self.refuse(node, "a sum that is not h + g(h) (the chain's value plus a block's input)")
        other = b if a is self.current else a
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

    def activation(self, node, code, p0=0.0, p1=0.0):
        if code == act.IDENTITY:
            self.kept.add(node)
            return
        if self.layer is None:
            self.refuse(node, "an activation before the first nn.Linear")
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
        if self.layer is None or self.layer["activation"] != act.IDENTITY or self.layer["residual"] is not None:
            self.pending.append(node)
        else:
            self.layer["after"].append(_parts(node.target))
        self.started = True

    def dropout(self, node, p, training):
        if training and p > 0:
            self.refuse(node, "Dropout in train() (the generic path draws its masks)")
        self.kept.add(node)

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
        for extra in placeholders[1:]:
            users = [u for u in extra.users if u.target is not fx._symbolic_trace._assert_is_none]
            if users:
                self.refuse(users[0], "conditioning inputs run on the generic path")
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
            elif node.op == "output":
                self.output(node)
        return Plan(tuple(self.layers), self.flatten_input, self.skip)

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
        self.chain(node, node.args[0])
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            path = _parts(node.target)
            self.linear(node, path + ("weight",), path + ("bias",))
        elif act.from_module(m) is not None:
            self.activation(node, *act.from_module(m))
        elif isinstance(m, nn.modules.dropout._DropoutNd):
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
        elif target in (operator.add, operator.iadd, torch.add):
            self.residual(node, *self.summands(node))
        else:
            self.refuse(node, f"unsupported function; the engine runs {SUPPORTED}")

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
        elif target in ("add", "add_"):
            self.residual(node, *self.summands(node))
        else:
            self.refuse(node, f"unsupported method; the engine runs {SUPPORTED}")

    def flatten_to_matrix(self, node, a):
        if (a.get("start_dim", 0), a.get("end_dim", -1)) != (1, -1):
            self.refuse(node, "a reshape other than x to (B, n) (x.view(x.shape[0], -1), x.flatten(1), ...)")
        self.flatten(node)


def _read(model, n_inputs) -> Plan:
    """Trace the model and lower its graph to a Plan (raises NotLowerable)."""
    return _Reader(model, _trace(model, n_inputs)).read()
