"""jacext.ops: the op-level API (weights, biases and activation codes instead of a model), with
the strategy codes and the helpers that callers of the ops use."""
from ._jacobian_ops import batched_gram, mlp_jacobian, mlp_jacobian_frobenius, mlp_jacobian_grams, mlp_jacobians
from ._laplacian_ops import mlp_jacobian_diagonal, mlp_laplacian
from ._library import bias_tensors, device_formulas, explained_functorch_errors, has_cuda_kernels, warn_if_tf32
from .layouts import FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM
from .planner import op_element_size, resolve_strategy

__all__ = ["mlp_jacobian_frobenius", "mlp_jacobian", "mlp_jacobians", "mlp_jacobian_grams", "mlp_laplacian",
           "mlp_jacobian_diagonal", "resolve_strategy", "REVERSE", "FORWARD", "REVERSE_GRAM", "GRAM1", "FORWARD_GRAM",
           "device_formulas", "has_cuda_kernels", "op_element_size", "warn_if_tf32", "bias_tensors",
           "explained_functorch_errors", "batched_gram"]
