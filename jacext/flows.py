"""MLP normalizing flows with exact log|det J| and relative-gradient training (Gresele et al.
2020, "Relative gradient optimization of the Jacobian term in unsupervised deep learning").

A flow z = f(x) is a square MLP, smooth_leaky_relu(alpha) between the layers and a linear last
layer, with a standard Gaussian base. Per sample

    log p(x) = log N(z; 0, I) + sum_k sum_i log act'(y_k,i) + sum_k log|det W_k|,

the middle sum from the fused forward (csrc/mlp_flow.h), the last once per call from the
parameters. Maximum-likelihood training needs the gradient of log|det W_k|, which is W_k^-T: an
inverse per layer and step, O(D^3). The relative gradient right-multiplies each (bias-augmented)
layer's gradient by W~^T W~; it turns W_k^-T into W_k and the data term into O(B D^2) GEMMs, so
that a training step forms no inverse and no determinant. It is an ascent direction for the
likelihood (W~^T W~ is positive definite), not the gradient: `nll(x, relative_gradient=True)`
says so explicitly, and `nll(x)` keeps the ordinary gradient for comparison.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import ops as _ops
from ._flow_ops import flow_grads, save_flow
from .activations import SMOOTH_LEAKY_RELU, SmoothLeakyReLU, activation_derivative, activation_value
from .nn import parse_model

__all__ = ["MLPFlow"]

LOG_2PI = math.log(2 * math.pi)


def _eager_autograd(x):
    """Whether _MeanNLL (a plain autograd.Function) may stand in for the registered op's autograd:
    grad mode in eager, no torch.func transform, no autocast (those keep the registered autograd)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and not torch.is_autocast_enabled(x.device.type))


class MLPFlow(nn.Module):
    """A square MLP flow on R^dim: n_layers Linear(dim, dim) layers with smooth_leaky_relu(alpha)
    between them and none after the last. Weights start orthogonal, biases at zero (as the
    paper's code). `flow.net` is the plain nn.Sequential (jacext's other functions take it)."""

    def __init__(self, dim: int, n_layers: int, alpha: float = 0.3, bias: bool = True):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1 and isinstance(n_layers, int) and n_layers >= 1):
            raise ValueError(f"dim and n_layers must be positive integers, got {dim!r} and {n_layers!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1) (the activation's slopes lie in (alpha, 1)), got {alpha}")
        self.dim, self.alpha = dim, float(alpha)
        modules = []
        for k in range(n_layers):
            linear = nn.Linear(dim, dim, bias=bias)
            nn.init.orthogonal_(linear.weight)
            if bias:
                nn.init.zeros_(linear.bias)
            modules.append(linear)
            if k < n_layers - 1:
                modules.append(SmoothLeakyReLU(alpha))
        self.net = nn.Sequential(*modules)

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (batch, {self.dim}), got {shape}")

    @_ops.explained_functorch_errors
    def _fused(self, x, relative_gradient, logdet_value=True):
        """(z, sum log act' per sample, sum_k log|det W_k|) from the fused op (csrc/mlp_flow.h)."""
        self._check(x)
        _ops.warn_if_tf32(x.device, x.dtype)
        spec = parse_model(self.net)
        z, log_dact, logabsdet, _ = torch.ops.jacext.mlp_flow(
            x, spec.weights, _ops.bias_tensors(spec.biases, spec.weights), spec.activations, spec.act_params,
            relative_gradient, logdet_value)
        return z, log_dact, logabsdet

    @_ops.explained_functorch_errors
    def _fused_nll(self, x, relative_gradient, logdet_value):
        """The mean NLL through _MeanNLL: one autograd node whose backward seeds the op's with the NLL's
        gradient (csrc/mlp_flow.h, grad_nll)."""
        self._check(x)
        _ops.warn_if_tf32(x.device, x.dtype)
        spec = parse_model(self.net)
        config = (spec.activations, spec.act_params, relative_gradient, logdet_value,
                  [b is not None for b in spec.biases])
        return _MeanNLL.apply(x, config, *_flat_params(spec.weights, _ops.bias_tensors(spec.biases, spec.weights)))

    def weights(self):
        return [m.weight for m in self.net if isinstance(m, nn.Linear)]

    def biases(self):
        return [m.bias for m in self.net if isinstance(m, nn.Linear)]

    def log_abs_det_weights(self) -> torch.Tensor:
        """sum_k log|det W_k| (one LU per layer), differentiable (gradient W_k^-T)."""
        return sum(torch.linalg.slogdet(w)[1] for w in self.weights())

    def forward(self, x: torch.Tensor):
        """(z, logdet): z = f(x) and logdet[b] = log|det df/dx| at x_b, exact; differentiable
        (the ordinary gradient)."""
        z, log_dact, logabsdet = self._fused(x, False)
        return z, log_dact + logabsdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per sample (B,), exact; differentiable (the ordinary gradient)."""
        z, logdet = self(x)
        return -0.5 * (z.square().sum(1) + self.dim * LOG_2PI) + logdet

    def nll(self, x: torch.Tensor, relative_gradient: bool = False, logdet_value: bool = True) -> torch.Tensor:
        """The mean negative log-likelihood over the batch, a scalar.

        relative_gradient=False: its backward gives the ordinary gradient (for the log|det W_k|
        term W_k^-T, an inverse per layer). relative_gradient=True: its backward writes the
        relative gradient of the same loss into every weight's and bias's .grad, with O(B D^2)
        work and no inverse (an Adam or SGD step on it is the paper's relative-gradient step);
        other terms added to the loss keep their ordinary gradients. The gradient w.r.t. x is
        the ordinary one in both cases.

        logdet_value=False leaves sum_k log|det W_k| out of the returned *value* (it costs an
        LU per layer, O(D^3)); the gradient is the same. Evaluate with log_prob."""
        if _eager_autograd(x):
            return self._fused_nll(x, relative_gradient, logdet_value)
        # torch.func (_MeanNLL has no vmap rule), autocast (the op's rule casts before its autograd
        # saves), compile or no grad: the registered op and the loss in torch ops
        return _mean_nll(*self._fused(x, relative_gradient, logdet_value))

    def _activation_inverse(self, t, tol, max_iter):
        """y with smooth_leaky_relu(y) = t, by Newton's method: the activation is increasing and
        convex with slope in (alpha, 1), so from the second step on the iterates decrease
        monotonically to the root."""
        a = self.alpha
        y = torch.where(t >= 0, t, t / a)
        for _ in range(max_iter):
            residual = activation_value(y, SMOOTH_LEAKY_RELU, a, 0.0) - t
            if residual.abs().max() <= tol * (1 + t.abs().max()):
                return y
            y = y - residual / activation_derivative(y, SMOOTH_LEAKY_RELU, a, 0.0)
        worst = (activation_value(y, SMOOTH_LEAKY_RELU, a, 0.0) - t).abs().max().item()
        raise RuntimeError(f"inverting the activation did not converge in {max_iter} Newton steps "
                           f"(largest residual {worst:.3g}, tolerance {tol:.3g})")

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, tol: Optional[float] = None, max_iter: int = 100) -> torch.Tensor:
        """x = f^-1(z): a linear solve per layer and Newton's method on each activation, each
        solved to |act(y) - t| <= tol * (1 + max|t|) (default 1e-12 in float64, 1e-5 in float32);
        raises if Newton does not converge in max_iter steps."""
        self._check(z)
        if tol is None:
            tol = 1e-12 if z.dtype == torch.float64 else 1e-5
        h = z
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for k, linear in reversed(list(enumerate(linears))):
            if k < len(linears) - 1:
                h = self._activation_inverse(h, tol, max_iter)
            if linear.bias is not None:
                h = h - linear.bias
            h = torch.linalg.solve(linear.weight, h.T).T
        return h

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n samples x = f^-1(z), z ~ N(0, I)."""
        weight = self.weights()[0]
        z = torch.randn(n, self.dim, generator=generator, dtype=weight.dtype, device="cpu").to(weight.device)
        return self.inverse(z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, alpha={self.alpha}"


# _MeanNLL, an autograd.Function, takes tensors as flat inputs (and returns one gradient per
# input): the weights, then the biases present; _flat_params and _op_params convert between that
# and the op's lists (_ops.bias_tensors), _present_grads the biases' gradients back.
def _flat_params(weights, biases):
    return [*weights, *(b for b in biases if b.numel() > 0)]


def _op_params(params, bias_present):
    weights, present = list(params[:len(bias_present)]), iter(params[len(bias_present):])
    return weights, [next(present) if p else w.new_empty(0) for p, w in zip(bias_present, weights)]


def _present_grads(grad_b, bias_present):
    return [g for g, present in zip(grad_b, bias_present) if present]


def _mean_nll(z, log_dact, logabsdet):
    squares = torch.linalg.vector_norm(z, dim=1).square()  # |z_b|^2 without a (B, D) temporary
    return (0.5 * (squares + z.shape[1] * LOG_2PI) - log_dact).mean() - logabsdet


class _MeanNLL(torch.autograd.Function):
    """MLPFlow.nll as one autograd node over the fused op, instead of the op's generated autograd
    wrapper (torch.library's, which flattens the tensor lists on every call) and a seven-node loss
    graph: at D = 784, B = 10 that took a fifth of the step off (docs/benchmarks.md, flows).
    Its backward hands the NLL's gradient to the op's backward as grad_nll, which seeds it inside
    and saves the last layer's [Y; delta] product."""

    @staticmethod
    def forward(ctx, x, config, *params):
        activations, act_params, relative_gradient, logdet_value, bias_present = config
        weights, biases = _op_params(params, bias_present)
        z, log_dact, logabsdet, saved = torch.ops.jacext.mlp_flow(
            x, weights, biases, activations, act_params, relative_gradient, logdet_value)
        save_flow(ctx, x, weights, biases, activations, act_params, relative_gradient, saved)
        return _mean_nll(z, log_dact, logabsdet)

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w, grad_b = flow_grads(ctx, None, None, None, grad_nll=grad)
        return (grad_x, None, *grad_w, *_present_grads(grad_b, ctx.bias_present))
