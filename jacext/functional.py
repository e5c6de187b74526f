"""The model-level API: pass an nn.Sequential (or jacext.MLP) and a batch."""
from __future__ import annotations

import torch

from . import _ops
from .planner import resolve_strategy
from .nn import parse_model
from .reference import jacobian_frobenius_ref

__all__ = ["jacobian_frobenius", "jacobian", "jacobian_gram", "METHODS"]

METHODS = ("auto", "reverse", "forward", "autograd")


def _check_input(spec, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, {spec.widths[0]}), got {tuple(x.shape)}")
    if x.shape[1] != spec.widths[0]:
        raise ValueError(f"x has {x.shape[1]} features but the model's first Linear expects {spec.widths[0]}")


def jacobian_frobenius(model, x: torch.Tensor, method: str = "auto", n_proj: int = 1, generator=None):
    """(y, sq): y == model(x) (B, m) and sq[b] = ||dy_b/dx_b||_F^2 (B,), exact.

    method: "auto" (reverse or forward, whichever needs fewer multiply-adds), "reverse" (carry
    the m output rows back; end with the Gram epilogue instead of forming J when cheaper),
    "forward" (carry the n_0 input columns forward), or "autograd" (torch.func vmap(jacrev):
    any module, slow). Differentiable twice w.r.t. x and the parameters."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if n_proj != 1 or generator is not None:
        raise ValueError("n_proj and generator apply to a random estimator; the methods here are exact")
    if method == "autograd":
        return jacobian_frobenius_ref(model, x)
    spec = parse_model(model)
    _check_input(spec, x)
    strategy = resolve_strategy(method, spec.widths, batch=x.shape[0])
    y, sq, _ = torch.ops.jacext.mlp_jacobian_frobenius(
        x, spec.weights, _ops.bias_tensors(spec.biases, spec.weights), spec.activations,
        spec.act_params, strategy)
    return y, sq


def jacobian(model, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """J (B, m, n_layer): J[b] = d model(x)_b / d h_layer,b, where h_0 = x and h_l is the output
    of the l-th Linear's activation. Differentiable twice."""
    spec = parse_model(model)
    _check_input(spec, x)
    n_layers = len(spec.weights)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers - 1}] for a model with {n_layers} Linear layers, got {layer}")
    strategy = resolve_strategy("auto", spec.widths, layer, frobenius=False, batch=x.shape[0])
    _, jac, _ = torch.ops.jacext.mlp_jacobian(
        x, spec.weights, _ops.bias_tensors(spec.biases, spec.weights), spec.activations,
        spec.act_params, layer, strategy)
    return jac


def jacobian_gram(model, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """G (B, m, m) = J J^T with J = jacobian(model, x, layer)."""
    jac = jacobian(model, x, layer)
    return jac @ jac.transpose(1, 2)
