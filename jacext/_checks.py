"""Input checks shared by the quantities: what x must be for the model the engine read, and the
square-net requirement of the divergence and the Jacobian diagonal."""
from __future__ import annotations

import torch

__all__ = ["check_input", "check_square"]


def check_input(spec, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, {spec.widths[0]}), got {tuple(x.shape)}")
    if x.shape[1] != spec.widths[0]:
        raise ValueError(f"x has {x.shape[1]} features but the model's first Linear expects {spec.widths[0]}")


def check_square(widths):
    """widths: [n_0, ..., n_L] (MLPSpec.widths)."""
    if widths[-1] != widths[0]:
        raise ValueError(f"the divergence and the Jacobian diagonal need a square net (as many outputs as inputs); "
                         f"the model maps {widths[0]} features to {widths[-1]}")
