"""Modules: the MLP builder, and the parser that turns a plain nn.Sequential into the op's
arguments (weights, biases, activation codes and parameters)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from . import activations as act
from .activations import SmoothLeakyReLU

__all__ = ["MLP", "SmoothLeakyReLU", "MLPSpec", "parse_model"]


@dataclass
class MLPSpec:
    """What the ops need to know about an MLP. weights[i] is (n_{i+1}, n_i)."""

    weights: list
    biases: list
    activations: list
    act_params: list

    @property
    def widths(self) -> list:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]


def _flatten(model: nn.Module):
    if isinstance(model, nn.Sequential):
        # _modules, not named_children(): a module used twice must be seen twice.
        for name, child in model._modules.items():
            for path, module in _flatten(child):
                yield (f"{name}.{path}" if path else name), module
    else:
        yield "", model


def _where(path, position, module):
    """How the errors name a module (built only for an error: parse_model runs every step)."""
    return f"module {path!r} (position {position}, {type(module).__name__})"


def parse_model(model: nn.Module) -> MLPSpec:
    """Read an nn.Sequential (nested ones too) of nn.Linear and supported activations.

    Each activation applies to the Linear before it; a Linear without one is linear. Raises a
    TypeError naming the module and its position for anything else."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"jacext needs an nn.Sequential of nn.Linear and activations (or jacext.MLP), "
                        f"got {type(model).__name__}; method='autograd' handles any module")
    weights, biases, codes, params = [], [], [], []
    has_activation = []
    for position, (path, module) in enumerate(_flatten(model)):
        if isinstance(module, nn.Linear):
            weights.append(module.weight)
            biases.append(module.bias)
            codes.append(act.IDENTITY)
            params += [0.0, 0.0]
            has_activation.append(False)
            continue
        parsed = act.from_module(module)
        if parsed is None:
            raise TypeError(f"jacext: unsupported {_where(path, position, module)}; supported are nn.Linear and "
                            f"{sorted(act.NAMES)} activation modules (method='autograd' handles any module)")
        code, p0, p1 = parsed
        if code == act.IDENTITY:
            continue
        if not weights:
            raise TypeError(f"jacext: {_where(path, position, module)} comes before the first nn.Linear")
        if has_activation[-1]:
            raise TypeError(f"jacext: {_where(path, position, module)} follows another activation; one "
                            "activation per Linear is supported")
        codes[-1] = code
        params[-2:] = [p0, p1]
        has_activation[-1] = True
    if not weights:
        raise TypeError("jacext: the model has no nn.Linear layer")
    return MLPSpec(weights, biases, codes, params)


class MLP(nn.Sequential):
    """An nn.Sequential of Linear layers with one activation after every hidden layer.

    >>> MLP([784, 256, 10], activation="tanh")      # Linear, Tanh, Linear
    """

    def __init__(self, sizes: Sequence[int], activation: Union[str, nn.Module] = "tanh",
                 bias: bool = True, output_activation: Optional[Union[str, nn.Module]] = None):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {list(sizes)}")
        if any(int(n) < 1 for n in sizes):
            raise ValueError(f"MLP sizes must be positive, got {list(sizes)}")

        def make(a):
            return act.make_module(a) if isinstance(a, str) else copy.deepcopy(a)

        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(int(n_in), int(n_out), bias=bias))
            last = i == len(sizes) - 2
            if not last:
                layers.append(make(activation))
            elif output_activation is not None:
                layers.append(make(output_activation))
        super().__init__(*layers)
        parse_model(self)  # fail now, not at the first call, on an unsupported activation

    def __getitem__(self, idx):
        # nn.Sequential slices by calling the class with an OrderedDict, which MLP's constructor
        # does not take: a slice is a plain nn.Sequential of the same modules.
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)
