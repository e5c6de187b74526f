// The schemas of jacext's MLP ops, in one place for the two libraries that define them: jacext
// (jacext.cpp; kernels in cpu/ and cuda/, and the Python side, jacext/_ops.py, adds the fake (meta)
// kernels and the autograd formulas) and jacext_cuda_emulated (cuda/emulation/module.cpp: the CUDA
// kernels run on the CPU, for tests).
#pragma once
#include <torch/library.h>

namespace jacext {

// biases: one per layer; an empty tensor stands for a layer without bias.
// strategy: 0 reverse, 1 forward, 2 reverse with Gram epilogue, 3 one-hidden-layer Gram,
// 4 forward with Gram epilogue (2-4: Frobenius only); see mlp_jacobian.h.
// tile (keyword-only): samples per tile, 0 for the whole batch at once (mlp_jacobian.h; the
// result does not depend on it).
// masks (the Jacobian and forward-carry families; positional, as torch.library.register_autograd needs
// tensors to be): None (or []) for none, or one per layer, (B, n_{i+1})
// or an empty tensor for none: a per-sample diagonal factor after the layer's activation (a dropout
// mask), h_{i+1} = mask * act(y_{i+1}); constants, never differentiated.
// sample_biases, gates: the Jacobian ops take them as the forward-carry ops do (below).
// residual (keyword-only, every Jacobian and forward-carry op): None, or per layer i -1 or the
// j <= i whose input h_j is added to layer i's output (h + g(h)); the Jacobian ops take it with
// strategy 0 only (mlp_jacobian.h).
inline void define_mlp_ops(torch::Library& m) {
  // y = mlp(x) and sq[b] = ||d y_b / d x_b||_F^2; `saved` feeds mlp_jacobian_backward. With
  // projections V (B, k, m): sq[b, i] = ||v_bi^T d y_b / d x_b||^2 instead (reverse strategies).
  m.def(
      "mlp_jacobian_frobenius(Tensor x, Tensor[] weights, Tensor[] biases, int[] activations, "
      "float[] act_params, int strategy, Tensor? projections=None, Tensor[]? masks=None, "
      "Tensor[]? sample_biases=None, Tensor[]? gates=None, *, int tile=0, int[]? residual=None) -> "
      "(Tensor y, Tensor sq, Tensor[] saved)");
  // y = mlp(x) and jac[b] = d y_b / d h_layer,b  (B, m, n_layer); with gram (strategy 2, layer 0)
  // jac[b] = J_b J_b^T (B, m, m) by the Gram epilogue, J never formed.
  m.def(
      "mlp_jacobian(Tensor x, Tensor[] weights, Tensor[] biases, int[] activations, "
      "float[] act_params, int layer, int strategy, Tensor[]? masks=None, Tensor[]? sample_biases=None, "
      "Tensor[]? gates=None, *, int tile=0, bool gram=False, int[]? residual=None) -> "
      "(Tensor y, Tensor jac, Tensor[] saved)");
  // Gradients of sum(grad_y*y) + sum(grad_sq*sq) + sum(grad_jac*jac) + sum(grad_carries*carries)
  // (with strategy 2, grad_jac is the gradient of mlp_jacobian's J J^T)
  // w.r.t. x, weights, biases. grad_carries: for mlp_jacobian's reverse strategy, gradients
  // w.r.t. the carries in `saved` (dy/dh_i for i = L-1 down to layer; an empty tensor for none),
  // or an empty list. grad_x only with input_grad (else None); grad_biases: an empty tensor for a
  // layer without bias.
  m.def(
      "mlp_jacobian_backward(Tensor? grad_y, Tensor? grad_sq, Tensor? grad_jac, Tensor x, "
      "Tensor[] weights, Tensor[] biases, int[] activations, float[] act_params, int layer, "
      "int strategy, Tensor[] saved, Tensor[] grad_carries, Tensor? projections=None, Tensor[]? masks=None, "
      "Tensor[]? sample_biases=None, Tensor[]? gates=None, *, int tile=0, bool input_grad=True, "
      "int[]? residual=None) -> (Tensor? grad_x, Tensor[] grad_weights, Tensor[] grad_biases, "
      "Tensor[] grad_sample_biases, Tensor[] grad_gates)");
  // A square MLP as a normalizing flow (mlp_flow.h): z = mlp(x), log_dact[b] = sum of log|act'|
  // over every layer and unit, logabsdet = sum_k log|det W_k| (0 unless logdet_value; its gradient
  // is there either way); `saved` feeds mlp_flow_backward. relative_gradient does not change the
  // outputs, only which gradient the backward gives (jacext/_ops.py).
  m.def(
      "mlp_flow(Tensor x, Tensor[] weights, Tensor[] biases, int[] activations, float[] act_params, "
      "bool relative_gradient, bool logdet_value) -> (Tensor z, Tensor log_dact, Tensor logabsdet, "
      "Tensor[] saved)");
  // Gradients of sum(grad_z*z) + sum(grad_log_dact*log_dact) + grad_logabsdet*logabsdet: Euclidean,
  // or relative (weights and biases) with relative=True; grad_x only with input_grad=True. Or, with
  // grad_nll (0-d) instead of the three, of grad_nll times the mean NLL (a linear last layer).
  m.def(
      "mlp_flow_backward(Tensor? grad_z, Tensor? grad_log_dact, Tensor? grad_logabsdet, Tensor x, "
      "Tensor[] weights, Tensor[] biases, int[] activations, float[] act_params, Tensor[] saved, "
      "bool relative, bool input_grad, Tensor? grad_nll=None) -> (Tensor? grad_x, Tensor[] grad_weights, "
      "Tensor[] grad_biases)");
  // The forward-carry ops (mlp_laplacian.h). y = mlp(x), lap[b, i] = sum_j d^2 y_i / dx_j^2 (B, m)
  // and, with gradient, grad = dy/dx (B, m, n_0) (else an empty tensor); `saved` feeds the backward.
  // With directions V (B or 1, c, n_0): the c rows v_j replace the unit vectors, grad = J V^T
  // (B, m, c); lap sums v_j^T (d^2 y_i / dx^2) v_j over the first laplacian_rows rows (-1: all).
  // residual (these four ops): per layer i, -1 or the j <= i whose input carry C_j is added to layer
  // i's output (a skip h + g(h)); None: no skip. sample_biases, gates (positional: they take
  // gradients): None (or []) for none, or one per layer, (B, n_{i+1}) or an empty tensor for none:
  // z = gate * (h W^T) + b + sample_bias (conditioning inside the net). The backward ops return
  // their gradients per sample (an empty tensor for a layer without). masks as above (after the
  // activation, before a skip's sum; the closed forms, strategies 1 and 2, take none).
  m.def(
      "mlp_laplacian(Tensor x, Tensor[] weights, Tensor[] biases, int[] activations, float[] act_params, "
      "bool gradient, Tensor? directions=None, int laplacian_rows=-1, Tensor[]? sample_biases=None, "
      "Tensor[]? gates=None, Tensor[]? masks=None, *, int tile=0, int[]? residual=None) -> "
      "(Tensor y, Tensor grad, Tensor lap, Tensor[] saved)");
  // Gradients of sum(grad_y*y) + sum(grad_grad*grad) + sum(grad_lap*lap) w.r.t. x (with input_grad),
  // weights, biases (an empty tensor for a layer without bias).
  m.def(
      "mlp_laplacian_backward(Tensor? grad_y, Tensor? grad_grad, Tensor? grad_lap, Tensor x, Tensor[] weights, "
      "Tensor[] biases, int[] activations, float[] act_params, bool gradient, Tensor[] saved, "
      "Tensor? directions=None, int laplacian_rows=-1, Tensor[]? sample_biases=None, Tensor[]? gates=None, "
      "Tensor[]? masks=None, *, int tile=0, bool input_grad=True, int[]? residual=None) -> (Tensor? grad_x, "
      "Tensor[] grad_weights, Tensor[] grad_biases, Tensor[] grad_sample_biases, Tensor[] grad_gates)");
  // Square nets: y = mlp(x) and out = diag(dy/dx) (B, n) (strategy 0: forward columns, 1: one
  // hidden layer closed form), tr(dy/dx) (B) (strategy 2: two hidden layers, linear output), or
  // with projections V (B, k, n) (strategy 0) out[b, j] = v_bj^T (dy_b/dx_b) v_bj (B, k).
  m.def(
      "mlp_jacobian_diagonal(Tensor x, Tensor[] weights, Tensor[] biases, int[] activations, "
      "float[] act_params, int strategy, Tensor? projections=None, Tensor[]? sample_biases=None, "
      "Tensor[]? gates=None, Tensor[]? masks=None, *, int tile=0, int[]? residual=None) -> "
      "(Tensor y, Tensor out, Tensor[] saved)");
  m.def(
      "mlp_jacobian_diagonal_backward(Tensor? grad_y, Tensor? grad_out, Tensor x, Tensor[] weights, "
      "Tensor[] biases, int[] activations, float[] act_params, int strategy, Tensor[] saved, "
      "Tensor? projections=None, Tensor[]? sample_biases=None, Tensor[]? gates=None, Tensor[]? masks=None, *, "
      "int tile=0, bool input_grad=True, int[]? residual=None) -> (Tensor? grad_x, Tensor[] grad_weights, "
      "Tensor[] grad_biases, Tensor[] grad_sample_biases, Tensor[] grad_gates)");
  // The activation table as the kernels evaluate it: (4, *y.shape) = act, act', act'', act''' at y.
  m.def("activation_derivatives(Tensor y, int activation, float p0, float p1) -> Tensor");
}

}  // namespace jacext
