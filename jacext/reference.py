"""Pure-PyTorch formulas, independent of the compiled kernels.

- The torch.func references (vmap of jacrev) that the tests compare against.
- The composite formula (torch ops only, so autograd differentiates it to any order) that the
  backward op's own backward uses: the double backward of every jacext op.
- The large-margin loss written out with one autograd.grad per class and layer: the tests'
  reference and the benchmark's batched-autograd peer.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import jacrev, vmap

from .activations import activation_derivative, activation_second_derivative, activation_value


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


def mlp_composite(x, weights, biases, activations, act_params, layer=0, projections=None, carries=False):
    """(y, J) of the MLP with J = dy/dh_layer carried in reverse, in differentiable torch ops;
    with projections V (B, k, m), V J instead of J. carries=True: (y, [dy/dh_i for i = L-1 down
    to layer]), the reverse carries (the last one is J)."""
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
    all_carries = [jac]
    for i in range(len(weights) - 2, layer - 1, -1):
        jac = (jac * ds[i].unsqueeze(1)) @ weights[i]
        all_carries.append(jac)
    return (h, all_carries) if carries else (h, jac)


def mlp_jacobian_backward_composite(grad_y, grad_sq, grad_jac, x, weights, biases, activations,
                                    act_params, layer, projections=None, grad_carries=(), gram_output=False):
    """What the op mlp_jacobian_backward computes, as differentiable torch ops: the gradients of
    sum(grad_y*y) + sum(grad_sq*||J||^2) + sum(grad_jac*J) + sum(grad_carries*carries) w.r.t. x,
    weights and the biases that are not None (returned in that order); with projections, ||J||^2
    is per projected row; with gram_output, grad_jac is the gradient of J J^T (mlp_jacobian's
    output with strategy 2). grad_carries: [] or one per reverse carry dy/dh_i, i = L-1 down to
    layer (None for none)."""
    present = [i for i, b in enumerate(biases) if b is not None]

    def outputs(x, weights, present_biases):
        full = [None] * len(weights)
        for i, b in zip(present, present_biases):
            full[i] = b
        y, carries = mlp_composite(x, weights, full, activations, act_params, layer, projections, carries=True)
        jac = carries[-1]
        sq = jac.pow(2).sum((1, 2)) if projections is None else jac.pow(2).sum(2)
        jac_out = jac @ jac.transpose(1, 2) if gram_output else jac
        return y, sq, jac_out, [c for c, g in zip(carries, grad_carries) if g is not None]

    primals = (x, list(weights), [biases[i] for i in present])
    (y, sq, jac, carries), vjp = torch.func.vjp(outputs, *primals)
    cotangents = tuple(torch.zeros_like(o) if g is None else g
                       for g, o in zip((grad_y, grad_sq, grad_jac), (y, sq, jac)))
    return vjp((*cotangents, [g for g in grad_carries if g is not None]))


def hidden_states(model, x):
    """(output, [h_0 = x, then the output of each activation]) of an nn.Sequential, keeping the
    graph (x must require grad for gradients w.r.t. h_0)."""
    hs, h = [x], x
    for module in model:
        h = module(h)
        if not isinstance(module, nn.Linear):
            hs.append(h)
    return h, hs


def margin_classes_ref(score, target, top_k=None):
    """(classes, f_y - f_j): all m classes (top_k=None), or the top_k others by score."""
    rows = torch.arange(len(target))
    if top_k is None:
        classes = torch.arange(score.shape[1], device=score.device).expand(len(target), -1)
    else:
        others = score.detach().clone()
        others[rows, target] = -math.inf
        classes = others.topk(top_k, dim=1).indices
    return classes, score[rows, target].unsqueeze(1) - score.gather(1, classes)


def margin_gradient_norms_ref(score, hs, target, classes, layers, q, create_graph):
    """||grad_{h_l}(f_y - f_j)||_q for each layer and class column, one autograd.grad each:
    a list over layers of (B, k)."""
    rows = torch.arange(score.shape[0])
    norms = []
    for layer in layers:
        per_class = []
        for i in range(classes.shape[1]):
            diff = score[rows, target] - score[rows, classes[:, i]]
            (grad,) = torch.autograd.grad(diff.sum(), hs[layer], retain_graph=True, create_graph=create_graph)
            per_class.append(grad.norm(p=q, dim=1))
        norms.append(torch.stack(per_class, dim=1))
    return norms


def large_margin_loss_ref(model, x, target, layers, gamma, alpha_factor, top_k, dist_norm, epsilon,
                          use_approximation, worst_case_loss, layers_weights, on):
    """The official TF code's large-margin formula in plain autograd (x must require grad)."""
    logits, hs = hidden_states(model, x)
    score = torch.softmax(logits, 1) if on == "probs" else logits
    classes, diff = margin_classes_ref(score, target, top_k)
    q = {1: math.inf, 2: 2, math.inf: 1}[dist_norm]
    norms = margin_gradient_norms_ref(score, hs, target, classes, layers, q, create_graph=True)
    losses = []
    for norm, weight in zip(norms, layers_weights or [1.0] * len(layers)):
        norm = norm / weight
        if use_approximation:
            norm = norm.detach()
        dist = diff / (norm + epsilon)
        if worst_case_loss:
            dist = dist.min(1, keepdim=True).values
        loss = torch.relu(gamma - torch.clamp(dist, min=gamma * (1 - alpha_factor))) - gamma
        losses.append(loss.sum(1).mean())
    return torch.stack(losses).mean()


def spectral_norm_ref(model, x: torch.Tensor, layer: int = 0):
    """(y, ||dy_b/dh_layer,b||_2 per sample): vmap(jacrev) of the modules after the layer-th
    activation (layer 0: the whole model) at h_layer, then torch.linalg.matrix_norm(J, 2)."""
    modules = list(model)
    cut = 0
    for _ in range(layer):  # past the next activation
        cut = next(i for i in range(cut, len(modules)) if not isinstance(modules[i], nn.Linear)) + 1
    h = nn.Sequential(*modules[:cut])(x)
    y, jac = per_sample_jacobian(nn.Sequential(*modules[cut:]), h)
    return y, torch.linalg.matrix_norm(jac, 2)


# The forward-carry functionals (jacext.laplacian, divergence, jacobian_diagonal): torch.func
# references, and the carry itself in differentiable torch ops (the double backward of their ops).

def laplacian_ref(model, x: torch.Tensor):
    """(y, grad, lap) by torch.func: grad[b] = dy_b/dx_b (vmap(jacrev)) and lap[b, i] the trace of
    the Hessian of y_i at x_b (vmap(hessian)), for any module."""
    from torch.func import hessian

    def one(xi):
        return model(xi.unsqueeze(0)).squeeze(0)

    hess = vmap(hessian(one))(x)  # (B, m, n_0, n_0)
    return model(x), vmap(jacrev(one))(x), hess.diagonal(dim1=2, dim2=3).sum(-1)


def jacobian_diagonal_ref(model, x: torch.Tensor):
    """(y, diag) with diag[b] = diag(dy_b/dx_b), by vmap(jacrev) (a square net)."""
    y, jac = per_sample_jacobian(model, x)
    return y, jac.diagonal(dim1=1, dim2=2)


def forward_carry_composite(x, weights, biases, activations, act_params, tangents=None, laplacian=False):
    """(y, T, delta): the MLP output, the tangent rows T[b, j] = (dy_b/dx_b) t_j (B, c, m) for the unit
    vectors (tangents None) or the rows of tangents (B, c, n_0), and with laplacian the Laplacian
    sum_j d^2 y / dx_j^2 (B, m), else None: the carry of csrc/mlp_laplacian.h in torch ops."""
    h = x
    t = tangents if tangents is not None else torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
    delta = torch.zeros_like(x) if laplacian else None
    for i, w in enumerate(weights):
        z = h @ w.t()
        if biases[i] is not None:
            z = z + biases[i]
        code, p0, p1 = activations[i], act_params[2 * i], act_params[2 * i + 1]
        p = t @ w.t()
        d1 = activation_derivative(z, code, p0, p1)
        if laplacian:
            d2 = activation_second_derivative(z, code, p0, p1)
            delta = d1 * (delta @ w.t()) + d2 * p.pow(2).sum(1)
        h, t = activation_value(z, code, p0, p1), d1.unsqueeze(1) * p
    return h, t, delta


def _vjp_of(outputs_fn, x, weights, biases, cotangents):
    """The gradients of sum(cotangent * output) over outputs_fn(x, weights, full biases) w.r.t. x,
    the weights and the biases that are not None, in differentiable torch ops."""
    present = [i for i, b in enumerate(biases) if b is not None]

    def outputs(x, weights, present_biases):
        full = [None] * len(weights)
        for i, b in zip(present, present_biases):
            full[i] = b
        return outputs_fn(x, weights, full)

    values, vjp = torch.func.vjp(outputs, x, list(weights), [biases[i] for i in present])
    return vjp(tuple(torch.zeros_like(v) if g is None else g for g, v in zip(cotangents, values)))


def mlp_laplacian_backward_composite(grad_y, grad_grad, grad_lap, x, weights, biases, activations, act_params):
    """What the op mlp_laplacian_backward computes, in differentiable torch ops: the gradients of
    sum(grad_y*y) + sum(grad_grad*grad) + sum(grad_lap*lap) w.r.t. x, the weights and the biases
    that are not None."""
    def outputs(x, weights, biases):
        y, t, lap = forward_carry_composite(x, weights, biases, activations, act_params, laplacian=True)
        return y, t.transpose(1, 2), lap

    return _vjp_of(outputs, x, weights, biases, (grad_y, grad_grad, grad_lap))


def mlp_jacobian_diagonal_backward_composite(grad_y, grad_out, x, weights, biases, activations, act_params,
                                             trace=False, projections=None):
    """What the op mlp_jacobian_diagonal_backward computes, in differentiable torch ops, for the
    diagonal (B, n), its sum (trace), or with projections the terms v_j^T J v_j (B, k)."""
    def outputs(x, weights, biases):
        y, t, _ = forward_carry_composite(x, weights, biases, activations, act_params, projections)
        if projections is not None:
            return y, (t * projections).sum(2)
        diag = t.diagonal(dim1=1, dim2=2)  # T[b, j] = J e_j: the diagonal is T[b, j, j]
        return y, diag.sum(1) if trace else diag

    return _vjp_of(outputs, x, weights, biases, (grad_y, grad_out))
