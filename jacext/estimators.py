"""The random estimators of a Jacobian quantity (the penalty's Hutchinson and Hutch++, the
divergence's Hutchinson): their projections, their option checks, and the estimate with its
variance from the per-projection terms. The quantities supply the terms (one fused op call)."""
from __future__ import annotations

import torch

__all__ = ["DISTRIBUTIONS", "random_projections", "orthonormal_columns", "check_estimator_options", "hutchinson",
           "hutch_plus_plus", "mean_and_variance"]

DISTRIBUTIONS = ("rademacher", "gaussian")


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
        rows = orthonormal_columns(gaussian).transpose(1, 2) * n_out ** 0.5
    elif distribution == "gaussian":
        rows = torch.randn(batch, n_proj, n_out, generator=generator, device=source, dtype=torch.float64)
    else:
        rows = torch.randint(0, 2, (batch, n_proj, n_out), generator=generator, device=source) * 2 - 1
    return rows.to(device=device, dtype=dtype)


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
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


def check_estimator_options(method, estimators, n_proj, generator, distribution, orthogonal, return_variance):
    """The estimator options apply to the estimator methods only: the others are exact."""
    if method not in estimators and (n_proj != 1 or generator is not None or orthogonal or return_variance
                                     or distribution != "rademacher"):
        names = "method='hutchinson' only" + (" (all but orthogonal to 'hutch++' too)" if "hutch++" in estimators else "")
        raise ValueError(f"n_proj, generator, distribution, orthogonal and return_variance apply to {names}; "
                         "the other methods are exact")


def mean_and_variance(terms, return_variance):
    """The mean of each sample's n terms and, with return_variance, their sample variance divided by
    n: an unbiased estimate of the mean's variance for independent terms (written out: var(1)
    warns on an empty batch)."""
    estimate = terms.mean(1)
    if not return_variance:
        return (estimate,)
    n = terms.shape[1]
    spread = (terms - terms.mean(1, keepdim=True)).square().sum(1) / (n - 1)
    return estimate, spread / n


def hutchinson(terms_of, batch, n_proj, n, *, distribution, orthogonal, generator, dtype, device, return_variance):
    """Hutchinson's estimate from n_proj projections v (batch, n_proj, n) with E[v v^T] = I:
    terms_of(v) -> (y, terms) with each term (batch, n_proj) unbiased for the quantity.
    Returns (y, estimate) or (y, estimate, variance)."""
    if return_variance and n_proj < 2:
        raise ValueError("return_variance needs n_proj >= 2 (a sample variance of the projections)")
    v = random_projections(batch, n_proj, n, distribution=distribution, orthogonal=orthogonal, generator=generator,
                           dtype=dtype, device=device)
    y, terms = terms_of(v)
    return (y, *mean_and_variance(terms, return_variance))


def hutch_plus_plus(terms_of, sketch_of, batch, n_proj, n_in, m, *, distribution, generator, dtype, device,
                    return_variance):
    """Hutch++ (Meyer et al. 2021) for ||J||_F^2, J (m, n_in) per sample: sketch_of(G) -> J G rows
    (batch, r, m) for r Gaussian input rows G (no gradient), and terms_of(rows) -> (y, terms) with
    terms[:, i] = ||rows_i^T J||^2. The exact part ||Q^T J||^2 over an orthonormal basis Q of the
    sketch plus Hutchinson's estimate of the residual ||(I - Q Q^T) J||^2; unbiased for every Q."""
    if not isinstance(n_proj, int) or n_proj < 3:
        raise ValueError(f"method='hutch++' needs n_proj >= 3 (a sketch, its exact part and the residual), got {n_proj!r}")
    rank = min(n_proj // 3, m)
    residual = n_proj - 2 * rank
    if return_variance and residual < 2:
        raise ValueError(f"return_variance needs n_proj - 2 * {rank} >= 2 residual projections with "
                         f"method='hutch++', got n_proj={n_proj}")
    sketch = random_projections(batch, rank, n_in, distribution="gaussian", generator=generator, dtype=dtype,
                                device=device)
    # Q: an orthonormal basis of J G's columns, per sample, held fixed (no gradient)
    q = torch.linalg.qr(sketch_of(sketch).transpose(1, 2)).Q  # (B, m, rank)
    v = random_projections(batch, residual, m, distribution=distribution, generator=generator, dtype=q.dtype,
                           device=device)
    rows = torch.cat([q.transpose(1, 2), v - (v @ q) @ q.transpose(1, 2)], 1)  # [Q^T; v (I - Q Q^T)]
    y, terms = terms_of(rows)
    exact_part, residual_terms = terms[:, :rank].sum(1), terms[:, rank:]
    # the exact part does not vary for a given Q
    estimate, *variance = mean_and_variance(residual_terms, return_variance)
    return (y, exact_part + estimate, *variance)
