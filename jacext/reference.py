"""Pure-PyTorch formulas, independent of the compiled kernels.

- The torch.func references (vmap of jacrev) that the tests compare against.
- The large-margin loss written out with one autograd.grad per class and layer: the tests'
  reference and the benchmark's batched-autograd peer, at the layers of an nn.Sequential MLP or
  at named submodules of any model.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import jacrev, vmap



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


def hidden_states(model, x):
    """(output, [h_0 = x, then the output of each activation]) of an nn.Sequential, keeping the
    graph (x must require grad for gradients w.r.t. h_0)."""
    hs, h = [x], x
    for module in model:
        h = module(h)
        if not isinstance(module, nn.Linear):
            hs.append(h)
    return h, hs


def representations(model, x, layers):
    """(output, [h_l for l in layers]) with the graph: an integer l indexes hidden_states (an
    nn.Sequential MLP; 0 is x), "input" is x, any other string names a submodule whose output (a
    forward hook) is h_l."""
    if all(isinstance(l, int) for l in layers):
        out, hs = hidden_states(model, x)
        return out, [hs[l] for l in layers]
    captured, handles = {}, []
    for name in {l for l in layers if isinstance(l, str) and l != "input"}:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output)))
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, [x if l in (0, "input") else captured[l] for l in layers]


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
    a list over layers of (B, k). hs: the representations, indexed by the entries of layers (a
    list of every hidden state with integer layers, or a dict)."""
    rows = torch.arange(score.shape[0])
    norms = []
    for layer in layers:
        per_class = []
        for i in range(classes.shape[1]):
            diff = score[rows, target] - score[rows, classes[:, i]]
            (grad,) = torch.autograd.grad(diff.sum(), hs[layer], retain_graph=True, create_graph=create_graph)
            per_class.append(grad.flatten(1).norm(p=q, dim=1))
        norms.append(torch.stack(per_class, dim=1))
    return norms


def large_margin_loss_ref(model, x, target, layers, gamma, alpha_factor, top_k, dist_norm, epsilon,
                          use_approximation, worst_case_loss, layers_weights, on):
    """The official TF code's large-margin formula in plain autograd (x must require grad); layers
    as in representations."""
    logits, chosen = representations(model, x, layers)
    hs = dict(zip(layers, chosen))
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
