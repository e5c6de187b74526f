// The MLP-Jacobian algorithms, written once for every device.
//
// Notation (0-based): W[i] is (n_{i+1} x n_i), h_0 = x, y_{i+1} = h_i W[i]^T + b[i],
// h_{i+1} = act_i(y_{i+1}), d[i] = act_i'(y_{i+1}). The Jacobian of the output w.r.t. h_l is
//   J = D_L W_L ... D_{l+1} W_{l+1}        (per sample, m x n_l).
// Two exact strategies carry it through the layers, each step one GEMM over the whole batch:
//   reverse: R^(L-1) = D_L W_L, R^(i) = (R^(i+1) D_{i+1}) W_{i+1}; J = R^(l)        (m rows)
//   forward: U^(l+1) = W_{l+1}^T, T^(i) = U^(i) D_i, U^(i+1) = T^(i) W_{i+1}^T; J^T = T^(L)
// The GEMMs are ATen's (BLAS / cuBLAS); the elementwise work (the activation with its first two
// derivatives in one pass, the scaled square-sum, the row-wise dot of the backward) are the
// device's own kernels, passed in as `Kernels` (cpu/mlp_jacobian_cpu.cpp, cuda/mlp_jacobian_cuda.cu).
//
// For the Frobenius norm, reverse mode can end without ever forming J (kReverseGram): with
// S = R^(1) D_1 the last step is J = S W_1, and ||S W_1||^2 = sum((S G) * S) with G = W_1 W_1^T
// computed once per batch: m*n_1^2 instead of m*n_1*n_0 multiply-adds per sample (and likewise
// in the backward); jacext/planner.py counts both and picks.
//
// kForwardGram is its mirror for a linear output layer: forward mode stops at T = T^(L-1), and
// ||W_L T^T||^2 = sum((T H) * T) with H = W_L^T W_L: n_{L-1}^2 instead of m*n_{L-1} multiply-adds
// per input column, so it pays when m > n_{L-1}/2 or so (planner).
//
// kGram1, one hidden layer and a linear output (J = W_2 D_1 W_1): ||J||^2 = d^T M d with
// M = (W_1 W_1^T) .* (W_2^T W_2), the same for every sample: one GEMM of the batch with M and a
// row-wise dot, O(n_1^2) per sample instead of O(m n_1 n_0); carries: G1 = W_1 W_1^T,
// G2 = W_2^T W_2 and M d (B, n_1).
//
// The forward ops also return `saved`, so that the backward recomputes neither a GEMM nor an
// activation: d[0..L-1], then act''(y) for every layer, then h_1..h_{L-1}, then the carries
// (reverse: R^(L-1), ..., R^(l); forward: U^(l+2), ..., U^(L), all before their diagonal
// scaling; kReverseGram: R^(L-1), ..., R^(1), then P = S G; kForwardGram: U^(2), ..., U^(L-1),
// then P = T H).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "activations.h"

namespace jacext {

using at::Tensor;

enum Strategy : int64_t { kReverse = 0, kForward = 1, kReverseGram = 2, kGram1 = 3, kForwardGram = 4 };

// A layer without bias passes an empty tensor: a list of optional tensors would stop autograd
// from reaching the biases that are present.
inline std::optional<Tensor> bias_at(at::TensorList biases, int64_t i) {
  if (!biases[i].defined() || biases[i].numel() == 0) return std::nullopt;
  return biases[i];
}

// Every op validates its MLP description the same way; messages say what was expected.
inline void check_mlp(const Tensor& x, at::TensorList weights, at::TensorList biases,
                      at::IntArrayRef activations, at::ArrayRef<double> act_params,
                      int64_t layer, int64_t strategy) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, "jacext: expected at least one weight matrix, got none");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L, "jacext: expected ", L,
              " biases (an empty tensor for a layer without bias), got ", biases.size());
  TORCH_CHECK(static_cast<int64_t>(activations.size()) == L, "jacext: expected ", L,
              " activation codes, got ", activations.size());
  TORCH_CHECK(static_cast<int64_t>(act_params.size()) == 2 * L, "jacext: expected ", 2 * L,
              " activation parameters (two per layer), got ", act_params.size());
  TORCH_CHECK(x.dim() == 2, "jacext: expected x of shape (batch, features), got ", x.dim(),
              "-d tensor of shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "jacext: expected x of dtype float32 or float64, got ", x.scalar_type(),
              " (float16 / bfloat16 run under torch.autocast, which casts them to float32)");
  TORCH_CHECK(layer >= 0 && layer < L, "jacext: layer must be in [0, ", L - 1,
              "] (0 = input, l = output of the l-th activation), got ", layer);
  TORCH_CHECK(strategy >= kReverse && strategy <= kForwardGram,
              "jacext: strategy must be 0 (reverse), 1 (forward), 2 (reverse with Gram "
              "epilogue), 3 (one-hidden-layer Gram) or 4 (forward with Gram epilogue), got ", strategy);
  TORCH_CHECK(strategy != kGram1 || (layer == 0 && L == 2 && activations[1] == kIdentity),
              "jacext: strategy 3 (one-hidden-layer Gram) needs the Jacobian w.r.t. the input of "
              "a net with exactly two layers and a linear output layer");
  TORCH_CHECK(strategy != kReverseGram || (layer == 0 && L >= 2),
              "jacext: the Gram epilogue needs the Jacobian w.r.t. the input of a net with at "
              "least two layers");
  TORCH_CHECK(strategy != kForwardGram || (layer == 0 && L >= 2 && activations[L - 1] == kIdentity),
              "jacext: strategy 4 (forward with Gram epilogue) needs the Jacobian w.r.t. the input "
              "of a net with at least two layers and a linear output layer");
  int64_t width = x.size(1);
  for (const auto i : c10::irange(L)) {
    const Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2, "jacext: weight ", i, " must be 2-d (out, in), got shape ",
                w.sizes());
    TORCH_CHECK(w.size(1) == width, "jacext: weight ", i, " has shape ", w.sizes(),
                " but its input has ", width, " features");
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "jacext: weight ", i, " has dtype ",
                w.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(w.device() == x.device(), "jacext: weight ", i, " is on ", w.device(),
                " but x is on ", x.device());
    width = w.size(0);
    if (auto b = bias_at(biases, i)) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == width, "jacext: bias ", i,
                  " must have shape (", width, "), got ", b->sizes());
      TORCH_CHECK(b->scalar_type() == x.scalar_type(), "jacext: bias ", i, " has dtype ",
                  b->scalar_type(), " but x has ", x.scalar_type());
      TORCH_CHECK(b->device() == x.device(), "jacext: bias ", i, " is on ", b->device(),
                  " but x is on ", x.device());
    }
    TORCH_CHECK(activations[i] >= 0 && activations[i] < kNumActivations,
                "jacext: unknown activation code ", activations[i], " for layer ", i);
  }
}

// a @ b for a product known to be symmetric (a Gram matrix, possibly with a diagonal weight in
// between), SYRK-like: row block i is multiplied only with the columns up to its diagonal block,
// and the rest is mirrored. With k blocks of >= 256 rows that is (k+1)/2k of the GEMM's work.
inline Tensor symmetric_mm(const Tensor& a, const Tensor& b) {
  const int64_t n = a.size(0);
  const int64_t k = std::clamp<int64_t>(n / 256, 1, 8);
  if (k == 1) return at::mm(a, b);
  Tensor out = at::empty({n, n}, a.options());
  const int64_t block = (n + k - 1) / k;
  for (int64_t i = 0; i < n; i += block) {
    const int64_t rows = std::min(block, n - i);
    Tensor left = out.narrow(0, i, rows).narrow(1, 0, i + rows);
    at::mm_out(left, a.narrow(0, i, rows), b.narrow(1, 0, i + rows));
  }
  for (int64_t i = 0; i + block < n; i += block) {  // upper blocks right of the diagonal block
    const int64_t rows = std::min(block, n - i), rest = n - i - rows;
    out.narrow(0, i, rows).narrow(1, i + rows, rest).copy_(out.narrow(0, i + rows, rest).narrow(1, i, rows).t());
  }
  return out;
}

template <class Kernels>
struct MLPJacobian {
  at::TensorList weights;
  at::TensorList biases;
  at::IntArrayRef activations;
  at::ArrayRef<double> act_params;
  int64_t layer;
  int64_t strategy;
  Tensor projections = Tensor();  // (B, k, m) random rows v: carry v^T J instead of J (estimator)

  int64_t depth() const { return static_cast<int64_t>(weights.size()); }
  bool forward_mode() const { return strategy == kForward || strategy == kForwardGram; }
  bool gram_epilogue_mode() const { return strategy == kReverseGram || strategy == kForwardGram; }
  // The Gram epilogues replace the last GEMM: reverse carries stop at R^(last_carried), forward
  // carries at T^(last_forward).
  int64_t last_carried() const { return strategy == kReverseGram ? layer + 1 : layer; }
  int64_t last_forward() const { return strategy == kForwardGram ? depth() - 1 : depth(); }

  // h_0..h_L and the activations' first and second derivatives d[i], d2[i] at y_{i+1}; the
  // pre-activations y_{i+1} too when `ys` is given.
  void mlp_forward(const Tensor& x, std::vector<Tensor>& hs, std::vector<Tensor>& ds,
                   std::vector<Tensor>& d2s, std::vector<Tensor>* ys = nullptr) const {
    hs = {x};
    for (const auto i : c10::irange(depth())) {
      auto b = bias_at(biases, i);
      Tensor y = b ? at::addmm(*b, hs.back(), weights[i].t()) : at::mm(hs.back(), weights[i].t());
      auto [h, d, d2] = Kernels::activation_forward(y, activations[i], act_params[2 * i],
                                                    act_params[2 * i + 1]);
      if (ys) ys->push_back(y);
      hs.push_back(h);
      ds.push_back(d);
      d2s.push_back(d2);
    }
  }

  // The `saved` list: d, d2, h_1..h_{L-1}, carries.
  static std::vector<Tensor> pack_saved(const std::vector<Tensor>& hs, const std::vector<Tensor>& ds,
                                        const std::vector<Tensor>& d2s, const std::vector<Tensor>& cs) {
    std::vector<Tensor> saved(ds);
    saved.insert(saved.end(), d2s.begin(), d2s.end());
    saved.insert(saved.end(), hs.begin() + 1, hs.end() - 1);
    saved.insert(saved.end(), cs.begin(), cs.end());
    return saved;
  }

  // Jacobian carries, unscaled, in the order documented at the top of this file.
  std::vector<Tensor> carries(const std::vector<Tensor>& ds) const {
    const int64_t L = depth(), B = ds[0].size(0);
    std::vector<Tensor> out;
    if (!forward_mode()) {
      // R^(L-1) = D_L W_L, or V D_L W_L (one GEMM) when carrying projections.
      Tensor r = projections.defined()
                     ? at::mm((projections * ds[L - 1].unsqueeze(1)).reshape({-1, ds[L - 1].size(1)}),
                              weights[L - 1]).view({B, projections.size(1), weights[L - 1].size(1)})
                     : ds[L - 1].unsqueeze(2) * weights[L - 1].unsqueeze(0);
      out.push_back(r);
      for (int64_t i = L - 2; i >= last_carried(); --i) {
        Tensor s = r * ds[i].unsqueeze(1);
        r = at::mm(s.reshape({-1, s.size(2)}), weights[i]).view({B, s.size(1), weights[i].size(1)});
        out.push_back(r);
      }
    } else {
      Tensor t = first_forward_carry(ds);
      for (int64_t i = layer + 1; i < last_forward(); ++i) {
        Tensor u = at::mm(t.reshape({-1, t.size(2)}), weights[i].t()).view({B, t.size(1), weights[i].size(0)});
        out.push_back(u);
        t = u * ds[i].unsqueeze(1);
      }
    }
    return out;
  }

  // Forward mode: T^(layer+1) = W[layer]^T D_{layer+1}, formed directly (no GEMM), contiguous.
  Tensor first_forward_carry(const std::vector<Tensor>& ds) const {
    const Tensor& w = weights[layer];
    Tensor t = at::empty({ds[0].size(0), w.size(1), w.size(0)}, w.options());
    return at::mul_out(t, w.t().unsqueeze(0), ds[layer].unsqueeze(1));
  }

  // The Gram epilogues' input S: kReverseGram: S = R^(1) D_1 (B, rows, n_1), J = S W_1;
  // kForwardGram: S = T^(L-1) (B, n_0, n_{L-1}), J^T = S W_L^T.
  Tensor gram_input(const std::vector<Tensor>& cs, const std::vector<Tensor>& ds) const {
    if (strategy == kReverseGram) return cs.back() * ds[0].unsqueeze(1);
    const int64_t L = depth();
    return L - 1 == layer + 1 ? first_forward_carry(ds) : cs.back() * ds[L - 2].unsqueeze(1);
  }

  // P = S G with the sample-independent G = W_1 W_1^T (reverse) or W_L^T W_L (forward), so that
  // ||J||^2 = sum(P * S) per sample.
  Tensor gram_epilogue(const Tensor& s) const {
    const Tensor& w = strategy == kReverseGram ? weights[0] : weights[depth() - 1];
    Tensor gram = strategy == kReverseGram ? symmetric_mm(w, w.t()) : symmetric_mm(w.t(), w);
    return at::mm(s.reshape({-1, s.size(2)}), gram).view(s.sizes());
  }

  // The gradient of sum_b g_b sum(P_b * S_b) w.r.t. the Gram's weight, with dG = S^T g S.
  Tensor gram_weight_grad(const Tensor& s, const Tensor& g) const {
    Tensor dg = symmetric_mm((s * g).reshape({-1, s.size(2)}).t(), s.reshape({-1, s.size(2)}));
    return strategy == kReverseGram ? 2 * at::mm(dg, weights[0])
                                    : 2 * at::mm(weights[depth() - 1], dg);
  }

  // Forward mode: U^(L), the last carry before its scaling by d[L-1]. With a single layer after
  // `layer` there is no GEMM and U^(L) is W[layer]^T itself, broadcast over the batch.
  Tensor last_unscaled(const std::vector<Tensor>& cs, const std::vector<Tensor>& ds) const {
    if (!cs.empty()) return cs.back();
    return weights[layer].t().unsqueeze(0).expand({ds[0].size(0), -1, -1});
  }

  // The final carry scaled: reverse gives J (B, m, n_l), forward gives J^T (B, n_l, m).
  Tensor final_carry(const std::vector<Tensor>& cs, const std::vector<Tensor>& ds) const {
    return forward_mode() ? last_unscaled(cs, ds) * ds.back().unsqueeze(1) : cs.back();
  }

  // Adjoint sweep: given the adjoint of the final carry (for the Gram epilogues: of S, with the
  // Gram's weight gradient already set), accumulate the adjoints of d[layer..] (into adj_d) and of the
  // weights (into grad_w). `adj` must be a temporary of the caller's: it is scaled in place.
  // carry_grads (reverse only; empty, or one per carry in cs's order, an empty tensor for none):
  // gradients w.r.t. the intermediate carries R^(i) = dy/dh_i, added as the sweep passes them.
  void carry_backward(Tensor adj, const std::vector<Tensor>& cs, const std::vector<Tensor>& ds,
                      std::vector<Tensor>& adj_d, std::vector<Tensor>& grad_w,
                      at::TensorList carry_grads = {}) const {
    const int64_t L = depth(), B = ds[0].size(0);
    auto flat = [](const Tensor& t) { return t.reshape({-1, t.size(2)}); };
    if (!forward_mode()) {
      // cs[j] = R^(L-1-j); R^(i) = (R^(i+1) * d[i]) W[i].
      for (int64_t i = layer; i <= L - 2; ++i) {
        const Tensor& r_next = cs[L - 2 - i];
        Tensor adj_s = adj;  // kReverseGram enters the loop with the adjoint of S^(layer+1)
        if (strategy != kReverseGram || i > layer) {
          Tensor s = r_next * ds[i].unsqueeze(1);
          grad_w[i] = at::mm(flat(s).t(), flat(adj));
          adj_s = at::mm(flat(adj), weights[i].t()).view({B, adj.size(1), weights[i].size(0)});
        }
        adj_d[i] = Kernels::rowwise_dot(r_next, adj_s);
        adj = adj_s.mul_(ds[i].unsqueeze(1));  // adj_s is this sweep's own temporary
        if (!carry_grads.empty() && carry_grads[L - 2 - i].numel()) adj.add_(carry_grads[L - 2 - i]);
      }
      if (projections.defined()) {  // R^(L-1) = (V * d[L-1]) W[L-1]
        Tensor vd = projections * ds[L - 1].unsqueeze(1);
        grad_w[L - 1] = at::mm(flat(vd).t(), flat(adj));
        Tensor adj_vd = at::mm(flat(adj), weights[L - 1].t()).view(vd.sizes());
        adj_d[L - 1] = Kernels::rowwise_dot(projections, adj_vd);
      } else {  // R^(L-1) = d[L-1] (rows) * W[L-1]
        adj_d[L - 1] = (adj * weights[L - 1].unsqueeze(0)).sum(2);
        grad_w[L - 1] = (adj * ds[L - 1].unsqueeze(2)).sum(0);
      }
    } else {
      // cs[j] = U^(layer+2+j); T^(i) = U^(i) * d[i-1], U^(i+1) = T^(i) W[i]^T.
      for (int64_t i = last_forward(); i >= layer + 2; --i) {
        const Tensor& u = cs[i - layer - 2];
        adj_d[i - 1] = Kernels::rowwise_dot(u, adj);
        Tensor adj_u = adj.mul_(ds[i - 1].unsqueeze(1));  // adj is this sweep's own temporary
        Tensor t_prev = i - 1 == layer + 1 ? first_forward_carry(ds)
                                           : cs[i - layer - 3] * ds[i - 2].unsqueeze(1);
        grad_w[i - 1] = at::mm(flat(adj_u).t(), flat(t_prev));
        adj = at::mm(flat(adj_u), weights[i - 1]).view({B, adj.size(1), weights[i - 1].size(1)});
      }
      // T^(layer+1) = W[layer]^T * d[layer] (columns).
      adj_d[layer] = Kernels::rowwise_dot(adj, weights[layer].t().unsqueeze(0));
      grad_w[layer] = (adj * ds[layer].unsqueeze(1)).sum(0).t();
    }
  }
};

// Random projections V (B, k, m) for the estimator: the carry is V J instead of J.
inline Tensor checked_projections(const std::optional<Tensor>& projections, const Tensor& x,
                                  at::TensorList weights, int64_t strategy) {
  if (!projections.has_value() || !projections->defined()) return Tensor();
  const Tensor& v = *projections;
  const int64_t m = weights.back().size(0);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == x.size(0) && v.size(2) == m && v.size(1) >= 1,
              "jacext: projections must have shape (batch=", x.size(0), ", k >= 1, outputs=", m,
              "), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.device() == x.device(),
              "jacext: projections must match x's dtype and device, got ", v.scalar_type(), " on ",
              v.device());
  TORCH_CHECK(strategy == kReverse || strategy == kReverseGram, "jacext: projections are carried "
              "in reverse mode; strategy must be 0 or 2, got ", strategy);
  return v.contiguous();
}

template <class Kernels>
std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_jacobian_frobenius(
    const Tensor& x, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t strategy,
    const std::optional<Tensor>& projections) {
  check_mlp(x, weights, biases, activations, act_params, 0, strategy);
  MLPJacobian<Kernels> net{weights, biases, activations, act_params, 0, strategy,
                           checked_projections(projections, x, weights, strategy)};
  std::vector<Tensor> hs, ds, d2s;
  net.mlp_forward(x, hs, ds, d2s);
  Tensor sq;
  if (strategy == kGram1) {
    Tensor g1 = symmetric_mm(weights[0], weights[0].t()), g2 = symmetric_mm(weights[1].t(), weights[1]);
    Tensor md = at::mm(ds[0], g1 * g2);  // M is symmetric: rows of D M = (M d_b)^T
    sq = (md * ds[0]).sum(1);
    return {hs.back(), sq, net.pack_saved(hs, ds, d2s, {g1, g2, md})};
  }
  std::vector<Tensor> cs = net.carries(ds);
  // With projections, one squared norm per projected row: (B, k).
  if (net.gram_epilogue_mode()) {
    Tensor s = net.gram_input(cs, ds);
    Tensor p = net.gram_epilogue(s);
    // The estimator needs each projected row's norm; the exact norm only their sum (fused).
    sq = net.projections.defined() ? (p * s).sum(2) : Kernels::rowwise_dot(p, s).sum(1);
    cs.push_back(p);
  } else if (net.projections.defined()) {
    sq = cs.back().square().sum(2);
  } else {
    // Fused epilogue: the forward mode's last diagonal scaling happens inside the reduction.
    sq = net.forward_mode() ? Kernels::scaled_square_sum(net.last_unscaled(cs, ds), ds.back())
                            : Kernels::scaled_square_sum(cs.back(), Tensor());
  }
  return {hs.back(), sq, net.pack_saved(hs, ds, d2s, cs)};
}

template <class Kernels>
std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_jacobian(
    const Tensor& x, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t layer,
    int64_t strategy) {
  check_mlp(x, weights, biases, activations, act_params, layer, strategy);
  TORCH_CHECK(strategy == kReverse || strategy == kForward, "jacext: mlp_jacobian forms J; "
              "strategies 2, 3 and 4 (Gram) are for the Frobenius norm only");
  MLPJacobian<Kernels> net{weights, biases, activations, act_params, layer, strategy};
  std::vector<Tensor> hs, ds, d2s;
  net.mlp_forward(x, hs, ds, d2s);
  std::vector<Tensor> cs = net.carries(ds);
  Tensor final_carry = net.final_carry(cs, ds);
  Tensor jac = net.forward_mode() ? final_carry.transpose(1, 2).contiguous() : final_carry.clone();
  return {hs.back(), jac, net.pack_saved(hs, ds, d2s, cs)};
}

// Gradients of  sum(grad_y * y) + sum(grad_sq * ||J||_F^2) + sum(grad_jac * J)  w.r.t. x, the
// weights and the biases (a bias gradient is returned for every layer, with or without bias).
template <class Kernels>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> mlp_jacobian_backward(
    const std::optional<Tensor>& grad_y, const std::optional<Tensor>& grad_sq,
    const std::optional<Tensor>& grad_jac, const Tensor& x, at::TensorList weights,
    at::TensorList biases, at::IntArrayRef activations, at::ArrayRef<double> act_params,
    int64_t layer, int64_t strategy, at::TensorList saved, at::TensorList grad_carries,
    const std::optional<Tensor>& projections) {
  check_mlp(x, weights, biases, activations, act_params, layer, strategy);
  MLPJacobian<Kernels> net{weights, biases, activations, act_params, layer, strategy,
                           checked_projections(projections, x, weights, strategy)};
  const int64_t L = net.depth();
  const int64_t n_carries = strategy == kGram1 ? 3 : net.forward_mode() ? L - layer - 1 : L - layer;
  const int64_t n_saved = 3 * L - 1 + n_carries;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == n_saved, "jacext: expected ", n_saved,
              " saved tensors, got ", saved.size());
  std::vector<Tensor> ds(saved.begin(), saved.begin() + L);
  std::vector<Tensor> d2s(saved.begin() + L, saved.begin() + 2 * L);
  std::vector<Tensor> hs = {x};
  hs.insert(hs.end(), saved.begin() + 2 * L, saved.begin() + 3 * L - 1);
  std::vector<Tensor> cs(saved.begin() + 3 * L - 1, saved.end());

  std::vector<Tensor> adj_d(L), grad_w(L), grad_b(L);
  const bool has_sq = grad_sq.has_value() && grad_sq->defined();
  const bool has_jac = grad_jac.has_value() && grad_jac->defined();
  TORCH_CHECK(strategy == kReverse || strategy == kForward || !has_jac,
              "jacext: strategies 2, 3 and 4 (Gram) never form J, so J has no gradient");
  TORCH_CHECK(!net.projections.defined() || !has_jac,
              "jacext: with projections the op returns norms only, so J has no gradient");
  // grad_carries: gradients w.r.t. the reverse carries R^(L-1), ..., R^(layer) (= dy/dh_i, the
  // Jacobians at the layers above `layer`), an empty tensor for none; an empty list for none at all.
  bool has_carries = false;
  if (!grad_carries.empty()) {
    TORCH_CHECK(strategy == kReverse && !net.projections.defined(),
                "jacext: carry gradients need strategy 0 (reverse) without projections");
    TORCH_CHECK(static_cast<int64_t>(grad_carries.size()) == n_carries, "jacext: expected ", n_carries,
                " carry gradients (an empty tensor for none), got ", grad_carries.size());
    for (const auto j : c10::irange(n_carries)) {
      if (!grad_carries[j].numel()) continue;
      TORCH_CHECK(grad_carries[j].sizes() == cs[j].sizes(), "jacext: carry gradient ", j,
                  " must have shape ", cs[j].sizes(), ", got ", grad_carries[j].sizes());
      has_carries = true;
    }
  }
  // grad_sq is (B) for the norm of J, (B, k) for the norms of the k projected rows.
  Tensor g;
  if (has_sq) g = net.projections.defined() ? grad_sq->unsqueeze(2) : grad_sq->view({-1, 1, 1});
  if (strategy == kGram1 && has_sq) {
    // sum_b g_b d_b^T M d_b: d/dd_b = 2 g_b M d_b; with dM = sum_b g_b d_b d_b^T,
    // d/dW_1 = 2 (dM .* G2) W_1 and d/dW_2 = 2 W_2 (dM .* G1).
    const Tensor &g1 = cs[0], &g2 = cs[1], &md = cs[2];
    adj_d[0] = md * (2 * *grad_sq).unsqueeze(1);
    Tensor dm = symmetric_mm((ds[0] * grad_sq->unsqueeze(1)).t(), ds[0]);
    grad_w[0] = 2 * at::mm(dm * g2, weights[0]);
    grad_w[1] = 2 * at::mm(weights[1], dm * g1);
  } else if (net.gram_epilogue_mode() && has_sq) {
    // sum_b g_b tr(S_b G S_b^T): d/dS_b = 2 g_b P_b; G's weight gets gram_weight_grad.
    Tensor p = cs.back();
    cs.pop_back();
    Tensor s = net.gram_input(cs, ds);
    grad_w[net.strategy == kReverseGram ? 0 : L - 1] = net.gram_weight_grad(s, g);
    net.carry_backward(p * (2 * g), cs, ds, adj_d, grad_w);
  } else if (has_sq || has_jac || has_carries) {
    // The adjoint of the final carry, a fresh tensor (carry_backward scales it in place).
    Tensor adj;
    auto accumulate = [&adj](const Tensor& term) {
      adj = adj.defined() ? adj.add_(term) : term.clone(at::MemoryFormat::Contiguous);
    };
    if (has_sq) adj = net.final_carry(cs, ds) * (2 * g);
    if (has_jac) accumulate(net.forward_mode() ? grad_jac->transpose(1, 2) : *grad_jac);
    if (has_carries && grad_carries.back().numel()) accumulate(grad_carries.back());
    if (!adj.defined()) adj = at::zeros_like(cs.back());
    net.carry_backward(adj, cs, ds, adj_d, grad_w, has_carries ? grad_carries : at::TensorList());
  }

  Tensor grad_h = grad_y.has_value() && grad_y->defined() ? *grad_y : at::zeros_like(ds.back());
  for (int64_t i = L - 1; i >= 0; --i) {
    // d/dy_{i+1} of the loss: through h (act') and, where the Jacobian uses it, through d (act'').
    Tensor g = grad_h * ds[i];
    if (adj_d[i].defined()) g.addcmul_(adj_d[i], d2s[i]);
    grad_w[i] = grad_w[i].defined() ? at::addmm(grad_w[i], g.t(), hs[i]) : at::mm(g.t(), hs[i]);
    grad_b[i] = g.sum(0);
    grad_h = at::mm(g, weights[i]);
  }
  return {grad_h, grad_w, grad_b};
}

}  // namespace jacext
