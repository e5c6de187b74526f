"""Input checks shared by the quantities: what x must be for the model the engine read, the
square-net requirement of the divergence and the Jacobian diagonal, the residual skips of the
ops, and the layers a quantity at a hidden layer takes in a residual net."""
from __future__ import annotations

import torch

__all__ = ["check_block_boundary", "check_input", "check_residual", "check_square", "check_weights"]


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


def check_weights(spec, x):
    """The ops' own dtype and device check, for code that runs the MLP in torch ops (autocast casts
    every dtype, so only the device is checked under it)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    for i, w in enumerate(spec.weights):
        if w.device != x.device or (w.dtype != x.dtype and not autocast):
            raise RuntimeError(f"jacext: weight {i} has dtype {w.dtype} on {w.device} but x has {x.dtype} "
                               f"on {x.device}")


def check_residual(residual, widths):
    """The forward-carry ops' `residual` (per layer i: -1, or the j <= i whose input carry is added
    to layer i's output) checked against widths [n_0, ..., n_L]; None when there is no skip (None,
    or every entry -1), else a list of ints."""
    if residual is None:
        return None
    residual = [int(j) for j in residual]
    depth = len(widths) - 1
    if len(residual) != depth:
        raise ValueError(f"residual must have one entry per layer ({depth}; -1 for a layer without a skip), "
                         f"got {len(residual)}")
    for i, j in enumerate(residual):
        if not -1 <= j <= i:
            raise ValueError(f"residual[{i}] must be -1 (no skip) or the index j <= {i} of the layer whose input is "
                             f"added to layer {i}'s output, got {j}")
        if j >= 0 and widths[j] != widths[i + 1]:
            raise ValueError(f"residual[{i}] = {j} adds the input of layer {j} (width {widths[j]}) to the output of "
                             f"layer {i} (width {widths[i + 1]}): the widths must match")
    return residual if any(j >= 0 for j in residual) else None


def check_block_boundary(residual, layer: int, quantity: str):
    """A ValueError when a residual skip crosses `layer` (residual[i] = j with j < layer <= i): h_layer
    is then inside a block, and the output depends on the block's input besides h_layer, so the
    quantity's "Jacobian at h_layer" would hold that input fixed. Layers at block boundaries (a
    block's input or output) and every layer of a net without skips pass."""
    if residual is None:
        return
    crossing = [(i, j) for i, j in enumerate(residual) if 0 <= j < layer <= i]
    if crossing:
        i, j = crossing[0]
        raise ValueError(f"{quantity} at layer {layer}: h_{layer} is inside a residual block (layer {i}'s output "
                         f"adds h_{j}, the input of layer {j}), so the output depends on h_{j} besides h_{layer}; "
                         "take it at the block's input or output (a layer no skip crosses)")
