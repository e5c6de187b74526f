"""The model-level API: pass an nn.Sequential (or jacext.MLP) and a batch."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from . import _ops
from .nn import parse_model
from .reference import jacobian_frobenius_ref

__all__ = ["jacobian_frobenius", "JacobianFrobenius", "jacobian", "Jacobian", "jacobian_gram", "JacobianGram",
           "random_projections", "METHODS"]

METHODS = ("auto", "reverse", "forward", "gram", "hutchinson", "autograd")
DISTRIBUTIONS = ("rademacher", "gaussian")


def _check_input(spec, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, {spec.widths[0]}), got {tuple(x.shape)}")
    if x.shape[1] != spec.widths[0]:
        raise ValueError(f"x has {x.shape[1]} features but the model's first Linear expects {spec.widths[0]}")


def jacobian_frobenius(model, x: torch.Tensor, method: str = "auto", n_proj: int = 1, generator=None, *,
                       distribution: str = "rademacher", orthogonal: bool = False,
                       return_variance: bool = False, max_memory=None):
    """(y, sq): y == model(x) (B, m) and sq[b] = ||dy_b/dx_b||_F^2 (B,).

    method: "auto" (the exact strategy with the fewest multiply-adds), "reverse" (carry the m
    output rows back; end with the Gram epilogue instead of forming J when cheaper), "forward"
    (carry the n_0 input columns forward; end with the mirror Gram epilogue when cheaper), "gram"
    (one hidden layer and a linear output: d^T M d with M = (W_1 W_1^T) .* (W_2^T W_2) shared by
    the batch; deeper nets: the cheapest Gram epilogue, or J = A C split at the hidden layer where
    sum((A^T A) .* (C C^T)) is cheapest, e.g. a bottleneck), "hutchinson" (an unbiased random estimate
    from n_proj projections, see below), or "autograd" (torch.func vmap(jacrev): any module,
    slow). Differentiable twice w.r.t. x and the parameters.

    "hutchinson": sq[b] = mean_i ||v_i^T J_b||^2 over n_proj random v with E[v v^T] = I
    (`distribution` "rademacher" or "gaussian", drawn from `generator`), all carried back in one
    fused pass. `orthogonal=True` draws orthonormal rows instead (scaled by sqrt(m); needs
    n_proj <= m), which lowers the variance and is exact at n_proj = m. `return_variance=True`
    returns (y, sq, var) with var[b] the sample variance of the n_proj terms divided by n_proj
    (an unbiased variance estimate of sq[b] for independent projections; for orthogonal ones it
    overstates it). The projections are held fixed: the gradient is the gradient of the
    estimate, itself an unbiased estimate of the penalty's gradient.

    max_memory: a budget in bytes for the op's estimated peak (default: a quarter of the device's
    memory). A plan over budget runs the batch in chunks, each recomputed in the backward: same
    result, peak memory of one chunk, about a third more multiply-adds. `jacext.explain` shows the
    chunking."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method != "hutchinson" and (n_proj != 1 or generator is not None or orthogonal or return_variance
                                   or distribution != "rademacher"):
        raise ValueError("n_proj, generator, distribution, orthogonal and return_variance apply to "
                         "method='hutchinson' only; the other methods are exact")
    if method == "autograd":
        if max_memory is not None:
            raise ValueError("max_memory applies to jacext's fused methods, not to method='autograd'")
        return jacobian_frobenius_ref(model, x)
    spec = parse_model(model)
    _check_input(spec, x)
    if method == "hutchinson":
        return _hutchinson(spec, x, n_proj, generator, distribution, orthogonal, return_variance, max_memory)
    return _ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                       method=method, max_memory=max_memory)


def random_projections(batch: int, n_proj: int, n_out: int, *, distribution: str = "rademacher",
                       orthogonal: bool = False, generator=None, dtype=torch.float32, device="cpu"):
    """(batch, n_proj, n_out) projection rows: independent Rademacher or Gaussian entries, or
    (orthogonal) n_proj orthonormal rows per sample scaled by sqrt(n_out), so that in every case
    E[v_i v_i^T] = I for each row."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive integer, got {n_proj!r}")
    if orthogonal and n_proj > n_out:
        raise ValueError(f"orthogonal projections need n_proj <= {n_out} (the number of outputs), got {n_proj}")
    source = generator.device if generator is not None else torch.device(device)
    if orthogonal:  # an orthonormal frame of a Gaussian matrix: each column uniform on the sphere
        gaussian = torch.randn(batch, n_out, n_proj, generator=generator, device=source, dtype=torch.float64)
        rows = _orthonormal_columns(gaussian).transpose(1, 2) * n_out ** 0.5
    elif distribution == "gaussian":
        rows = torch.randn(batch, n_proj, n_out, generator=generator, device=source, dtype=torch.float64)
    else:
        rows = torch.randint(0, 2, (batch, n_proj, n_out), generator=generator, device=source) * 2 - 1
    return rows.to(device=device, dtype=dtype)


def _orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Q of a = Q R with R's diagonal positive (a: (B, m, k) float64, full column rank), by CholeskyQR2:
    R from the Cholesky factor of a^T a, twice. Batched Cholesky and triangular solves are one
    kernel each on a GPU, where a batched QR loops over the samples; the _ex form checks nothing,
    so nothing waits for the device. Two passes keep Q orthonormal to rounding for condition
    numbers up to ~1e7 (a Gaussian matrix's is about its size)."""
    q = a
    for _ in range(2):
        factor, _ = torch.linalg.cholesky_ex(q.transpose(1, 2) @ q)
        q = torch.linalg.solve_triangular(factor, q.transpose(1, 2), upper=False).transpose(1, 2)
    return q


def _hutchinson(spec, x, n_proj, generator, distribution, orthogonal, return_variance, max_memory):
    if return_variance and n_proj < 2:
        raise ValueError("return_variance needs n_proj >= 2 (a sample variance of the projections)")
    v = random_projections(x.shape[0], n_proj, spec.widths[-1], distribution=distribution,
                           orthogonal=orthogonal, generator=generator, dtype=x.dtype, device=x.device)
    y, terms = _ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                           method="hutchinson", projections=v, max_memory=max_memory)
    sq = terms.mean(1)  # each term ||v_i^T J||^2 is unbiased for ||J||_F^2
    if return_variance:
        return y, sq, terms.var(1) / n_proj
    return y, sq


def jacobian(model, x: torch.Tensor, layer: Union[int, Sequence[int]] = 0):
    """J (B, m, n_layer): J[b] = d model(x)_b / d h_layer,b, where h_0 = x and h_l is the output
    of the l-th Linear's activation. Differentiable twice.

    With a sequence of layers, the list of their Jacobians, from one reverse sweep down to the
    lowest (it passes every layer above: one op instead of one per layer)."""
    spec = parse_model(model)
    _check_input(spec, x)
    if isinstance(layer, int):
        return _ops.mlp_jacobian(x, spec.weights, spec.biases, spec.activations, spec.act_params, layer=layer)[1]
    return _ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params, layers=layer)[1]


def jacobian_gram(model, x: torch.Tensor, layer: Union[int, Sequence[int]] = 0):
    """G (B, m, m) = J J^T with J = jacobian(model, x, layer); a list for several layers (one
    reverse sweep). At the input layer of a net whose first hidden layer is narrower than its
    input, J J^T = S G S^T (G = W_1 W_1^T once per batch) without forming J."""
    spec = parse_model(model)
    _check_input(spec, x)
    layers = [layer] if isinstance(layer, int) else list(layer)
    _, grams = _ops.mlp_jacobian_grams(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                       layers=layers)
    return grams[0] if isinstance(layer, int) else grams


class JacobianFrobenius(nn.Module):
    """jacobian_frobenius as a module: JacobianFrobenius(model)(x) -> (y, sq). Wrap this, not the
    bare model, in DistributedDataParallel: DDP synchronizes the gradients of what its forward
    runs, and here that is the fused op (see README, distributed training). As a module it also
    goes through torch.func.functional_call, so an ensemble of stacked weights can be vmapped
    (docs/api.md). Keyword arguments (method, n_proj, generator, ...) are jacobian_frobenius's."""

    def __init__(self, model: nn.Module, method: str = "auto", **options):
        super().__init__()
        self.model, self.method, self.options = model, method, options

    def forward(self, x: torch.Tensor):
        return jacobian_frobenius(self.model, x, method=self.method, **self.options)


class Jacobian(nn.Module):
    """jacobian as a module: Jacobian(model, layer)(x) -> J (for DDP and functional_call)."""

    def __init__(self, model: nn.Module, layer: Union[int, Sequence[int]] = 0):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor):
        return jacobian(self.model, x, layer=self.layer)


class JacobianGram(nn.Module):
    """jacobian_gram as a module: JacobianGram(model, layer)(x) -> J J^T (for DDP and functional_call)."""

    def __init__(self, model: nn.Module, layer: Union[int, Sequence[int]] = 0):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor):
        return jacobian_gram(self.model, x, layer=self.layer)
