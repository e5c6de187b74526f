"""Pure-PyTorch formulas, independent of the compiled kernels.

- The torch.func references (vmap of jacrev) that the tests compare against.
- The composite formula (torch ops only, so autograd differentiates it to any order) that the
  backward op's own backward uses: the double backward of every jacext op.
"""
from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .activations import activation_derivative, activation_value


def per_sample_jacobian(model, x: torch.Tensor):
    """(y, J) with J[b] = d model(x)_b / d x_b, by vmap(jacrev(model)) (any module)."""
    def one(xi):
        out = model(xi.unsqueeze(0)).squeeze(0)
        return out, out

    jac, y = vmap(jacrev(one, has_aux=True))(x)
    return y, jac


def jacobian_frobenius_ref(model, x: torch.Tensor):
    """(y, ||J||_F^2 per sample) by torch.func."""
    y, jac = per_sample_jacobian(model, x)
    return y, jac.flatten(1).pow(2).sum(1)


def mlp_composite(x, weights, biases, activations, act_params, layer=0, projections=None):
    """(y, J) of the MLP with J = dy/dh_layer carried in reverse, in differentiable torch ops;
    with projections V (B, k, m), V J instead of J."""
    h, ds = x, []
    for i, w in enumerate(weights):
        y = h @ w.t()
        if biases[i] is not None:
            y = y + biases[i]
        code, p0, p1 = activations[i], act_params[2 * i], act_params[2 * i + 1]
        ds.append(activation_derivative(y, code, p0, p1))
        h = activation_value(y, code, p0, p1)
    if projections is None:
        jac = ds[-1].unsqueeze(2) * weights[-1]
    else:
        jac = (projections * ds[-1].unsqueeze(1)) @ weights[-1]
    for i in range(len(weights) - 2, layer - 1, -1):
        jac = (jac * ds[i].unsqueeze(1)) @ weights[i]
    return h, jac


def mlp_jacobian_backward_composite(grad_y, grad_sq, grad_jac, x, weights, biases, activations,
                                    act_params, layer, projections=None):
    """What the op mlp_jacobian_backward computes, as differentiable torch ops: the gradients of
    sum(grad_y*y) + sum(grad_sq*||J||^2) + sum(grad_jac*J) w.r.t. x, weights and the biases that
    are not None (returned in that order); with projections, ||J||^2 is per projected row."""
    present = [i for i, b in enumerate(biases) if b is not None]

    def outputs(x, weights, present_biases):
        full = [None] * len(weights)
        for i, b in zip(present, present_biases):
            full[i] = b
        y, jac = mlp_composite(x, weights, full, activations, act_params, layer, projections)
        sq = jac.pow(2).sum((1, 2)) if projections is None else jac.pow(2).sum(2)
        return y, sq, jac

    primals = (x, list(weights), [biases[i] for i in present])
    (y, sq, jac), vjp = torch.func.vjp(outputs, *primals)
    cotangents = tuple(torch.zeros_like(o) if g is None else g
                       for g, o in zip((grad_y, grad_sq, grad_jac), (y, sq, jac)))
    return vjp(cotangents)
