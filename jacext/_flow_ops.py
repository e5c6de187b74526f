"""The flow op family (csrc/mlp_flow.h): mlp_flow (z, log|act'|, log|det W| of a square MLP) and
its backward; their fake kernels, autograd, vmap and autocast rules. The op is differentiable once:
flows.py's training loss differentiates through its backward."""
from __future__ import annotations

import torch

from ._library import compiled, register_float32_autocast, register_vmap

__all__ = ["save_flow", "flow_grads"]


@torch.library.register_fake("jacext::mlp_flow")
def _flow_fake(x, weights, biases, activations, act_params, relative_gradient, logdet_value):
    # contiguous like the kernel's outputs, whatever x's strides (empty_like would copy them)
    saved = [x.new_empty(x.shape) for _ in range(4 * len(weights) - 1)]
    return x.new_empty(x.shape), x.new_empty(x.shape[0]), x.new_empty(()), saved


@torch.library.register_fake("jacext::mlp_flow_backward")
def _flow_backward_fake(grad_z, grad_log_dact, grad_logabsdet, x, weights, biases, activations, act_params,
                        saved, relative, input_grad, grad_nll=None):
    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0]) for w in weights])


def save_flow(ctx, x, weights, biases, activations, act_params, relative, saved):
    ctx.config = (list(activations), list(act_params), relative)
    ctx.n_layers = len(weights)
    ctx.bias_present = [b.numel() > 0 for b in biases]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *weights, *biases, *saved)


def flow_grads(ctx, grad_z, grad_log_dact, grad_logabsdet, grad_nll=None):
    """(grad_x, grad_w, grad_b) from the op's backward, None for a missing bias; relative: the
    relative gradient for the weights and biases (csrc/mlp_flow.h)."""
    tensors, L = ctx.saved_tensors, ctx.n_layers
    x, weights, biases, saved = tensors[0], tensors[1:1 + L], tensors[1 + L:1 + 2 * L], tensors[1 + 2 * L:]
    activations, act_params, relative = ctx.config
    grad_x, grad_w, grad_b = compiled.mlp_flow_backward(
        grad_z, grad_log_dact, grad_logabsdet, x, list(weights), list(biases), activations, act_params,
        list(saved), relative, ctx.needs_input_grad[0], grad_nll=grad_nll)
    return grad_x, list(grad_w), [g if present else None for g, present in zip(grad_b, ctx.bias_present)]


def _flow_setup(ctx, inputs, output):
    x, weights, biases, activations, act_params, relative, _ = inputs
    save_flow(ctx, x, weights, biases, activations, act_params, relative, output[3])
    ctx.mark_non_differentiable(*output[3])


def _flow_backward(ctx, grad_z, grad_log_dact, grad_logabsdet, grad_saved):
    return (*flow_grads(ctx, grad_z, grad_log_dact, grad_logabsdet), None, None, None, None)


def _flow_backward_backward(ctx, *grads):
    raise RuntimeError("jacext: the flow op (mlp_flow) is differentiable once; its backward has no "
                       "gradient (no double backward)")


torch.library.register_autograd("jacext::mlp_flow", _flow_backward, setup_context=_flow_setup)
torch.library.register_autograd("jacext::mlp_flow_backward", _flow_backward_backward,
                                setup_context=lambda ctx, inputs, output: None)


register_vmap("mlp_flow", sample_inputs=(0,))
register_float32_autocast("mlp_flow")
