// The MLP-Jacobian algorithms, written once for every device.
//
// Notation (0-based): W[i] is (n_{i+1} x n_i), h_0 = x, y_{i+1} = h_i W[i]^T + b[i],
// h_{i+1} = act_i(y_{i+1}), d[i] = act_i'(y_{i+1}). The Jacobian of the output w.r.t. h_l is
//   J = D_L W_L ... D_{l+1} W_{l+1}        (per sample, m x n_l).
// Two exact strategies carry it through the layers, each step one GEMM over a batch of samples:
//   reverse: R^(L-1) = D_L W_L, R^(i) = (R^(i+1) D_{i+1}) W_{i+1}; J = R^(l)        (m rows)
//   forward: U^(l+1) = W_{l+1}^T, T^(i) = U^(i) D_i, U^(i+1) = T^(i) W_{i+1}^T; J^T = T^(L)
// The GEMMs are ATen's (BLAS / cuBLAS); the elementwise work is the device's own fused kernels,
// passed in as `Kernels` (cpu/mlp_jacobian_kernels.h, cuda/mlp_jacobian_kernels.cuh): the activation
// with its derivatives in place of the GEMM output, one scaling pass that writes the next GEMM's
// input (the diagonal D_k, the loss's per-sample factor and a broadcast weight in one), the
// square-sum, the backward's row-wise dot fused with its diagonal scaling, and the MLP backward's
// activation-derivative combination fused with the bias-gradient reduction.
//
// Tiles. Every op runs its carries in tiles of `tile` samples (0: one tile, the whole batch): a
// thread takes a tile through every carry step, forward or backward, before the next, so the
// tile's temporaries stay in cache and are reused (Kernels::empty: a caching workspace on CPU),
// and the threads run their tiles side by side, each with single-threaded GEMMs; weight gradients
// are summed per slot (a thread's own tiles, or one tile that may change threads: cpu/common.h
// TileSchedule) and the slots added up in order at the end. The MLP itself (its forward, and its
// backward from the carries' adjoints of d) runs on the whole batch around the tiles: its
// activations are (B, n_i), small next to the carries, and a tile's few rows would make its GEMMs
// thin (a rank-n update of each weight's gradient per tile). The CPU planner picks the tile (jacext/planner.py
// tile_size); CUDA runs one tile (the GPU wants the whole batch in each GEMM).
//
// Per-sample diagonal factors (dropout masks): with a mask m_i after layer i's activation,
// h_{i+1} = m_i * act(y_{i+1}), so D_{i+1} = diag(m_i * act'(y)) and the curvature m_i * act''(y).
// mlp_forward scales h, d and act'' by the mask right after the activation; everything after it
// (every strategy's carries, the backward, which never recomputes a derivative from y) reads the
// scaled d and act'' and stays exact, D being per sample already. An identity layer with a mask
// has d = m. The mask is held constant (no gradient).
//
// Residual skips (h + g(h)): `residual` names, per layer i, -1 or a j <= i of the same width, and
// h_{i+1} = m_i * act(y_{i+1}) + h_j. mlp_forward adds h_j after the activation (and the mask); the
// MLP backward passes the adjoint of h_{i+1} on to h_j as well (pending until the sweep reaches
// h_j). The reverse carry R^(i) = dy/dh_i gains, for every skip (k, i), the carry R^(k+1) above it
// (R^(L) = I, or V with projections): R^(i) = (R^(i+1) D_{i+1}) W_{i+1} + sum_{k: skip(k) = i} R^(k+1),
// added before R^(i) is saved, so the saved carries are the Jacobians dy/dh_i of the network with
// its skips; its adjoint sweep passes the adjoint of R^(i) on to each such R^(k+1). Forward mode
// mirrors it: T^(i+1) = U^(i+1) D_{i+1} + T^(j) (T^(layer) = I), so the saved U^(i) no longer give
// T^(i) by a diagonal scaling alone: the T's are kept through the tile's sweep (forward_ts) and
// rebuilt from the U's in the backward, whose sweep passes the adjoint of T^(i+1) on to T^(j). The
// Gram forms (2-4, the split) factor J through W_1, W_L or one hidden layer, which a skip bypasses:
// only strategies 0 and 1 take skips (checked_skips).
//
// Conditioning inside the network (a per-sample bias s_i and a per-sample gate g_i per layer,
// (B, n_{i+1}) each; jacext/frontend.py's MLPSpec): y_{i+1} = g_i * (h_i W[i]^T) + b[i] + s_i. The bias
// changes the forward values alone; the gate is one more per-sample diagonal of the layer,
// D_{i+1} = diag(m_i * g_i * act'(y)), and mlp_forward scales d and act'' by it right after the
// activation, like a mask (an identity layer with a gate has d = m * g), so every strategy's carries and
// their sweep stay as they are. Unlike a mask the gate takes a gradient, through y and through d: the
// carries' sweep writes the adjoint of a gated layer's d even where act'' is zero, and the MLP backward
// (gated_delta) recomputes u = h W^T and act'(y), act''(y) (the saved d cannot be divided by g) for
//   ybar = hbar * m * act'(y) + dbar * m * g * act''(y),   gbar = ybar * u + dbar * m * act'(y),
// sbar = ybar (per sample: the backward returns them before any batch sum) and the GEMMs' ybar * g.
// A gate on the last layer is a diagonal there (strategies 3 and 4 need a linear output: checked_gates).
//
// Dead work is skipped: identity layers have no d (saved as an empty tensor), piecewise-linear
// ones (identity, relu, leaky_relu) no act'' and so no adjoint of d; the MLP backward stops where
// nothing flows; grad_x only when asked for; no bias gradient for a layer without bias.
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
// activation: d[0..L-1] (an empty tensor for an identity layer), then act''(y) for every layer
// (empty where it is zero), then h_1..h_{L-1}, then the carries (reverse: R^(L-1), ..., R^(l);
// forward: U^(l+2), ..., U^(L), all before their diagonal scaling; kReverseGram: R^(L-1), ...,
// R^(1), then P = S G; kForwardGram: U^(2), ..., U^(L-1), then P = T H).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "mlp_common.h"

namespace jacext {

// Products known to be symmetric (Gram matrices, possibly with a diagonal weight in between) are
// computed SYRK-like: row block i is multiplied only with the columns up to its diagonal block
// and the rest is mirrored. With k blocks that is (k+1)/2k of the GEMM's work: 4 blocks from 256
// rows on, one below (smaller blocks make GEMMs too thin to gain; docs/benchmarks.md).
inline int64_t symmetric_block(int64_t n) {
  const int64_t k = n >= 256 ? 4 : 1;
  return (n + k - 1) / k;
}

// acc += a b on the blocks on and below the diagonal only (acc: n x n, zeros where unset).
inline void addmm_lower_(const Tensor& acc, const Tensor& a, const Tensor& b) {
  const int64_t n = a.size(0), block = symmetric_block(n);
  for (int64_t i = 0; i < n; i += block) {
    const int64_t rows = std::min(block, n - i);
    acc.narrow(0, i, rows).narrow(1, 0, i + rows).addmm_(a.narrow(0, i, rows), b.narrow(1, 0, i + rows));
  }
}

// Copies the blocks below the diagonal to the blocks above it (the block layout of addmm_lower_).
inline void mirror_lower_(const Tensor& t) {
  const int64_t n = t.size(0), block = symmetric_block(n);
  for (int64_t i = 0; i + block < n; i += block) {
    const int64_t rows = std::min(block, n - i), rest = n - i - rows;
    t.narrow(0, i, rows).narrow(1, i + rows, rest).copy_(t.narrow(0, i + rows, rest).narrow(1, i, rows).t());
  }
}

// out = a @ b for a product known to be symmetric (out: n x n, contiguous; the blocks on and
// below the diagonal written by the GEMM, the others mirrored).
inline void symmetric_mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t n = a.size(0), block = symmetric_block(n);
  for (int64_t i = 0; i < n; i += block) {
    const int64_t rows = std::min(block, n - i);
    Tensor lower = out.narrow(0, i, rows).narrow(1, 0, i + rows);
    at::mm_out(lower, a.narrow(0, i, rows), b.narrow(1, 0, i + rows));
  }
  mirror_lower_(out);
}


// One slot's sums over its tiles (see the comment at the top): weight and bias gradients per
// layer, forward mode's first-carry weight gradient in W^T's layout, and the Gram epilogues'
// dG = sum_b g_b S_b^T S_b (kGram1: dM = sum_b g_b d_b d_b^T; lower blocks only, see addmm_lower_).
// Undefined until a tile adds to it.
struct GradientSums {
  std::vector<Tensor> w, b;
  Tensor wt, gram;
  explicit GradientSums(int64_t layers) : w(layers), b(layers) {}
};

// What the backward reads and writes, for a tile of the carries' sweep (its rows of x, d, the
// carries, the incoming gradients) or for the MLP backward over the whole batch (x, h_1..h_{L-1},
// d, act'', grad_y, grad_x).
struct BackwardTile {
  int64_t n;
  std::vector<Tensor> hs, ds, d2s, cs;  // hs: h_0 = x, ..., h_{L-1}
  // The adjoints of d where act'' makes them matter (written by the carries' sweep, read by the
  // MLP backward); undefined elsewhere.
  std::vector<Tensor> adj_d;
  Tensor projections, grad_y, grad_sq, grad_jac, grad_x;
  std::vector<Tensor> grad_carries;  // undefined for none
  std::vector<Tensor> ts;  // forward mode with skips: T^(layer+1), ..., T^(L) (MLPJacobian::forward_ts)
  // The MLP backward's per-sample gradients of the conditioning, one per layer (undefined: none).
  std::vector<Tensor> grad_sample_biases, grad_gates;
};

template <class Kernels>
struct MLPJacobian {
  at::TensorList weights;
  at::TensorList biases;
  at::IntArrayRef activations;
  at::ArrayRef<double> act_params;
  int64_t layer;
  int64_t strategy;
  Tensor projections = Tensor();  // (B, k, m) random rows v: carry v^T J instead of J (estimator)
  std::vector<Tensor> masks = {};  // one per layer (undefined: none) or empty: see the top
  std::vector<int64_t> residual = {};  // per layer: the skip's j, or -1; empty without skips
  // Conditioning (see the top): per layer a (B, n_{i+1}) tensor or undefined; empty for none.
  std::vector<Tensor> sample_biases = {}, gates = {};

  int64_t depth() const { return static_cast<int64_t>(weights.size()); }
  int64_t width(int64_t i) const { return i == 0 ? weights[0].size(1) : weights[i - 1].size(0); }
  const Tensor& mask(int64_t i) const {
    static const Tensor none;
    return masks.empty() ? none : masks[i];
  }
  int64_t skip(int64_t i) const { return residual.empty() ? -1 : residual[i]; }
  const Tensor& sample_bias(int64_t i) const {
    static const Tensor none;
    return sample_biases.empty() ? none : sample_biases[i];
  }
  const Tensor& gate(int64_t i) const {
    static const Tensor none;
    return gates.empty() ? none : gates[i];
  }
  bool has_d(int64_t i) const { return has_derivative(activations[i]) || mask(i).defined() || gate(i).defined(); }
  bool has_d2(int64_t i) const { return has_curvature(activations[i]); }
  bool forward_mode() const { return strategy == kForward || strategy == kForwardGram; }
  bool gram_epilogue_mode() const { return strategy == kReverseGram || strategy == kForwardGram; }
  // The Gram epilogues replace the last GEMM: reverse carries stop at R^(last_carried), forward
  // carries at T^(last_forward).
  int64_t last_carried() const { return strategy == kReverseGram ? layer + 1 : layer; }
  int64_t last_forward() const { return strategy == kForwardGram ? depth() - 1 : depth(); }
  // Rows of the reverse carry: m, or k with projections.
  int64_t carried_rows() const { return projections.defined() ? projections.size(1) : width(depth()); }
  int64_t n_carries() const {
    return strategy == kGram1 ? 3 : forward_mode() ? depth() - layer - 1 : depth() - layer;
  }

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return Kernels::empty(sizes, options);
  }

  // out = c * x * cols * rows * sample (see Kernels::scale), a fresh (n, x.size(1), x.size(2)).
  Tensor scaled(const Tensor& x, const Tensor& cols, const Tensor& rows, const Tensor& sample, double c,
                int64_t n) const {
    Tensor out = empty({n, x.size(1), x.size(2)}, x.options());
    Kernels::scale(x, cols, rows, sample, c, out);
    return out;
  }
  // x * d (columns), or x itself where d is absent (an identity layer).
  Tensor scaled_columns(const Tensor& x, const Tensor& d) const {
    return d.defined() ? scaled(x, d, Tensor(), Tensor(), 1.0, x.size(0)) : x;
  }
  // The adjoint-style product c * g * x with g (n) per sample, or (n, k) per row (projections).
  Tensor scaled_by_loss(const Tensor& x, const Tensor& g, double c) const {
    return g.dim() == 2 ? scaled(x, Tensor(), g, Tensor(), c, g.size(0))
                        : scaled(x, Tensor(), Tensor(), g, c, g.size(0));
  }
  // d of layer i for n samples, ones for an identity layer (kGram1 multiplies by it).
  Tensor derivative_or_ones(const std::vector<Tensor>& ds, int64_t i, int64_t n,
                            const at::TensorOptions& options) const {
    return ds[i].defined() ? ds[i] : empty({n, width(i + 1)}, options).fill_(1);
  }

  // The `saved` outputs of the forward ops, allocated for the whole batch (layout at the top).
  struct Saved {
    std::vector<Tensor> ds, d2s, hidden, cs;
  };
  Saved allocate_saved(int64_t B, const at::TensorOptions& options) const {
    const int64_t L = depth(), rows = carried_rows();
    Saved s;
    for (const auto i : c10::irange(L)) {
      s.ds.push_back(has_d(i) ? empty({B, width(i + 1)}, options) : Tensor());
      s.d2s.push_back(has_d2(i) ? empty({B, width(i + 1)}, options) : Tensor());
      if (i > 0) s.hidden.push_back(empty({B, width(i)}, options));
    }
    if (strategy == kGram1) {
      const int64_t n1 = width(1);
      s.cs = {empty({n1, n1}, options), empty({n1, n1}, options), empty({B, n1}, options)};
    } else if (strategy == kForward) {
      for (int64_t i = layer + 2; i <= L; ++i) s.cs.push_back(empty({B, width(layer), width(i)}, options));
    } else if (strategy == kForwardGram) {
      for (int64_t i = 2; i < L; ++i) s.cs.push_back(empty({B, width(0), width(i)}, options));
      s.cs.push_back(empty({B, width(0), width(L - 1)}, options));
    } else {
      for (int64_t i = L - 1; i >= layer; --i) s.cs.push_back(empty({B, rows, width(i)}, options));
      if (strategy == kReverseGram) s.cs.back() = empty({B, rows, width(1)}, options);
    }
    return s;
  }
  static std::vector<Tensor> pack_saved(const Saved& s, const at::TensorOptions& options) {
    std::vector<Tensor> saved;
    for (const Tensor& d : s.ds) saved.push_back(undefined_to_absent(d, options));
    for (const Tensor& d2 : s.d2s) saved.push_back(undefined_to_absent(d2, options));
    saved.insert(saved.end(), s.hidden.begin(), s.hidden.end());
    saved.insert(saved.end(), s.cs.begin(), s.cs.end());
    return saved;
  }

  // The MLP on the whole batch: hs = h_0..h_L (h_L the output), each y_{i+1} = h_i W_i^T + b_i
  // (times the gate, plus the per-sample bias) written straight into h_{i+1}, then act, act' and
  // act'' in one pass, in place.
  void mlp_forward(const std::vector<Tensor>& hs, const std::vector<Tensor>& ds,
                   const std::vector<Tensor>& d2s) const {
    for (const auto i : c10::irange(depth())) {
      Tensor h = hs[i + 1];
      const Tensor& g = gate(i);
      if (g.defined()) {  // the gate scales the GEMM's output, before the bias
        Kernels::mm(h, hs[i], weights[i].t());
        h.mul_(g);
        if (auto b = bias_at(biases, i)) h.add_(*b);
      } else if (auto b = bias_at(biases, i)) {
        Kernels::addmm(h, *b, hs[i], weights[i].t());
      } else {
        Kernels::mm(h, hs[i], weights[i].t());
      }
      if (const Tensor& s = sample_bias(i); s.defined()) h.add_(s);
      if (has_derivative(activations[i])) {
        Kernels::activation_(h, ds[i], d2s[i], activations[i], act_params[2 * i], act_params[2 * i + 1]);
      }
      if (g.defined()) {  // D = diag(g * act'), and d's derivative in y g * act''
        if (has_derivative(activations[i])) {
          ds[i].mul_(g);
        } else {
          ds[i].copy_(g);
        }
        if (d2s[i].defined()) d2s[i].mul_(g);
      }
      if (const Tensor& m = mask(i); m.defined()) {  // D = diag(m * act'), curvature m * act''
        h.mul_(m);
        if (has_derivative(activations[i]) || g.defined()) {
          ds[i].mul_(m);
        } else {
          ds[i].copy_(m);
        }
        if (d2s[i].defined()) d2s[i].mul_(m);
      }
      if (const int64_t j = skip(i); j >= 0) h.add_(hs[j]);
    }
  }

  // One tile's reverse carries into cs: R^(L-1) = d[L-1] (rows) * W[L-1], or (V * d[L-1]) W[L-1]
  // with projections v; then R^(i) = (R^(i+1) * d[i]) W[i] down to R^(last_carried).
  // With skips, R^(i) += R^(k+1) for every skip (k, i) (see the top).
  void reverse_carries(const std::vector<Tensor>& ds, const std::vector<Tensor>& cs, const Tensor& v,
                       const Tensor& w_last) const {
    const int64_t L = depth();
    if (v.defined()) {
      Kernels::mm(flat(cs[0]), flat(scaled_columns(v, ds[L - 1])), weights[L - 1]);
    } else {
      Kernels::scale(w_last.unsqueeze(0), Tensor(), ds[L - 1], Tensor(), 1.0, cs[0]);
    }
    add_skipped_carries(L - 1, cs, v);
    for (int64_t i = L - 2, j = 1; i >= last_carried(); --i, ++j) {
      Kernels::mm(flat(cs[j]), flat(scaled_columns(cs[j - 1], ds[i])), weights[i]);
      add_skipped_carries(i, cs, v);
    }
  }

  // R^(i) (cs[L-1-i]) += R^(k+1) for each skip (k, i): cs[L-2-k], or for k = L-1 the top's
  // R^(L) = dy/dy = I (V with projections).
  void add_skipped_carries(int64_t i, const std::vector<Tensor>& cs, const Tensor& v) const {
    const int64_t L = depth();
    const Tensor& r = cs[L - 1 - i];
    for (int64_t k = i; k < L; ++k) {
      if (skip(k) != i) continue;
      if (k + 1 < L) {
        r.add_(cs[L - 2 - k]);
      } else if (v.defined()) {
        r.add_(v);
      } else {
        r.diagonal(0, 1, 2).add_(1);
      }
    }
  }

  // Forward mode: T^(layer+1) = W[layer]^T D_{layer+1} for n samples (wt = W[layer]^T, contiguous).
  Tensor first_forward_carry(const Tensor& wt, const std::vector<Tensor>& ds, int64_t n) const {
    return scaled(wt.unsqueeze(0), ds[layer], Tensor(), Tensor(), 1.0, n);
  }

  // One tile's forward carries into cs: U^(i+1) = T^(i) W[i]^T up to U^(last_forward).
  void forward_carries(const Tensor& wt, const std::vector<Tensor>& ds, const std::vector<Tensor>& cs,
                       int64_t n) const {
    std::vector<Tensor> ts;  // T^(layer+1), ..., kept for the skips only
    Tensor t = with_skip(layer, first_forward_carry(wt, ds, n), ts);
    for (int64_t i = layer + 1, j = 0; i < last_forward(); ++i, ++j) {
      if (!residual.empty()) ts.push_back(t);
      Kernels::mm(flat(cs[j]), flat(t), weights[i].t());
      if (i + 1 < last_forward()) t = with_skip(i, scaled_columns(cs[j], ds[i]), ts);
    }
  }

  // Forward mode with skips: t (T^(k+1) before the skip) plus T^(j) for a skip (k, j) with j >= layer:
  // ts[j - layer - 1], or I for j = layer (h_j below `layer` does not depend on h_layer). Out of
  // place: t may be a saved carry.
  Tensor with_skip(int64_t k, const Tensor& t, const std::vector<Tensor>& ts) const {
    const int64_t j = skip(k);
    if (j < layer) return t;
    if (j == layer) return t + at::eye(width(layer), t.options());
    return t + ts[j - layer - 1];
  }

  // Forward mode with skips: T^(layer+1), ..., T^(L) of a tile rebuilt from its saved U's
  // (T^(i) = U^(i) * d[i-1] plus the skip's T^(j); T^(layer+1) = W[layer]^T * d[layer]).
  std::vector<Tensor> forward_ts(const Tensor& wt, const std::vector<Tensor>& ds, const std::vector<Tensor>& cs,
                                 int64_t n) const {
    std::vector<Tensor> ts;
    for (int64_t i = layer + 1; i <= depth(); ++i) {
      Tensor t = i == layer + 1 ? first_forward_carry(wt, ds, n) : scaled_columns(cs[i - layer - 2], ds[i - 1]);
      ts.push_back(with_skip(i - 1, t, ts));
    }
    return ts;
  }

  // Forward mode: U^(L), the last carry before its scaling by d[L-1]. With a single layer after
  // `layer` there is no GEMM and U^(L) is W[layer]^T itself, the same for every sample.
  Tensor last_unscaled(const std::vector<Tensor>& cs, const Tensor& wt) const {
    return cs.empty() ? wt.unsqueeze(0) : cs.back();
  }

  // The Gram epilogues' input S for one tile: kReverseGram: S = R^(1) D_1 (n, rows, n_1), J = S W_1;
  // kForwardGram: S = T^(L-1) (n, n_0, n_{L-1}), J^T = S W_L^T.
  Tensor gram_input(const Tensor& wt, const std::vector<Tensor>& ds, const std::vector<Tensor>& cs,
                    int64_t n) const {
    const int64_t L = depth();
    if (strategy == kReverseGram) return scaled(cs[L - 2], ds[0], Tensor(), Tensor(), 1.0, n);
    return L - 1 == layer + 1 ? first_forward_carry(wt, ds, n)
                              : scaled(cs[L - 3], ds[L - 2], Tensor(), Tensor(), 1.0, n);
  }

  // Multiply-adds of the MLP's forward over n samples (its backward: about twice), and of the
  // Grams' full products (the backward's; the forward writes about half, the lower blocks): the
  // costs Kernels::side_by_side_pays weighs.
  double mlp_macs(int64_t n) const {
    double macs = 0;
    for (const auto i : c10::irange(depth())) macs += static_cast<double>(width(i)) * width(i + 1);
    return macs * n;
  }
  double gram_macs() const {
    const auto square = [](int64_t k) { return static_cast<double>(k) * k; };
    if (strategy == kGram1) return square(width(1)) * (width(0) + width(2));
    if (strategy == kReverseGram) return square(width(1)) * width(0);
    if (strategy == kForwardGram) return square(width(depth() - 1)) * width(depth());
    return 0;
  }

  // The sample-independent Gram of the epilogue: G = W_1 W_1^T (reverse) or H = W_L^T W_L.
  Tensor epilogue_gram() const {
    const Tensor& w = strategy == kReverseGram ? weights[0] : weights[depth() - 1];
    const Tensor a = strategy == kReverseGram ? w : w.t();
    Tensor gram = empty({a.size(0), a.size(0)}, w.options());
    symmetric_mm_out(gram, a, a.t());
    return gram;
  }

  // One tile of ||J||_F^2 (or ||v_i^T J||^2 per projected row) into sq; cs are the tile's carries
  // (their last entry receives P for the Gram epilogues and M d for kGram1).
  void frobenius_tile(const std::vector<Tensor>& ds, const std::vector<Tensor>& cs, const Tensor& v,
                      const Tensor& wt, const Tensor& w_last, const Tensor& gram, const Tensor& sq) const {
    const int64_t n = sq.size(0), L = depth();
    if (strategy == kGram1) {
      Tensor d = derivative_or_ones(ds, 0, n, sq.options());
      Kernels::mm(cs[2], d, gram);  // M is symmetric: rows of D M are (M d_b)^T
      Kernels::pair_sum(cs[2].unsqueeze(1), d.unsqueeze(1), sq);
      return;
    }
    if (forward_mode()) {
      forward_carries(wt, ds, cs, n);
    } else {
      reverse_carries(ds, cs, v, w_last);
    }
    if (gram_epilogue_mode()) {
      Tensor s = gram_input(wt, ds, cs, n);
      Kernels::mm(flat(cs.back()), flat(s), gram);
      Kernels::pair_sum(cs.back(), s, sq);
    } else if (forward_mode() && !residual.empty()) {
      Kernels::square_sum(forward_ts(wt, ds, cs, n).back(), Tensor(), sq);
    } else if (forward_mode()) {  // the last diagonal scaling happens inside the reduction
      Kernels::square_sum(last_unscaled(cs, wt), ds[L - 1], sq);
    } else {
      Kernels::square_sum(cs.back(), Tensor(), sq);
    }
  }

  // Whether the carries' sweep writes the adjoint of d[i] (of every layer from `layer` up with
  // act'' or a gate, when any gradient reaches the carries).
  bool has_adj_d(int64_t i) const { return i >= layer && (has_d2(i) || gate(i).defined()); }

  // One tile of the backward's carries (the comment above mlp_jacobian_backward): their weight
  // gradients added to `sums`, the adjoints of d written into t.adj_d.
  void carries_backward_tile(BackwardTile& t, GradientSums& sums, const Tensor& wt, const Tensor& w_last) const {
    const int64_t L = depth(), n = t.n;
    const auto options = w_last.options();
    std::vector<Tensor>& adj_d = t.adj_d;
    const Tensor& g = t.grad_sq;
    // The loss's 2 g times a saved carry: left to the sweep's first pass where g is per sample.
    auto loss_adjoint = [&](const Tensor& carry, const Tensor& cols) {
      return g.dim() == 1 ? SweepAdjoint{carry, cols, g, 2.0} : SweepAdjoint{scaled_by_loss(carry, g, 2.0)};
    };
    // The caller runs this only where a gradient reaches the carries (g, grad_jac or a carry's).
    if (strategy == kGram1) {
      if (g.defined()) {
        // sum_b g_b d_b^T M d_b: d/dd_b = 2 g_b M d_b; dM = sum_b g_b d_b d_b^T (weights: at the end)
        Tensor d = derivative_or_ones(t.ds, 0, n, options);
        if (adj_d[0].defined()) Kernels::scale(t.cs[2].unsqueeze(1), Tensor(), Tensor(), g, 2.0, adj_d[0].unsqueeze(1));
        add_mm_lower(sums.gram, scaled_by_loss(d.unsqueeze(1), g, 1.0).squeeze(1).t(), d);
      }
    } else if (gram_epilogue_mode()) {
      // sum_b g_b tr(S_b G S_b^T): d/dS_b = 2 g_b P_b, dG = sum_b g_b S_b^T S_b. mlp_jacobian's
      // J J^T = S G S^T with gradient A: d/dS_b = (A_b + A_b^T) P_b, dG = sum_b S_b^T sym(A_b) S_b
      // with sym(A) = (A + A^T) / 2. (The weights' share of dG: at the end.)
      Tensor s = gram_input(wt, t.ds, t.cs, n);
      SweepAdjoint adj;
      if (g.defined()) {
        add_mm_lower(sums.gram, flat(scaled_by_loss(s, g, 1.0)).t(), flat(s));
        adj = loss_adjoint(t.cs.back(), Tensor());
      }
      if (t.grad_jac.defined()) {
        Tensor sym = (t.grad_jac + t.grad_jac.transpose(1, 2)).mul_(0.5);
        add_mm_lower(sums.gram, flat(s).t(), flat(at::bmm(sym, s)));
        Tensor term = at::bmm(sym, t.cs.back()).mul_(2.0);
        adj = {adj.x.defined() ? written(adj).add_(term) : term};
      }
      if (!adj.x.defined()) adj = {empty(s.sizes(), options).zero_()};  // only carry gradients
      carry_backward(adj, t, sums, adj_d, wt, w_last);
    } else {
      // The adjoint of the final carry: J (reverse) or J^T = U^(L) D_L (forward; U^(L) is W^T, the
      // same for every sample, where no GEMM formed it).
      SweepAdjoint adj;
      if (forward_mode() && !residual.empty()) t.ts = forward_ts(wt, t.ds, t.cs, n);
      if (g.defined() && !t.ts.empty()) {  // J^T = T^(L), the skips in it
        adj = loss_adjoint(t.ts.back(), Tensor());
      } else if (g.defined()) {
        const Tensor last = forward_mode() ? last_unscaled(t.cs, wt) : t.cs.back();
        adj = last.size(0) != n ? SweepAdjoint{scaled(last, t.ds[L - 1], Tensor(), g, 2.0, n)}
                                : loss_adjoint(last, forward_mode() ? t.ds[L - 1] : Tensor());
      }
      auto accumulate = [&](const Tensor& term) {
        if (adj.x.defined()) {
          adj = {written(adj).add_(term)};
        } else {
          adj = {empty(term.sizes(), options).copy_(term)};
        }
      };
      if (t.grad_jac.defined()) accumulate(forward_mode() ? t.grad_jac.transpose(1, 2) : t.grad_jac);
      if (!t.grad_carries.empty() && t.grad_carries.back().defined()) accumulate(t.grad_carries.back());
      if (!adj.x.defined()) adj = {empty(t.cs.back().sizes(), options).zero_()};
      carry_backward(adj, t, sums, adj_d, wt, w_last);
    }
  }

  // The adjoint a sweep receives: c * x * cols * sample (undefined factors are 1). With factors,
  // x is a saved carry (the loss's 2 g times it: not yet written out, so that the sweep's first pass
  // through a diagonal writes it, Kernels::rowwise_dot_scale: one pass, not two); without, x is the
  // sweep's own and is scaled in place.
  struct SweepAdjoint {
    Tensor x, cols, sample;
    double c = 1.0;
    bool pending() const { return cols.defined() || sample.defined() || c != 1.0; }
  };
  // The adjoint written out (a GEMM's input, or a term to add to).
  Tensor written(const SweepAdjoint& adj) const {
    return adj.pending() ? scaled(adj.x, adj.cols, Tensor(), adj.sample, adj.c, adj.x.size(0)) : adj.x;
  }
  // The step back through a diagonal d: adj_d = sum_r r * adj (where out_adj_d is defined), adj *= d;
  // returns the adjoint, written out.
  Tensor through_diagonal(const SweepAdjoint& adj, const Tensor& r, const Tensor& d, const Tensor& out_adj_d) const {
    Tensor out = adj.pending() ? empty(adj.x.sizes(), adj.x.options()) : adj.x;
    Kernels::rowwise_dot_scale(r, adj.x, adj.cols, adj.sample, adj.c, d, out_adj_d, out);
    return out;
  }

  // acc += a b (acc allocated by the first product).
  void add_mm(Tensor& acc, const Tensor& a, const Tensor& b) const { Kernels::add_mm(acc, a, b); }
  // acc += a b, symmetric: the lower blocks only (mirrored once all tiles are summed).
  void add_mm_lower(Tensor& acc, const Tensor& a, const Tensor& b) const {
    if (!acc.defined()) acc = empty({a.size(0), a.size(0)}, a.options()).zero_();
    addmm_lower_(acc, a, b);
  }
  Tensor& zeroed(Tensor& acc, at::IntArrayRef sizes, const at::TensorOptions& options) const {
    if (!acc.defined()) acc = empty(sizes, options).zero_();
    return acc;
  }

  // Adjoint sweep over one tile: given the adjoint of the final carry (for the Gram epilogues: of
  // S), add the weight gradients of the carries to `sums` and set the adjoints of d[layer..] that
  // act'' needs (adj_d).
  void carry_backward(SweepAdjoint start, BackwardTile& t, GradientSums& sums, std::vector<Tensor>& adj_d,
                      const Tensor& wt, const Tensor& w_last) const {
    const int64_t L = depth(), n = t.n;
    const auto& ds = t.ds;
    const auto& cs = t.cs;
    const auto options = start.x.options();
    auto new_adj_d = [&](int64_t i) {  // the tile's rows of the adjoint of d[i], or none
      TORCH_INTERNAL_ASSERT(adj_d[i].defined() == has_adj_d(i));
      return adj_d[i];
    };
    Tensor adj;  // written out, the sweep's own
    if (!forward_mode()) {
      // cs[j] = R^(L-1-j); R^(i) = S^(i+1) W[i] with S^(i+1) = R^(i+1) * d[i] (+ the skipped
      // carries R^(k+1), whose adjoints gain R^(i)'s: pending[k+1] until the sweep reaches them).
      std::vector<Tensor> pending(residual.empty() ? 0 : L);
      for (int64_t i = layer; i <= L - 2; ++i) {
        const Tensor& r_next = cs[L - 2 - i];
        if (strategy == kReverseGram && i == layer) {  // the sweep starts with the adjoint of S^(layer+1)
          adj = through_diagonal(start, r_next, ds[i], new_adj_d(i));
        } else {
          if (i == layer) adj = written(start);
          for (int64_t k = i; k + 1 < L && !pending.empty(); ++k) {
            if (skip(k) != i) continue;
            if (pending[k + 1].defined()) {
              pending[k + 1].add_(adj);
            } else {
              pending[k + 1] = adj.clone();
            }
          }
          add_mm(sums.w[i], flat(scaled_columns(r_next, ds[i])).t(), flat(adj));
          Tensor adj_s = empty({n, adj.size(1), width(i + 1)}, options);
          Kernels::mm(flat(adj_s), flat(adj), weights[i].t());
          adj = through_diagonal({adj_s}, r_next, ds[i], new_adj_d(i));  // R^(i+1)'s adjoint
        }
        if (!t.grad_carries.empty() && t.grad_carries[L - 2 - i].defined()) adj.add_(t.grad_carries[L - 2 - i]);
        if (!pending.empty() && pending[i + 1].defined()) adj.add_(pending[i + 1]);
      }
      if (!adj.defined()) adj = written(start);  // no layer below L-1
      if (t.projections.defined()) {  // R^(L-1) = (V * d[L-1]) W[L-1]
        add_mm(sums.w[L - 1], flat(scaled_columns(t.projections, ds[L - 1])).t(), flat(adj));
        if (Tensor out = new_adj_d(L - 1); out.defined()) {
          Tensor adj_vd = empty(t.projections.sizes(), options);
          Kernels::mm(flat(adj_vd), flat(adj), weights[L - 1].t());
          through_diagonal({adj_vd}, t.projections, Tensor(), out);
        }
      } else {  // R^(L-1) = d[L-1] (rows) * W[L-1]
        if (Tensor out = new_adj_d(L - 1); out.defined()) {
          Kernels::pair_sum(adj, w_last.unsqueeze(0), out);
        }
        Kernels::batch_sum_(zeroed(sums.w[L - 1], w_last.sizes(), options), adj, Tensor(), ds[L - 1]);
      }
    } else {
      // cs[j] = U^(layer+2+j); T^(i) = U^(i) * d[i-1], U^(i+1) = T^(i) W[i]^T; start: T^(last_forward)'s.
      // A skip T^(i) += T^(j) (j > layer; T^(layer) = I is constant) passes T^(i)'s adjoint on to
      // T^(j): pending[j] until the sweep reaches it.
      std::vector<Tensor> pending(residual.empty() ? 0 : L + 1);
      SweepAdjoint next = start;
      for (int64_t i = last_forward(); i >= layer + 2; --i) {
        if (const int64_t j = skip(i - 1); j > layer) {
          next = {written(next)};
          pending[j] = pending[j].defined() ? pending[j].add_(next.x) : next.x.clone();
        }
        adj = through_diagonal(next, cs[i - layer - 2], ds[i - 1], new_adj_d(i - 1));  // U^(i)'s adjoint
        Tensor t_prev = !t.ts.empty()          ? t.ts[i - layer - 2]
                        : i - 1 == layer + 1 ? first_forward_carry(wt, ds, n)
                                             : scaled_columns(cs[i - layer - 3], ds[i - 2]);
        add_mm(sums.w[i - 1], flat(adj).t(), flat(t_prev));
        Tensor adj_t = empty({n, adj.size(1), width(i - 1)}, options);
        Kernels::mm(flat(adj_t), flat(adj), weights[i - 1]);
        if (!pending.empty() && pending[i - 1].defined()) adj_t.add_(pending[i - 1]);
        next = {adj_t};
      }
      adj = written(next);
      // T^(layer+1) = W[layer]^T * d[layer] (columns).
      if (Tensor out = new_adj_d(layer); out.defined()) through_diagonal({adj}, wt.unsqueeze(0), Tensor(), out);
      Kernels::batch_sum_(zeroed(sums.wt, wt.sizes(), options), adj, ds[layer], Tensor());
    }
  }

  // The MLP's own backward (over the whole batch, t.n = B): d/dy_{i+1} = grad_h * d[i] +
  // adj_d[i] * act''[i], its bias gradient in the same pass; it stops where nothing flows (grad_h
  // and adj_d absent).
  void mlp_backward(BackwardTile& t, GradientSums& sums) const {
    const int64_t n = t.n;
    const std::vector<Tensor>& adj_d = t.adj_d;
    const auto options = t.hs[0].options();
    Tensor grad_h = t.grad_y;
    bool wrote_grad_x = false;
    // A skip h_{i+1} += h_j passes the adjoint of h_{i+1} to h_j too: pending[j] until the sweep
    // reaches h_j (out of place: grad_h may be the caller's grad_y).
    std::vector<Tensor> pending(residual.empty() ? 0 : depth() + 1);
    for (int64_t i = depth() - 1; i >= 0; --i) {
      if (!pending.empty() && pending[i + 1].defined()) {
        grad_h = grad_h.defined() ? grad_h + pending[i + 1] : pending[i + 1];
      }
      if (const int64_t j = skip(i); j >= 0 && grad_h.defined()) {
        pending[j] = pending[j].defined() ? pending[j] + grad_h : grad_h;
      }
      if (!grad_h.defined() && !adj_d[i].defined()) continue;  // zero: nothing reaches the layers below
      Tensor grad_b = bias_at(biases, i) ? zeroed(sums.b[i], {width(i + 1)}, options) : Tensor();
      Tensor g;
      if (gate(i).defined()) {
        g = gated_delta(i, t, grad_h, grad_b);
      } else {
        g = empty({n, width(i + 1)}, options);
        Kernels::mlp_delta(grad_h, t.ds[i], adj_d[i], t.d2s[i], g, grad_b);
        if (t.grad_sample_biases[i].defined()) t.grad_sample_biases[i].copy_(g);  // d/ds = d/dy
      }
      add_mm(sums.w[i], g.t(), t.hs[i]);
      if (i > 0) {
        grad_h = empty({n, width(i)}, options);
        Kernels::mm(grad_h, g, weights[i]);
      } else if (t.grad_x.defined()) {
        Kernels::mm(t.grad_x, g, weights[0]);
        wrote_grad_x = true;
      }
    }
    if (t.grad_x.defined() && !wrote_grad_x) t.grad_x.zero_();
    if (t.grad_x.defined() && !pending.empty() && pending[0].defined()) t.grad_x.add_(pending[0]);
  }

  // A gated layer's step of the MLP backward (the formulas at the top), in ATen ops on both devices:
  // writes the per-sample gradients of its gate and bias (where given), adds the batch sum of ybar
  // to grad_b (where defined) and returns ybar * g, the GEMMs' input. u = h_i W_i^T and act'(y),
  // act''(y) are recomputed: the saved d and act'' carry the gate, which cannot be divided out (g may
  // be 0).
  Tensor gated_delta(int64_t i, const BackwardTile& t, const Tensor& grad_h, const Tensor& grad_b) const {
    const Tensor& g = gate(i);
    const Tensor& m = mask(i);
    const Tensor& adj = t.adj_d[i];
    const int64_t code = activations[i];
    Tensor u = at::mm(t.hs[i], weights[i].t());
    Tensor d1, d2;  // m * act'(y) and m * act''(y); undefined for 1 and 0
    if (has_derivative(code)) {
      Tensor y = u * g;
      if (auto b = bias_at(biases, i)) y.add_(*b);
      if (const Tensor& s = sample_bias(i); s.defined()) y.add_(s);
      d1 = at::empty_like(y);
      d2 = has_d2(i) ? at::empty_like(y) : Tensor();
      Kernels::activation_(y, d1, d2, code, act_params[2 * i], act_params[2 * i + 1]);
      if (m.defined()) {
        d1.mul_(m);
        if (d2.defined()) d2.mul_(m);
      }
    } else if (m.defined()) {
      d1 = m;
    }
    Tensor ybar = !grad_h.defined() ? at::zeros_like(u) : d1.defined() ? grad_h * d1 : grad_h.clone();
    if (adj.defined() && d2.defined()) ybar.add_(adj * g * d2);
    if (Tensor out = t.grad_gates[i]; out.defined()) {
      at::mul_out(out, ybar, u);
      if (adj.defined()) out.add_(d1.defined() ? adj * d1 : adj);
    }
    if (const Tensor& out = t.grad_sample_biases[i]; out.defined()) out.copy_(ybar);
    if (grad_b.defined()) grad_b.add_(ybar.sum(0));
    return ybar.mul_(g);
  }
};

// The gates (checked_conditioning); a gate on the last layer is a diagonal factor there, like a mask:
// strategies 3 and 4 need a linear output layer.
inline std::vector<Tensor> checked_gates(const std::optional<at::TensorList>& gates, const Tensor& x,
                                         at::TensorList weights, int64_t strategy) {
  std::vector<Tensor> out = checked_conditioning(gates, x, weights, "gates");
  TORCH_CHECK(!out.back().defined() || (strategy != kGram1 && strategy != kForwardGram),
              "jacext: strategies 3 and 4 need a linear output layer, and a gate on the last layer is a "
              "per-sample diagonal factor there; use strategy 0, 1 or 2");
  return out;
}

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

// The per-sample diagonal factors: none (an empty list) or one per layer, each (B, n_{i+1}) like
// the layer's output or an empty tensor for none; undefined in the algorithms where absent.
// Strategies 3 and 4 need a linear output layer: a mask on it is a diagonal there.
inline std::vector<Tensor> checked_masks(at::TensorList masks, const Tensor& x, at::TensorList weights,
                                         int64_t strategy) {
  if (masks.empty()) return {};
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(masks.size()) == L, "jacext: expected no masks or one per layer (", L,
              ", an empty tensor for none), got ", masks.size());
  std::vector<Tensor> out;
  for (const auto i : c10::irange(L)) {
    const Tensor& m = masks[i];
    if (!m.defined() || (m.numel() == 0 && m.dim() == 1)) {
      out.push_back(Tensor());
      continue;
    }
    TORCH_CHECK(m.dim() == 2 && m.size(0) == x.size(0) && m.size(1) == weights[i].size(0), "jacext: mask ", i,
                " must have shape (batch=", x.size(0), ", ", weights[i].size(0), "), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == x.scalar_type() && m.device() == x.device(), "jacext: mask ", i,
                " must match x's dtype and device, got ", m.scalar_type(), " on ", m.device());
    out.push_back(m.contiguous());
  }
  TORCH_CHECK(!out[L - 1].defined() || (strategy != kGram1 && strategy != kForwardGram),
              "jacext: strategies 3 and 4 need a linear output layer, and a mask on the last layer is a "
              "diagonal factor there; use strategy 0, 1 or 2");
  return out;
}

// The residual skips (checked_residual); only strategies 0 and 1 take them (see the top).
inline std::vector<int64_t> checked_skips(at::OptionalIntArrayRef residual, at::TensorList weights,
                                          int64_t strategy) {
  std::vector<int64_t> skips = checked_residual(residual, weights);
  TORCH_CHECK(skips.empty() || strategy == kReverse || strategy == kForward, "jacext: with residual skips the "
              "Jacobian ops carry in reverse or forward (strategy 0 or 1): the Gram forms (2-4) do not apply "
              "across a skip, got strategy ", strategy);
  return skips;
}

// h_0 = x, h_1..h_{L-1}, h_L = y: the MLP's layers, for mlp_forward / mlp_backward.
inline std::vector<Tensor> whole_batch_hs(const Tensor& x, const std::vector<Tensor>& hidden, const Tensor& y) {
  std::vector<Tensor> hs = {x};
  hs.insert(hs.end(), hidden.begin(), hidden.end());
  if (y.defined()) hs.push_back(y);
  return hs;
}

// y = mlp(x), sq (B) = ||J||_F^2 (or (B, k) per projected row) and `saved`: the MLP on the whole
// batch, the carries tile by tile.
template <class Kernels>
std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_jacobian_frobenius(
    const Tensor& x, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t strategy,
    const std::optional<Tensor>& projections, const std::optional<at::TensorList>& masks,
    const std::optional<at::TensorList>& sample_biases, const std::optional<at::TensorList>& gates, int64_t tile,
    at::OptionalIntArrayRef residual) {
  check_mlp(x, weights, biases, activations, act_params, 0, strategy);
  check_tile(tile);
  MLPJacobian<Kernels> net{weights, biases, activations, act_params, 0, strategy,
                           checked_projections(projections, x, weights, strategy),
                           checked_masks(masks.value_or(at::TensorList()), x, weights, strategy),
                           checked_skips(residual, weights, strategy),
                           checked_conditioning(sample_biases, x, weights, "sample_biases"),
                           checked_gates(gates, x, weights, strategy)};
  const int64_t B = x.size(0), L = net.depth();
  const auto options = x.options();
  Tensor y = net.empty({B, net.width(L)}, options);
  Tensor sq = net.projections.defined() ? net.empty({B, net.carried_rows()}, options) : net.empty({B}, options);
  auto saved = net.allocate_saved(B, options);
  // What every tile shares, once per call: the Grams, W^T for forward mode's first carry, and
  // the last weight contiguous for the reverse mode's first carry.
  Tensor gram, wt, w_last = weights[L - 1].contiguous();
  auto grams = [&] {
    if (strategy == kGram1) {
      symmetric_mm_out(saved.cs[0], weights[0], weights[0].t());
      symmetric_mm_out(saved.cs[1], weights[1].t(), weights[1]);
      gram = saved.cs[0] * saved.cs[1];
    } else if (net.gram_epilogue_mode()) {
      gram = net.epilogue_gram();
    }
  };
  if (net.forward_mode()) wt = weights[0].t().contiguous();
  std::vector<Tensor> per_sample_cs(saved.cs.begin() + (strategy == kGram1 ? 2 : 0), saved.cs.end());
  auto mlp = [&] { net.mlp_forward(whole_batch_hs(x, saved.hidden, y), saved.ds, saved.d2s); };
  Kernels::side_by_side(Kernels::side_by_side_pays(net.mlp_macs(B), net.gram_macs() / 2), mlp, grams);
  Kernels::for_tiles(B, tile, [&](int64_t /*slot*/, int64_t b0, int64_t n) {
    std::vector<Tensor> ds = batch_rows(saved.ds, b0, n);
    std::vector<Tensor> cs = batch_rows(per_sample_cs, b0, n);
    if (strategy == kGram1) cs.insert(cs.begin(), {saved.cs[0], saved.cs[1]});
    Tensor v = net.projections.defined() ? net.projections.narrow(0, b0, n) : Tensor();
    net.frobenius_tile(ds, cs, v, wt, w_last, gram, sq.narrow(0, b0, n));
  });
  return {y, sq, net.pack_saved(saved, options)};
}

// y = mlp(x), jac[b] = d y_b / d h_layer,b (B, m, n_layer) and `saved`, the carries tile by tile; with gram
// (strategy kReverseGram, layer 0), jac[b] = J_b J_b^T (B, m, m) by the Gram epilogue instead:
// S G S^T with G = W_1 W_1^T once per batch, m n_1^2 instead of m n_1 n_0 multiply-adds per sample.
template <class Kernels>
std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_jacobian(
    const Tensor& x, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t layer,
    int64_t strategy, const std::optional<at::TensorList>& masks, const std::optional<at::TensorList>& sample_biases,
    const std::optional<at::TensorList>& gates, int64_t tile, bool gram, at::OptionalIntArrayRef residual) {
  check_mlp(x, weights, biases, activations, act_params, layer, strategy);
  check_tile(tile);
  TORCH_CHECK(gram ? strategy == kReverseGram : (strategy == kReverse || strategy == kForward),
              "jacext: mlp_jacobian forms J with strategy 0 or 1, and J J^T at the input with strategy 2 and "
              "gram=True; otherwise strategies 2, 3 and 4 (Gram) are for the Frobenius norm only");
  MLPJacobian<Kernels> net{weights, biases, activations, act_params, layer, strategy, Tensor(),
                           checked_masks(masks.value_or(at::TensorList()), x, weights, strategy),
                           checked_skips(residual, weights, strategy),
                           checked_conditioning(sample_biases, x, weights, "sample_biases"),
                           checked_gates(gates, x, weights, strategy)};
  const int64_t B = x.size(0), L = net.depth(), m = net.width(L);
  const auto options = x.options();  // gram: J J^T = S G S^T, J itself is never formed
  Tensor y = net.empty({B, m}, options);
  Tensor jac = net.empty({B, m, gram ? m : net.width(layer)}, options);
  auto saved = net.allocate_saved(B, options);
  Tensor wt = net.forward_mode() ? weights[layer].t().contiguous() : Tensor();
  Tensor w_last = weights[L - 1].contiguous();
  Tensor g;
  auto mlp = [&] { net.mlp_forward(whole_batch_hs(x, saved.hidden, y), saved.ds, saved.d2s); };
  Kernels::side_by_side(Kernels::side_by_side_pays(net.mlp_macs(B), net.gram_macs() / 2), mlp, [&] {
    if (gram) g = net.epilogue_gram();
  });
  Kernels::for_tiles(B, tile, [&](int64_t /*slot*/, int64_t b0, int64_t n) {
    std::vector<Tensor> ds = batch_rows(saved.ds, b0, n);
    std::vector<Tensor> cs = batch_rows(saved.cs, b0, n);
    Tensor jac_tile = jac.narrow(0, b0, n);
    if (net.forward_mode()) {
      net.forward_carries(wt, ds, cs, n);
      Tensor jt = net.residual.empty() ? net.scaled(net.last_unscaled(cs, wt), ds[L - 1], Tensor(), Tensor(), 1.0, n)
                                       : net.forward_ts(wt, ds, cs, n).back();
      jac_tile.copy_(jt.transpose(1, 2));
    } else if (gram) {
      net.reverse_carries(ds, cs, Tensor(), w_last);
      Tensor s = net.gram_input(wt, ds, cs, n);
      Kernels::mm(flat(cs.back()), flat(s), g);  // P = S G, saved
      at::bmm_out(jac_tile, cs.back(), s.transpose(1, 2));
    } else {
      net.reverse_carries(ds, cs, Tensor(), w_last);
      jac_tile.copy_(cs.back());
    }
  });
  return {y, jac, net.pack_saved(saved, options)};
}

// Gradients of  sum(grad_y * y) + sum(grad_sq * ||J||_F^2) + sum(grad_jac * J)
// + sum(grad_carries * carries)  w.r.t. x (when input_grad; else undefined), the weights, the
// biases (an empty tensor for a layer without bias) and, per sample, the per-sample biases and gates
// (an empty tensor for a layer without), tile by tile: each slot sums its tiles'
// weight gradients, and the sums (and the Grams' weight gradients) are added up at the end.
template <class Kernels>
std::tuple<std::optional<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
mlp_jacobian_backward(
    const std::optional<Tensor>& grad_y, const std::optional<Tensor>& grad_sq,
    const std::optional<Tensor>& grad_jac, const Tensor& x, at::TensorList weights,
    at::TensorList biases, at::IntArrayRef activations, at::ArrayRef<double> act_params,
    int64_t layer, int64_t strategy, at::TensorList saved, at::TensorList grad_carries,
    const std::optional<Tensor>& projections, const std::optional<at::TensorList>& masks,
    const std::optional<at::TensorList>& sample_biases, const std::optional<at::TensorList>& gates, int64_t tile,
    bool input_grad, at::OptionalIntArrayRef residual) {
  check_mlp(x, weights, biases, activations, act_params, layer, strategy);
  check_tile(tile);
  // The masks only decide which layers have a d (an identity layer with a mask): the saved d and
  // act'' carry them already. The gates and per-sample biases: gated_delta.
  MLPJacobian<Kernels> net{weights, biases, activations, act_params, layer, strategy,
                           checked_projections(projections, x, weights, strategy),
                           checked_masks(masks.value_or(at::TensorList()), x, weights, strategy),
                           checked_skips(residual, weights, strategy),
                           checked_conditioning(sample_biases, x, weights, "sample_biases"),
                           checked_gates(gates, x, weights, strategy)};
  const int64_t L = net.depth(), B = x.size(0);
  const auto options = x.options();
  const int64_t n_carries = net.n_carries();
  const int64_t n_saved = 3 * L - 1 + n_carries;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == n_saved, "jacext: expected ", n_saved,
              " saved tensors, got ", saved.size());
  std::vector<Tensor> ds, d2s;
  for (const auto i : c10::irange(L)) {
    ds.push_back(absent_to_undefined(saved[i]));
    d2s.push_back(absent_to_undefined(saved[L + i]));
    TORCH_CHECK(ds[i].defined() == net.has_d(i) && d2s[i].defined() == net.has_d2(i),
                "jacext: the saved activation derivatives of layer ", i, " do not match its activation");
  }
  std::vector<Tensor> hidden(saved.begin() + 2 * L, saved.begin() + 3 * L - 1);
  std::vector<Tensor> cs(saved.begin() + 3 * L - 1, saved.end());

  const bool has_sq = grad_sq.has_value() && grad_sq->defined();
  const bool has_jac = grad_jac.has_value() && grad_jac->defined();
  TORCH_CHECK(strategy == kReverse || strategy == kForward || strategy == kReverseGram || !has_jac,
              "jacext: strategies 3 and 4 (Gram) never form J, so J has no gradient");
  TORCH_CHECK(!net.projections.defined() || !has_jac,
              "jacext: with projections the op returns norms only, so J has no gradient");
  // grad_carries: gradients w.r.t. the reverse carries R^(L-1), ..., R^(layer) (= dy/dh_i, the
  // Jacobians at the layers above `layer`), an empty tensor for none; an empty list for none at all.
  std::vector<Tensor> carry_grads;
  if (!grad_carries.empty()) {
    TORCH_CHECK((strategy == kReverse || strategy == kReverseGram) && !net.projections.defined(),
                "jacext: carry gradients need strategy 0 or 2 (reverse) without projections");
    TORCH_CHECK(strategy != kReverseGram || (!grad_carries.empty() && !grad_carries.back().numel()),
                "jacext: with strategy 2 the last saved carry is P = S G, not a Jacobian: it takes no gradient");
    TORCH_CHECK(static_cast<int64_t>(grad_carries.size()) == n_carries, "jacext: expected ", n_carries,
                " carry gradients (an empty tensor for none), got ", grad_carries.size());
    for (const auto j : c10::irange(n_carries)) {
      if (!grad_carries[j].numel()) {
        carry_grads.push_back(Tensor());
        continue;
      }
      TORCH_CHECK(grad_carries[j].sizes() == cs[j].sizes(), "jacext: carry gradient ", j,
                  " must have shape ", cs[j].sizes(), ", got ", grad_carries[j].sizes());
      carry_grads.push_back(grad_carries[j]);
    }
  }
  Tensor wt = net.forward_mode() ? weights[layer].t().contiguous() : Tensor();
  Tensor w_last = weights[L - 1].contiguous();
  Tensor grad_x = input_grad ? net.empty(x.sizes(), options) : Tensor();
  // kGram1's G1 and G2 are sample-independent: not cut into tiles.
  const int64_t shared_carries = strategy == kGram1 ? 2 : 0;
  std::vector<Tensor> per_sample_cs(cs.begin() + shared_carries, cs.end());
  std::vector<GradientSums> sums(Kernels::sum_slots(B, tile), GradientSums(L));
  // The carries' sweep, tile by tile, where a gradient reaches them: their weight gradients and
  // the adjoints of d (for the whole batch, read by the MLP backward below).
  std::vector<Tensor> adj_d(L);
  const bool carries_reached = has_sq || has_jac || std::any_of(carry_grads.begin(), carry_grads.end(),
                                                                  [](const Tensor& g) { return g.defined(); });
  if (carries_reached) {
    for (const auto i : c10::irange(L)) {
      if (net.has_adj_d(i)) adj_d[i] = net.empty({B, net.width(i + 1)}, options);
    }
    Kernels::for_tiles(B, tile, [&](int64_t slot, int64_t b0, int64_t n) {
      BackwardTile t;
      t.n = n;
      t.ds = batch_rows(ds, b0, n);
      t.cs = batch_rows(per_sample_cs, b0, n);
      if (strategy == kGram1) t.cs.insert(t.cs.begin(), {cs[0], cs[1]});
      if (net.projections.defined()) t.projections = net.projections.narrow(0, b0, n);
      if (has_sq) t.grad_sq = grad_sq->narrow(0, b0, n);
      if (has_jac) t.grad_jac = grad_jac->narrow(0, b0, n);
      t.grad_carries = batch_rows(carry_grads, b0, n);
      t.adj_d = batch_rows(adj_d, b0, n);
      net.carries_backward_tile(t, sums[slot], wt, w_last);
    });
  }
  // Add up the slots' sums in their order; a layer nothing reached gets zeros.
  auto total = [&](auto member, int64_t i, at::IntArrayRef sizes) {
    Tensor out;
    for (GradientSums& s : sums) {
      Tensor& part = (s.*member)[i];
      if (!part.defined()) continue;
      if (out.defined()) {
        out.add_(part);
      } else {
        out = part;
      }
    }
    return out.defined() ? out : net.empty(sizes, options).zero_();
  };
  auto total_of = [&](Tensor GradientSums::*member) {
    Tensor out;
    for (GradientSums& s : sums) {
      if (!(s.*member).defined()) continue;
      if (out.defined()) {
        out.add_(s.*member);
      } else {
        out = s.*member;
      }
    }
    return out;
  };
  // The MLP backward on the whole batch (its weight gradients into the first slot's sums) and
  // the Grams' share of the weight gradients: side by side where that pays, the Grams' products
  // then into sums of their own; in turn otherwise, accumulated into the MLP's (no extra pass).
  const bool beside = Kernels::side_by_side_pays(2 * net.mlp_macs(B), net.gram_macs());
  GradientSums& gram_sums = beside ? sums.emplace_back(L) : sums[0];
  auto gram_grads = [&] {
    Tensor dgram = total_of(&GradientSums::gram);
    if (!dgram.defined()) return;
    mirror_lower_(dgram);
    dgram.mul_(2.0);  // the Grams' gradients below all carry a factor 2
    if (strategy == kGram1) {  // d/dW_1 = 2 (dM .* G2) W_1, d/dW_2 = 2 W_2 (dM .* G1)
      net.add_mm(gram_sums.w[0], dgram * cs[1], weights[0]);
      net.add_mm(gram_sums.w[1], weights[1], dgram * cs[0]);
    } else if (strategy == kReverseGram) {  // G = W_1 W_1^T: d/dW_1 = 2 dG W_1
      net.add_mm(gram_sums.w[0], dgram, weights[0]);
    } else {  // H = W_L^T W_L: d/dW_L = 2 W_L dH
      net.add_mm(gram_sums.w[L - 1], weights[L - 1], dgram);
    }
  };
  BackwardTile whole;
  whole.n = B;
  whole.hs = whole_batch_hs(x, hidden, Tensor());
  whole.ds = ds;
  whole.d2s = d2s;
  whole.adj_d = adj_d;
  if (grad_y.has_value() && grad_y->defined()) whole.grad_y = *grad_y;
  whole.grad_x = grad_x;
  // per sample, zero where nothing reaches the layer (an empty tensor for none)
  auto per_sample = [&](const Tensor& given, int64_t i) {
    return given.defined() ? net.empty({B, net.width(i + 1)}, options).zero_() : Tensor();
  };
  for (const auto i : c10::irange(L)) {
    whole.grad_sample_biases.push_back(per_sample(net.sample_bias(i), i));
    whole.grad_gates.push_back(per_sample(net.gate(i), i));
  }
  Kernels::side_by_side(beside, [&] { net.mlp_backward(whole, sums[0]); }, gram_grads);

  std::vector<Tensor> grad_w(L), grad_b(L);
  for (const auto i : c10::irange(L)) {
    grad_w[i] = total(&GradientSums::w, i, weights[i].sizes());
    grad_b[i] = bias_at(biases, i) ? total(&GradientSums::b, i, {net.width(i + 1)}) : at::empty({0}, options);
  }
  if (Tensor gwt = total_of(&GradientSums::wt); gwt.defined()) grad_w[layer].add_(gwt.t());
  std::vector<Tensor> grad_s, grad_g;
  for (const auto i : c10::irange(L)) {
    grad_s.push_back(undefined_to_absent(whole.grad_sample_biases[i], options));
    grad_g.push_back(undefined_to_absent(whole.grad_gates[i], options));
  }
  return {input_grad ? std::optional<Tensor>(grad_x) : std::nullopt, grad_w, grad_b, grad_s, grad_g};
}

}  // namespace jacext
