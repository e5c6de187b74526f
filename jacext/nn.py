"""Modules: the MLP builder (MLPSpec and parse_model, the engine's reading of a model, live in
frontend.py and are exported here too)."""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

from torch import nn

from . import activations as act
from .activations import SmoothLeakyReLU
from .frontend import MLPSpec, parse_model

__all__ = ["MLP", "SmoothLeakyReLU", "MLPSpec", "parse_model"]


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
