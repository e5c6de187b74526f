"""The ops' formulas as differentiable torch ops: what each backward op computes, written so that
autograd differentiates it to any order. The backward ops' own backward (the double backward of
every jacext op) runs these."""
from __future__ import annotations

import torch

from .activations import activation_derivative, activation_second_derivative, activation_value


def mlp_composite(x, weights, biases, activations, act_params, layer=0, projections=None, carries=False,
                  masks=None, residual=None, sample_biases=None, gates=None):
    """(y, J) of the MLP with J = dy/dh_layer carried in reverse, in differentiable torch ops;
    with projections V (B, k, m), V J instead of J. carries=True: (y, [dy/dh_i for i = L-1 down
    to layer]), the reverse carries (the last one is J). masks: None, or one (B, n_{i+1}) or None
    per layer, a constant factor after the activation (h = m * act(y), so d = m * act'(y) and
    autograd differentiates the product: every derivative of act is scaled by m). residual: None, or
    per layer i -1 or the j <= i whose input h_j is added to layer i's output (after the mask); the
    reverse carry dy/dh_j then gains dy/dh_{i+1} (dy/dy = I, or V, for the output). sample_biases,
    gates (None, or per layer None or (B, n_{i+1})): y = gate * (h W^T) + b + sample_bias, so
    d = gate * act'(y) (autograd differentiates both factors)."""
    h, ds, inputs = x, [], []
    for i, w in enumerate(weights):
        inputs.append(h)
        y = h @ w.t()
        gate = gates[i] if gates is not None else None
        if gate is not None:
            y = gate * y
        if biases[i] is not None:
            y = y + biases[i]
        if sample_biases is not None and sample_biases[i] is not None:
            y = y + sample_biases[i]
        code, p0, p1 = activations[i], act_params[2 * i], act_params[2 * i + 1]
        d, h = activation_derivative(y, code, p0, p1), activation_value(y, code, p0, p1)
        if gate is not None:
            d = gate * d
        if masks is not None and masks[i] is not None:
            d, h = masks[i] * d, masks[i] * h
        if residual is not None and residual[i] >= 0:
            h = h + inputs[residual[i]]
        ds.append(d)
    L = len(weights)
    if projections is None:
        jac = ds[-1].unsqueeze(2) * weights[-1]
    else:
        jac = (projections * ds[-1].unsqueeze(1)) @ weights[-1]
    # dy/dh_i by layer, from dy/dy (I or V) down
    above = {L: projections if projections is not None else torch.eye(h.shape[1], dtype=h.dtype, device=h.device)}
    for i in range(L - 1, layer - 1, -1):
        if i < L - 1:
            jac = (jac * ds[i].unsqueeze(1)) @ weights[i]
        for k in range(i, L):
            if residual is not None and residual[k] == i:
                jac = jac + above[k + 1]
        above[i] = jac
    all_carries = [above[i] for i in range(L - 1, layer - 1, -1)]
    return (h, all_carries) if carries else (h, jac)


def mlp_jacobian_backward_composite(grad_y, grad_sq, grad_jac, x, weights, biases, activations,
                                    act_params, layer, projections=None, grad_carries=(), gram_output=False,
                                    masks=None, residual=None, sample_biases=None, gates=None):
    """What the op mlp_jacobian_backward computes, as differentiable torch ops: the gradients of
    sum(grad_y*y) + sum(grad_sq*||J||^2) + sum(grad_jac*J) + sum(grad_carries*carries) w.r.t. x,
    weights, and the biases, per-sample biases and gates that are not None (a list each, returned in
    that order); with projections, ||J||^2 is per projected row; with gram_output, grad_jac is the
    gradient of J J^T (mlp_jacobian's output with strategy 2). grad_carries: [] or one per reverse
    carry dy/dh_i, i = L-1 down to layer (None for none). masks, residual, sample_biases and gates:
    mlp_composite's."""
    def outputs(x, weights, biases, sample_biases, gates):
        y, carries = mlp_composite(x, weights, biases, activations, act_params, layer, projections, carries=True,
                                   masks=masks, residual=residual, sample_biases=sample_biases, gates=gates)
        jac = carries[-1]
        sq = jac.pow(2).sum((1, 2)) if projections is None else jac.pow(2).sum(2)
        jac_out = jac @ jac.transpose(1, 2) if gram_output else jac
        return y, sq, jac_out, [c for c, g in zip(carries, grad_carries) if g is not None]

    return _vjp_of(outputs, x, weights, (biases, sample_biases, gates),
                   (grad_y, grad_sq, grad_jac, [g for g in grad_carries if g is not None]))


def forward_carry_composite(x, weights, biases, activations, act_params, tangents=None, laplacian=False,
                            laplacian_rows=-1, residual=None, sample_biases=None, gates=None, masks=None):
    """(y, T, delta): the MLP output, the tangent rows T[b, j] = (dy_b/dx_b) t_j (B, c, m) for the unit
    vectors (tangents None) or the rows of tangents (B or 1, c, n_0), and with laplacian the Laplacian
    sum_j t_j^T (d^2 y / dx^2) t_j over the first laplacian_rows rows (-1: all) (B, m), else None:
    the carry of csrc/mlp_laplacian.h in torch ops. residual (None or per layer i, -1 or j <= i):
    layer i's output adds the carry (h, T, delta) that entered layer j. sample_biases, gates (None, or
    per layer None or (B, n_{i+1})): z = gate * (h W^T) + b + sample_bias, the gate scaling every row
    of the layer's product (h, T and delta alike). masks (None, or per layer None or (B, n_{i+1})): a
    constant factor after the activation, scaling h, T and delta alike (before a skip's sum)."""
    h = x
    t = tangents if tangents is not None else torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
    delta = torch.zeros_like(x) if laplacian else None
    carries = []  # the input carry of each layer, for the skips
    for i, w in enumerate(weights):
        carries.append((h, t, delta))
        z, p, q = h @ w.t(), t @ w.t(), delta @ w.t() if laplacian else None
        gate = gates[i] if gates is not None else None
        if gate is not None:
            z, p, q = gate * z, gate.unsqueeze(1) * p, gate * q if laplacian else None
        if biases[i] is not None:
            z = z + biases[i]
        if sample_biases is not None and sample_biases[i] is not None:
            z = z + sample_biases[i]
        code, p0, p1 = activations[i], act_params[2 * i], act_params[2 * i + 1]
        d1 = activation_derivative(z, code, p0, p1)
        if laplacian:
            d2 = activation_second_derivative(z, code, p0, p1)
            squared = p if laplacian_rows == -1 else p[:, :laplacian_rows]
            delta = d1 * q + d2 * squared.pow(2).sum(1)
        h, t = activation_value(z, code, p0, p1), d1.unsqueeze(1) * p
        if masks is not None and masks[i] is not None:
            h, t = masks[i] * h, masks[i].unsqueeze(1) * t
            if laplacian:
                delta = masks[i] * delta
        if residual is not None and residual[i] >= 0:
            h_j, t_j, delta_j = carries[residual[i]]
            h, t = h + h_j, t + t_j
            if laplacian:
                delta = delta + delta_j
    return h, t, delta


def _vjp_of(outputs_fn, x, weights, optional, cotangents):
    """The gradients of sum(cotangent * output) over outputs_fn(x, weights, *full lists) w.r.t. x,
    the weights and the entries that are not None of each per-layer list in `optional` (the
    biases, per-sample biases, gates; a list may be None: no entries), in differentiable torch ops."""
    optional = [[None] * len(weights) if lst is None else list(lst) for lst in optional]
    present = [[i for i, t in enumerate(lst) if t is not None] for lst in optional]

    def outputs(x, weights, *present_values):
        full = []
        for indices, values in zip(present, present_values):
            entries = [None] * len(weights)
            for i, v in zip(indices, values):
                entries[i] = v
            full.append(entries)
        return outputs_fn(x, weights, *full)

    values, vjp = torch.func.vjp(outputs, x, list(weights), *[[lst[i] for i in indices]
                                                              for lst, indices in zip(optional, present)])
    return vjp(tuple(torch.zeros_like(v) if g is None else g for g, v in zip(cotangents, values)))


def mlp_laplacian_backward_composite(grad_y, grad_grad, grad_lap, x, weights, biases, activations, act_params,
                                     directions=None, laplacian_rows=-1, residual=None, sample_biases=None,
                                     gates=None, masks=None):
    """What the op mlp_laplacian_backward computes, in differentiable torch ops: the gradients of
    sum(grad_y*y) + sum(grad_grad*grad) + sum(grad_lap*lap) w.r.t. x, the weights, and the biases,
    per-sample biases and gates that are not None (a list each); the directions (tangent rows) and
    the masks held constant."""
    def outputs(x, weights, biases, sample_biases, gates):
        y, t, lap = forward_carry_composite(x, weights, biases, activations, act_params, directions, laplacian=True,
                                            laplacian_rows=laplacian_rows, residual=residual,
                                            sample_biases=sample_biases, gates=gates, masks=masks)
        return y, t.transpose(1, 2), lap

    return _vjp_of(outputs, x, weights, (biases, sample_biases, gates), (grad_y, grad_grad, grad_lap))


def mlp_jacobian_diagonal_backward_composite(grad_y, grad_out, x, weights, biases, activations, act_params,
                                             trace=False, projections=None, residual=None, sample_biases=None,
                                             gates=None, masks=None):
    """What the op mlp_jacobian_diagonal_backward computes, in differentiable torch ops, for the
    diagonal (B, n), its sum (trace), or with projections the terms v_j^T J v_j (B, k); the
    gradients as mlp_laplacian_backward_composite's."""
    def outputs(x, weights, biases, sample_biases, gates):
        y, t, _ = forward_carry_composite(x, weights, biases, activations, act_params, projections,
                                          residual=residual, sample_biases=sample_biases, gates=gates,
                                          masks=masks)
        if projections is not None:
            return y, (t * projections).sum(2)
        diag = t.diagonal(dim1=1, dim2=2)  # T[b, j] = J e_j: the diagonal is T[b, j, j]
        return y, diag.sum(1) if trace else diag

    return _vjp_of(outputs, x, weights, (biases, sample_biases, gates), (grad_y, grad_out))
