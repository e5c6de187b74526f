// MLP normalizing flows (Gresele et al. 2020, "Relative gradient optimization of the Jacobian
// term in unsupervised deep learning"), written once for every device like mlp_jacobian.h.
//
// A flow is a square MLP z = f(x) with strictly monotone activations. Its log-Jacobian-determinant
// per sample is  sum_k log|det W_k| + sum_k sum_i log act_k'(y_k,i):  the first sum depends on the
// parameters only (once per call); the op returns z and both sums.
//
// The backward gives either the ordinary gradient or
// the relative gradient: the Euclidean gradient G of each augmented layer
// W~ = [[W, b], [0, 1]] right-multiplied by W~^T W~. With delta_k the adjoint of the
// pre-activation y_k = W_k h_{k-1} + b_k, and everything summed over the batch:
//   W_k:  delta^T h W^T W + delta^T 1 b^T W  =  delta^T (Y W)            (B n^2 + B n^2, no n^3)
//   b_k:  delta^T h W^T b + delta^T 1 (b^T b + 1)  =  delta^T (Y b + 1)
// (a layer without bias: the same with b = 0); the log|det W_k| term's relative gradient is
// (W_k, b_k). In relative mode no inverse or determinant is formed.
#pragma once

#include "mlp_common.h"

namespace jacext {

// (z, log_dact, logabsdet, saved): z = f(x) (B, n); log_dact[b] = sum over layers and units of
// log|act'(y)|; logabsdet = sum_k log|det W_k| (one LU per layer) when logdet_value, else 0 with
// the same gradient (its value costs O(n^3), which relative-gradient training avoids); saved =
// d[0..L-1], d2[0..L-1], h_1..h_{L-1}, y_1..y_L for the backward. relative_gradient does not
// change the outputs, only which gradient the backward gives (jacext/_ops.py).
template <class Kernels>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> mlp_flow(
    const Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, bool /*relative_gradient*/, bool logdet_value) {
  check_mlp(x, weights, biases, activations, act_params, 0, kReverse);
  for (const auto i : c10::irange(weights.size())) {
    TORCH_CHECK(weights[i].size(0) == weights[i].size(1), "jacext: a flow's weights must be square, "
                "weight ", i, " has shape ", weights[i].sizes());
  }
  const int64_t B = x.size(0), n = x.size(1), L = static_cast<int64_t>(weights.size());
  const auto options = x.options();
  // Every entry of a flow's `saved` is (B, n): d and act'' are materialized for every layer (ones
  // and zeros where the activation has none), as the backward reads them all.
  std::vector<Tensor> ds, d2s, hs = {x}, ys;
  for (const auto i : c10::irange(L)) {
    Tensor y = Kernels::empty({B, n}, options), h = Kernels::empty({B, n}, options);
    Tensor d = Kernels::empty({B, n}, options), d2 = Kernels::empty({B, n}, options);
    if (auto b = bias_at(biases, i)) {
      Kernels::addmm(y, *b, hs.back(), weights[i].t());
    } else {
      Kernels::mm(y, hs.back(), weights[i].t());
    }
    h.copy_(y);  // the activation pass works in place; the backward needs y too
    if (has_derivative(activations[i])) {
      Kernels::activation_(h, d, has_curvature(activations[i]) ? d2 : Tensor(), activations[i],
                           act_params[2 * i], act_params[2 * i + 1]);
    } else {
      d.fill_(1);
    }
    if (!has_curvature(activations[i])) d2.zero_();
    ys.push_back(y);
    hs.push_back(h);
    ds.push_back(d);
    d2s.push_back(d2);
  }
  Tensor log_dact = at::zeros({B}, options);
  Tensor log_d;  // log|act'| of one layer, in workspace memory (no fresh pages per step)
  for (const auto i : c10::irange(L)) {
    if (!has_derivative(activations[i])) continue;  // log 1 = 0
    if (!log_d.defined()) log_d = Kernels::empty({B, n}, options);
    at::abs_out(log_d, ds[i]).log_();
    log_dact.add_(log_d.sum(1));
  }
  Tensor logabsdet = at::zeros({}, options);
  if (logdet_value) {
    for (const Tensor& w : weights) logabsdet.add_(std::get<1>(at::linalg_slogdet(w)));
  }
  std::vector<Tensor> saved(ds);
  saved.insert(saved.end(), d2s.begin(), d2s.end());
  saved.insert(saved.end(), hs.begin() + 1, hs.end() - 1);
  saved.insert(saved.end(), ys.begin(), ys.end());
  return {hs.back(), log_dact, logabsdet, saved};
}

// Gradients of sum(grad_z * z) + sum(grad_log_dact * log_dact) + grad_logabsdet * logabsdet
// w.r.t. x (only when input_grad; else an undefined tensor), the weights and the biases (one per
// layer, with or without bias): Euclidean (log|det W|'s gradient W^-T, by an inverse), or with
// relative=true the relative gradient for the weights and biases (log|det W|'s is then (W, b)).
// grad_nll (a 0-d tensor g, instead of the three seeds): the gradients of g times the mean NLL
// under a standard Gaussian base, mean_b(|z_b|^2 / 2 - log_dact_b) - logabsdet (+ a constant),
// for a linear last layer: the seeds are g z / B, -g / B and -g, and as z = Y_L the last layer's
// delta is a multiple of Y_L, so with relative=true Y_L W_L alone gives both the relative
// gradient's product and (scaled) the next adjoint: B n^2 multiply-adds fewer than [Y; delta] W.
template <class Kernels>
std::tuple<std::optional<Tensor>, std::vector<Tensor>, std::vector<Tensor>> mlp_flow_backward(
    const std::optional<Tensor>& grad_z, const std::optional<Tensor>& grad_log_dact_in,
    const std::optional<Tensor>& grad_logabsdet_in, const Tensor& x, at::TensorList weights,
    at::TensorList biases, at::IntArrayRef activations, at::ArrayRef<double> act_params,
    at::TensorList saved, bool relative, bool input_grad, const std::optional<Tensor>& grad_nll) {
  check_mlp(x, weights, biases, activations, act_params, 0, kReverse);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 4 * L - 1, "jacext: expected ", 4 * L - 1,
              " saved tensors, got ", saved.size());
  const Tensor* ds = saved.data();
  const Tensor* d2s = ds + L;
  const Tensor* hidden = d2s + L;  // h_1..h_{L-1}
  const Tensor* ys = hidden + L - 1;
  const auto defined = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined(); };
  const bool nll = defined(grad_nll);
  const int64_t B = x.size(0), n = x.size(1);
  const auto options = x.options();
  Tensor grad_h, scale;  // scale: d(mean NLL)/dz = scale * z
  std::optional<Tensor> grad_log_dact = grad_log_dact_in, grad_logabsdet = grad_logabsdet_in;
  if (nll) {
    TORCH_CHECK(!defined(grad_z) && !defined(grad_log_dact_in) && !defined(grad_logabsdet_in),
                "jacext: mlp_flow_backward takes grad_nll or the three output gradients, not both");
    TORCH_CHECK(grad_nll->dim() == 0, "jacext: grad_nll must be a 0-d tensor, got shape ", grad_nll->sizes());
    TORCH_CHECK(activations[L - 1] == kIdentity, "jacext: grad_nll needs a flow whose last layer is linear");
    const Tensor g = grad_nll->to(options.dtype());
    scale = g / static_cast<double>(std::max<int64_t>(B, 1));
    grad_log_dact = scale.neg().expand({B});
    grad_logabsdet = g.neg();
    grad_h = Kernels::empty({B, n}, options);
    at::mul_out(grad_h, ys[L - 1], scale);
  } else {
    grad_h = defined(grad_z) ? *grad_z : at::zeros_like(ds[L - 1]);
  }
  const bool has_log_dact = defined(grad_log_dact), has_logabsdet = defined(grad_logabsdet);
  std::vector<Tensor> grad_w(L), grad_b(L);
  for (int64_t i = L - 1; i >= 0; --i) {
    const bool next = i > 0 || input_grad;  // grad_h for the layer below (grad_x for i = 0)
    // The NLL's last layer: delta = scale * Y, so Y W is also delta W up to that scale.
    const bool delta_of_y = nll && relative && i == L - 1;
    // The relative gradient's Y W and the next grad_h = delta W read W once, as one GEMM of the
    // rows [Y; delta]: delta is written into the second half of that buffer (not for grad_x,
    // which is returned and so gets memory of its own).
    const bool stacked = relative && i > 0 && !delta_of_y;
    Tensor rows = Kernels::empty({stacked ? 2 * B : B, n}, options);
    Tensor delta = rows.narrow(0, stacked ? B : 0, B);
    // delta = d/dy of the objective: through h (act') and through log act' (act'' / act').
    at::mul_out(delta, grad_h, ds[i]);
    if (has_log_dact && has_curvature(activations[i])) {  // else act'' = 0
      Tensor ratio = Kernels::empty({B, n}, options);
      delta.addcmul_(grad_log_dact->unsqueeze(1), at::div_out(ratio, d2s[i], ds[i]));
    }
    const Tensor& h_in = i == 0 ? x : hidden[i - 1];
    auto b = bias_at(biases, i);
    grad_w[i] = Kernels::empty(weights[i].sizes(), options);  // n x n: from the workspace
    grad_b[i] = Kernels::empty({weights[i].size(0)}, options);
    if (relative) {
      if (stacked) rows.narrow(0, 0, B).copy_(ys[i]);
      Tensor product = Kernels::empty({rows.size(0), n}, options);
      Kernels::mm(product, stacked ? rows : ys[i], weights[i]);
      // delta^T (Y W), plus log|det W|'s relative gradient W, in one pass over the n x n result
      Kernels::rank_update(grad_w[i], delta, product.narrow(0, 0, B), has_logabsdet ? weights[i] : Tensor(),
                           has_logabsdet ? *grad_logabsdet : Tensor());
      Tensor yb1 = b ? at::mv(ys[i], *b).add_(1) : at::ones({B}, options);
      at::mv_out(grad_b[i], delta.t(), yb1);
      if (has_logabsdet && b) grad_b[i].addcmul_(*b, *grad_logabsdet);
      if (stacked) grad_h = product.narrow(0, B, B);
      if (delta_of_y && next) grad_h = product.mul_(scale);  // after rank_update has read Y W
    } else {
      Kernels::mm(grad_w[i], delta.t(), h_in);
      at::sum_out(grad_b[i], delta, 0);
      // linalg_inv_ex: no error check, so no host sync on the GPU (a singular W gives inf / nan)
      if (has_logabsdet) grad_w[i].addcmul_(std::get<0>(at::linalg_inv_ex(weights[i])).t(), *grad_logabsdet);
    }
    if (next && !stacked && !delta_of_y) {
      grad_h = Kernels::empty({B, n}, options);
      Kernels::mm(grad_h, delta, weights[i]);
    }
  }
  return {input_grad ? std::optional<Tensor>(grad_h) : std::nullopt, grad_w, grad_b};
}

}  // namespace jacext
