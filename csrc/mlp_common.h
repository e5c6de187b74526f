// What the device-agnostic algorithms share (mlp_jacobian.h, mlp_flow.h, mlp_laplacian.h): the
// strategy codes, the validation of an MLP's description, and the helpers that move tensors between
// the ops' schemas (empty tensors for absent ones) and the algorithms (undefined tensors).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <optional>
#include <vector>

#include "activations.h"

namespace jacext {

using at::Tensor;

// The Jacobian ops' strategies (mlp_jacobian.h); the other ops validate as kReverse.
enum Strategy : int64_t { kReverse = 0, kForward = 1, kReverseGram = 2, kGram1 = 3, kForwardGram = 4 };

// act' is not identically 1 (identity layers have no d), act'' not identically 0.
constexpr bool has_derivative(int64_t code) { return code != kIdentity; }
constexpr bool has_curvature(int64_t code) { return code != kIdentity && code != kReLU && code != kLeakyReLU; }

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

// (n, r, c) as (n * r, c): the GEMM view of a contiguous per-sample stack of matrices.
inline Tensor flat(const Tensor& t) { return t.view({-1, t.size(-1)}); }

// Rows [b0, b0 + n) of each per-sample tensor; undefined ones (an identity layer's d) stay undefined.
inline std::vector<Tensor> batch_rows(const std::vector<Tensor>& all, int64_t b0, int64_t n) {
  std::vector<Tensor> out;
  out.reserve(all.size());
  for (const Tensor& t : all) out.push_back(t.defined() ? t.narrow(0, b0, n) : t);
  return out;
}

// In `saved` an absent d or act'' is an empty 1-d tensor (the schema has no optional list
// elements); in the algorithms it is an undefined tensor.
inline Tensor absent_to_undefined(const Tensor& t) { return t.dim() == 1 ? Tensor() : t; }
inline Tensor undefined_to_absent(const Tensor& t, const at::TensorOptions& options) {
  return t.defined() ? t : at::empty({0}, options);
}

// An optional tensor's data (nullptr when undefined), for the device kernels; callers pass
// contiguous tensors (optional_contiguous).
template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mutable_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}
inline Tensor optional_contiguous(const Tensor& t) { return t.defined() ? t.contiguous() : t; }

inline void check_tile(int64_t tile) {
  TORCH_CHECK(tile >= 0, "jacext: tile must be >= 0 samples (0: the whole batch at once), got ", tile);
}

// The residual skips checked against the net: one entry per layer, -1 or a j <= i whose input h_j
// (the forward carries' C_j) is as wide as layer i's output; empty for none (also when every entry
// is -1). Both op families take them (mlp_laplacian.h, mlp_jacobian.h).
inline std::vector<int64_t> checked_residual(at::OptionalIntArrayRef residual, at::TensorList weights) {
  if (!residual.has_value()) return {};
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(residual->size()) == L, "jacext: residual must have one entry per layer (",
              L, "; -1 for a layer without a skip), got ", residual->size());
  std::vector<int64_t> skips(residual->begin(), residual->end());
  bool any = false;
  for (const auto i : c10::irange(L)) {
    const int64_t j = skips[i];
    TORCH_CHECK(j >= -1 && j <= i, "jacext: residual[", i, "] must be -1 (no skip) or the index j <= ", i,
                " of the layer whose input is added to layer ", i, "'s output, got ", j);
    if (j < 0) continue;
    any = true;
    const int64_t width_in = weights[j].size(1), width_out = weights[i].size(0);
    TORCH_CHECK(width_in == width_out, "jacext: residual[", i, "] = ", j, " adds the input of layer ", j,
                " (width ", width_in, ") to the output of layer ", i, " (width ", width_out,
                "): the widths must match");
  }
  return any ? skips : std::vector<int64_t>{};
}

// The per-sample biases and gates (conditioning inside the net, z = gate * (h W^T) + b + sample_bias),
// or the forward carry's dropout masks, checked against the net: L entries, each (B, n_{i+1}) or
// undefined (an empty tensor or no list: none). Both op families take them (mlp_laplacian.h,
// mlp_jacobian.h).
inline std::vector<Tensor> checked_conditioning(const std::optional<at::TensorList>& given, const Tensor& x,
                                                at::TensorList weights, const char* name) {
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<Tensor> out(L);
  if (!given.has_value() || given->empty()) return out;
  TORCH_CHECK(static_cast<int64_t>(given->size()) == L, "jacext: expected no ", name, " or one per layer (", L,
              ", an empty tensor for none), got ", given->size());
  for (const auto i : c10::irange(L)) {
    const Tensor& s = (*given)[i];
    if (!s.defined() || (s.numel() == 0 && s.dim() == 1)) continue;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == weights[i].size(0), "jacext: ", name, "[",
                i, "] must have shape (batch=", x.size(0), ", ", weights[i].size(0), "), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == x.scalar_type() && s.device() == x.device(), "jacext: ", name, "[", i,
                "] must match x's dtype and device, got ", s.scalar_type(), " on ", s.device());
    out[i] = s.contiguous();
  }
  return out;
}

}  // namespace jacext
