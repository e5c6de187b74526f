"""Target propagation: per-layer targets and training by local losses.

Notation: h_0 = x, h_l = act_l(W_l h_{l-1} + b_l) for l = 1..L (the l-th Linear with the
activation after it), h_L the output. Given a target for the output, each method gives a target
for every layer, and each layer then regresses its own output onto its target with its input
held fixed (a local loss; no gradient crosses layers).

- "dtp", difference target propagation: t_l = h_l - g_{l+1}(h_{l+1}) + g_{l+1}(t_{l+1}), g_{l+1}
  an inverse of layer l+1. For a linear layer the exact one, g(h) = W^+ (h - b), gives
  t_l = h_l + W_{l+1}^+ (t_{l+1} - h_{l+1}); a nonlinear layer needs a learned inverse
  g(h) = act(V h + c) (InverseLayer), trained to reconstruct noise-corrupted inputs.
- "gn", Gauss-Newton targets: t_l = h_l + J_l^+ (t_L - h_L), J_l = dh_L/dh_l per sample (all
  layers' Jacobians from one jacext reverse sweep), with the damped pseudo-inverse
  J^+ = J^T (J J^T + damping I)^-1 (the exact one at damping = 0 when J has full row rank).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as _ops
from .activations import IDENTITY, NAMES, activation_value, make_module
from .nn import parse_model

__all__ = ["layer_targets", "layer_outputs", "InverseLayer", "TargetPropTrainer", "METHODS"]

METHODS = ("dtp", "gn")


def _layer(spec, l, h):
    """Layer l (1-based) applied to h = h_{l-1}."""
    w, b = spec.weights[l - 1], spec.biases[l - 1]
    y = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    return activation_value(y, spec.activations[l - 1], *spec.act_params[2 * l - 2:2 * l])


def layer_outputs(model, x):
    """[h_0 = x, h_1, ..., h_L] of an MLP (nn.Sequential of Linear and activations)."""
    spec = parse_model(model)
    hs = [x]
    for l in range(1, len(spec.weights) + 1):
        hs.append(_layer(spec, l, hs[-1]))
    return hs


class InverseLayer(nn.Module):
    """A learned approximate inverse of one layer, h_{l-1} ~ act(V h_l + c): an nn.Linear from the
    layer's output width to its input width and an activation (by default the one producing
    h_{l-1}, so that the reconstruction lives in the same range)."""

    def __init__(self, n_out: int, n_in: int, activation: str = "tanh"):
        super().__init__()
        self.linear = nn.Linear(n_out, n_in)
        self.activation = make_module(activation)

    def forward(self, h):
        return self.activation(self.linear(h))


def _damped_pinv_apply(jac, rhs, damping):
    """J^T (J J^T + damping I)^-1 rhs per sample: jac (B, m, n), rhs (B, m) -> (B, n)."""
    gram = torch.bmm(jac, jac.transpose(1, 2))
    if damping:
        gram = gram + damping * torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    u = torch.linalg.solve(gram, rhs.unsqueeze(2))
    return torch.bmm(jac.transpose(1, 2), u).squeeze(2)


def layer_targets(model, x: torch.Tensor, output_target: torch.Tensor, method: str = "dtp",
                  inverses: Optional[Sequence[Optional[nn.Module]]] = None, damping: float = 0.0,
                  hs: Optional[list] = None):
    """[t_1, ..., t_L]: a target for every layer's output (t_L = output_target), without graph.

    method="dtp": inverses[l] (l = 1..L-1, index 0 unused) maps h_{l+1} back to h_l, i.e. it
    inverts layer l+1; None (or inverses=None) means the exact pseudo-inverse W_{l+1}^+ (h - b),
    allowed for linear layers only. method="gn": damped Gauss-Newton targets (module docstring).
    hs: the hidden states if already computed (layer_outputs(model, x))."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    spec = parse_model(model)
    L = len(spec.weights)
    with torch.no_grad():
        hs = layer_outputs(model, x) if hs is None else [h.detach() for h in hs]
        if output_target.shape != hs[-1].shape:
            raise ValueError(f"output_target must have the output's shape {tuple(hs[-1].shape)}, "
                             f"got {tuple(output_target.shape)}")
        targets = [None] * (L + 1)
        targets[L] = output_target.detach()
        if method == "gn":
            if not damping >= 0:
                raise ValueError(f"damping must be >= 0, got {damping}")
            if L > 1:
                _, jacs = _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                             layers=list(range(1, L)))
                delta = targets[L] - hs[L]
                for l, jac in zip(range(1, L), jacs):
                    targets[l] = hs[l] + _damped_pinv_apply(jac, delta, damping)
            return targets[1:]
        if inverses is not None and len(inverses) != L:
            raise ValueError(f"inverses must hold {L} entries (index l inverts layer l+1; index 0 unused), "
                             f"got {len(inverses)}")
        for l in range(L - 1, 0, -1):
            g = None if inverses is None else inverses[l]
            if g is None:
                if spec.activations[l] != IDENTITY:
                    raise ValueError(f"layer {l + 1} is nonlinear: its exact inverse is not a pseudo-inverse; "
                                     f"pass a learned inverse as inverses[{l}] (e.g. InverseLayer)")
                pinv = torch.linalg.pinv(spec.weights[l])
                targets[l] = hs[l] + (targets[l + 1] - hs[l + 1]) @ pinv.t()
            else:
                targets[l] = hs[l] - g(hs[l + 1]) + g(targets[l + 1])
        return targets[1:]


class TargetPropTrainer:
    """Trains an MLP by target propagation: per step, (dtp with learned inverses) one
    reconstruction step for every inverse on noise-corrupted inputs, then the output target
    t_L = h_L - output_step * dloss/dh_L, the targets of every layer (layer_targets), and one
    optimizer step on the sum of the local losses 0.5 * ||layer_l(h_{l-1}) - t_l||^2 (batch mean),
    h_{l-1} held fixed.

    inverses: "exact" (pseudo-inverses; linear layers only), "learned" (an InverseLayer per layer
    above the first, activation of the layer below), or None for method="gn". noise: standard
    deviation of the corruption for training the inverses, multiplied by noise_decay after every
    call to end_epoch()."""

    def __init__(self, model: nn.Module, method: str = "dtp", inverses: Optional[str] = None,
                 lr: float = 1e-3, inverse_lr: float = 1e-3, output_step: float = 0.5, damping: float = 1e-3,
                 noise: float = 0.1, noise_decay: float = 1.0, loss_fn: Callable = F.cross_entropy,
                 optimizer: Callable = torch.optim.Adam):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if inverses is None:
            inverses = "learned" if method == "dtp" else None
        if (method == "gn") != (inverses is None) or inverses not in (None, "exact", "learned"):
            raise ValueError("inverses must be 'exact' or 'learned' for method='dtp' and None for 'gn', "
                             f"got {inverses!r} with {method!r}")
        self.model, self.method, self.output_step, self.damping = model, method, output_step, damping
        self.noise, self.noise_decay, self.loss_fn = noise, noise_decay, loss_fn
        spec = parse_model(model)
        L = len(spec.weights)
        self.inverses = None
        if inverses == "learned":
            ref = spec.weights[0]
            names = {code: name for name, code in NAMES.items()}
            self.inverses = nn.ModuleList(
                [nn.Identity()] + [InverseLayer(spec.weights[l].shape[0], spec.weights[l].shape[1],
                                                names[spec.activations[l - 1]]).to(ref.device, ref.dtype)
                                   for l in range(1, L)])
            self.inverse_optimizer = optimizer(self.inverses.parameters(), lr=inverse_lr)
        elif inverses == "exact":
            self.inverses = [None] * L
        self.optimizer = optimizer(model.parameters(), lr=lr)

    def _train_inverses(self, hs):
        """One reconstruction step per learned inverse: g_{l}(layer_{l+1}(h_l + noise)) ~ h_l + noise."""
        spec = parse_model(self.model)
        total = 0.0
        self.inverse_optimizer.zero_grad()
        for l in range(1, len(spec.weights)):
            corrupted = hs[l].detach() + self.noise * torch.randn_like(hs[l])
            with torch.no_grad():
                above = _layer(spec, l + 1, corrupted)
            total = total + 0.5 * (self.inverses[l](above) - corrupted).square().sum(1).mean()
        total.backward()
        self.inverse_optimizer.step()
        return total.item()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One training step on a batch; returns the task loss, the local loss and (dtp with
        learned inverses) the reconstruction loss, measured before the step."""
        spec = parse_model(self.model)
        with torch.no_grad():
            hs = layer_outputs(self.model, x)
        stats = {}
        if isinstance(self.inverses, nn.ModuleList):
            stats["reconstruction"] = self._train_inverses(hs)
        output = hs[-1].detach().requires_grad_()
        loss = self.loss_fn(output, y)
        (grad,) = torch.autograd.grad(loss * len(x), output)  # per-sample gradients of the summed loss
        targets = layer_targets(self.model, x, output.detach() - self.output_step * grad, self.method,
                                self.inverses, self.damping, hs=hs)
        local = sum(0.5 * (_layer(spec, l, hs[l - 1]) - t).square().sum(1).mean()
                    for l, t in enumerate(targets, start=1))
        self.optimizer.zero_grad()
        local.backward()
        self.optimizer.step()
        stats.update(loss=loss.item(), local=local.item())
        return stats

    def end_epoch(self):
        self.noise *= self.noise_decay
