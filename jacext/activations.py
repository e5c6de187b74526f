"""The activation table on the Python side: codes shared with csrc/activations.h, module
parsing, and sigma / sigma' as differentiable torch formulas (autograd derives sigma'' and
sigma''' from them for the reference and for the double backward)."""
from __future__ import annotations

import math

import torch
from torch import nn

IDENTITY, RELU, LEAKY_RELU, TANH, SIGMOID, SOFTPLUS, ELU, GELU, GELU_TANH, SILU, SMOOTH_LEAKY_RELU = range(11)

NAMES = {
    "identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "tanh": TANH,
    "sigmoid": SIGMOID, "softplus": SOFTPLUS, "elu": ELU, "gelu": GELU, "gelu_tanh": GELU_TANH,
    "silu": SILU, "smooth_leaky_relu": SMOOTH_LEAKY_RELU,
}


class SmoothLeakyReLU(nn.Module):
    """``alpha * y + (1 - alpha) * log(1 + e^y)``: smooth, strictly increasing for alpha > 0."""

    def __init__(self, alpha: float = 0.3):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return activation_value(y, SMOOTH_LEAKY_RELU, self.alpha, 0.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def from_module(module: nn.Module):
    """(code, p0, p1) for a supported activation module, or None if it is not one."""
    if isinstance(module, nn.Identity):
        return IDENTITY, 0.0, 0.0
    if isinstance(module, nn.ReLU):
        return RELU, 0.0, 0.0
    if isinstance(module, nn.LeakyReLU):
        return LEAKY_RELU, float(module.negative_slope), 0.0
    if isinstance(module, nn.Tanh):
        return TANH, 0.0, 0.0
    if isinstance(module, nn.Sigmoid):
        return SIGMOID, 0.0, 0.0
    if isinstance(module, nn.Softplus):
        return SOFTPLUS, float(module.beta), float(module.threshold)
    if isinstance(module, nn.ELU):
        return ELU, float(module.alpha), 0.0
    if isinstance(module, nn.GELU):
        return (GELU_TANH if module.approximate == "tanh" else GELU), 0.0, 0.0
    if isinstance(module, nn.SiLU):
        return SILU, 0.0, 0.0
    if isinstance(module, SmoothLeakyReLU):
        return SMOOTH_LEAKY_RELU, module.alpha, 0.0
    return None


def make_module(name: str, **params) -> nn.Module:
    """The module for an activation name, e.g. make_module("leaky_relu", negative_slope=0.1)."""
    factories = {
        "identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU,
        "gelu_tanh": lambda **p: nn.GELU(approximate="tanh", **p), "silu": nn.SiLU,
        "smooth_leaky_relu": SmoothLeakyReLU,
    }
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(factories)}")
    return factories[name](**params)


def activation_value(y: torch.Tensor, code: int, p0: float, p1: float) -> torch.Tensor:
    """sigma(y), matching torch's own modules (and csrc/activations.h)."""
    if code == IDENTITY:
        return y
    if code == RELU:
        return torch.relu(y)
    if code == LEAKY_RELU:
        return torch.where(y > 0, y, p0 * y)
    if code == TANH:
        return torch.tanh(y)
    if code == SIGMOID:
        return torch.sigmoid(y)
    if code == SOFTPLUS:
        return torch.nn.functional.softplus(y, beta=p0, threshold=p1)
    if code == ELU:
        return torch.nn.functional.elu(y, alpha=p0)
    if code == GELU:
        return torch.nn.functional.gelu(y)
    if code == GELU_TANH:
        return torch.nn.functional.gelu(y, approximate="tanh")
    if code == SILU:
        return torch.nn.functional.silu(y)
    if code == SMOOTH_LEAKY_RELU:
        return p0 * y + (1 - p0) * torch.nn.functional.softplus(y)
    raise ValueError(f"unknown activation code {code}")


def activation_derivative(y: torch.Tensor, code: int, p0: float, p1: float) -> torch.Tensor:
    """sigma'(y) written with differentiable torch ops, so that autograd yields sigma''."""
    one = torch.ones_like(y)
    if code == IDENTITY:
        return one
    if code == RELU:
        return (y > 0).to(y.dtype)
    if code == LEAKY_RELU:
        return torch.where(y > 0, one, p0 * one)
    if code == TANH:
        return 1 - torch.tanh(y) ** 2
    if code == SIGMOID:
        s = torch.sigmoid(y)
        return s * (1 - s)
    if code == SOFTPLUS:
        return torch.where(p0 * y > p1, one, torch.sigmoid(p0 * y))
    if code == ELU:
        return torch.where(y > 0, one, p0 * torch.exp(torch.clamp(y, max=0)))
    if code == GELU:
        return 0.5 * (1 + torch.erf(y / math.sqrt(2))) + y * torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)
    if code == GELU_TANH:
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k * (y + c * y ** 3))
        return 0.5 * (1 + t) + 0.5 * y * (1 - t * t) * k * (1 + 3 * c * y * y)
    if code == SILU:
        s = torch.sigmoid(y)
        return s * (1 + y * (1 - s))
    if code == SMOOTH_LEAKY_RELU:
        return p0 + (1 - p0) * torch.sigmoid(y)
    raise ValueError(f"unknown activation code {code}")


def activation_second_derivative(y: torch.Tensor, code: int, p0: float, p1: float) -> torch.Tensor:
    """sigma''(y) in closed form (csrc/activations.h's d2), written with differentiable torch ops:
    the Laplacian's reference and double backward differentiate it (autograd yields sigma''')."""
    zero = torch.zeros_like(y)
    if code in (IDENTITY, RELU, LEAKY_RELU):
        return zero
    if code == TANH:
        t = torch.tanh(y)
        return -2 * t * (1 - t * t)
    if code == SIGMOID:
        s = torch.sigmoid(y)
        return s * (1 - s) * (1 - 2 * s)
    if code == SOFTPLUS:
        s = torch.sigmoid(p0 * y)
        return torch.where(p0 * y > p1, zero, p0 * s * (1 - s))
    if code == ELU:
        return torch.where(y > 0, zero, p0 * torch.exp(torch.clamp(y, max=0)))
    if code == GELU:
        return torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi) * (2 - y * y)
    if code == GELU_TANH:
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k * (y + c * y ** 3))
        du, ddu = k * (1 + 3 * c * y * y), 6 * k * c * y
        return (1 - t * t) * (du + 0.5 * y * (ddu - 2 * t * du * du))
    if code == SILU:
        s = torch.sigmoid(y)
        return s * (1 - s) * (2 + y * (1 - 2 * s))
    if code == SMOOTH_LEAKY_RELU:
        s = torch.sigmoid(y)
        return (1 - p0) * s * (1 - s)
    raise ValueError(f"unknown activation code {code}")
