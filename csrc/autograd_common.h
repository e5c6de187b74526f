// What the C++ autograd nodes (frobenius_autograd.cpp, carry_autograd.cpp) share: converting between
// an op's optional arguments and the undefined tensors / empty lists an autograd node holds, and
// saving their inputs and answering them with gradients in one order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>
#include <torch/autograd.h>

#include <optional>
#include <vector>

namespace jacext {

inline at::Tensor defined_or_none(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline std::optional<at::TensorList> optional_list(at::TensorList list) {
  return list.empty() ? std::nullopt : std::optional<at::TensorList>(list);
}

inline c10::IValue saved_ints(at::OptionalIntArrayRef values) {
  return values.has_value() ? c10::IValue(values->vec()) : c10::IValue();
}

inline std::optional<std::vector<int64_t>> loaded_ints(const c10::IValue& value) {
  return value.isNone() ? std::nullopt : std::optional<std::vector<int64_t>>(value.toIntVector());
}

// In a backward without create_graph (grad mode off) and outside torch.func, a backward op goes
// straight to its device kernel: its own autograd (a Python kernel, with its overhead) would only
// pass the call on. With create_graph that autograd records the double backward. (functorch
// includes its front-mode key while any transform is on.)
inline bool backward_below_autograd() {
  return !at::GradMode::is_enabled() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// A layer list's gradients as a node returns them: none where the entry is absent (an empty 1-d
// tensor stands for a layer without bias, per-sample bias or gate; sizes may be symbolic).
inline void append_present(torch::autograd::variable_list& result, at::TensorList given,
                           const std::vector<at::Tensor>& grads) {
  for (const auto i : c10::irange(given.size())) {
    const bool present = !(given[i].sym_numel() == 0 && given[i].dim() == 1);
    result.push_back(present ? grads[i] : at::Tensor());
  }
}

// What every backward op returns: the gradients of x (when asked), the weights, the biases, the
// per-sample biases and the gates.
using BackwardGrads = std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                 std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The inputs of every autograd node here, in this order (the backward returns one gradient per
// input, each tensor of a list counting as one): x, the weights, the biases (an empty tensor for a layer without), the
// held tangents (directions or projections, random draws: constants), the per-sample biases and the gates (each
// empty, or one per layer with an empty tensor for none), the dropout masks (constants; empty or
// one per layer), then the plan. What the forward saves, in this order: x, weights, biases, the
// held tangents if given, the per-sample biases, the gates, the masks, then the op's `saved`.
struct Inputs {
  at::Tensor x;
  std::vector<at::Tensor> weights, biases, sample_biases, gates, masks, saved;
  at::Tensor held;
};

inline void save_inputs(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                        at::TensorList biases, const std::optional<at::Tensor>& held, at::TensorList sample_biases,
                        at::TensorList gates, at::TensorList masks, const std::vector<at::Tensor>& saved) {
  for (const at::Tensor& m : masks) {
    TORCH_CHECK(!m.requires_grad(), "jacext: masks are constants (dropout masks) and take no gradient; "
                "pass them detached");
  }
  const bool has_held = held.has_value() && held->defined();
  ctx->saved_data["held"] = has_held;
  ctx->saved_data["n_sample_biases"] = static_cast<int64_t>(sample_biases.size());
  ctx->saved_data["n_gates"] = static_cast<int64_t>(gates.size());
  ctx->saved_data["n_masks"] = static_cast<int64_t>(masks.size());
  torch::autograd::variable_list to_save{x};
  to_save.insert(to_save.end(), weights.begin(), weights.end());
  to_save.insert(to_save.end(), biases.begin(), biases.end());
  if (has_held) to_save.push_back(*held);
  to_save.insert(to_save.end(), sample_biases.begin(), sample_biases.end());
  to_save.insert(to_save.end(), gates.begin(), gates.end());
  to_save.insert(to_save.end(), masks.begin(), masks.end());
  to_save.insert(to_save.end(), saved.begin(), saved.end());
  ctx->save_for_backward(to_save);
  ctx->mark_non_differentiable(saved);
}

inline Inputs load_inputs(torch::autograd::AutogradContext* ctx, int64_t L) {
  const auto tensors = ctx->get_saved_variables();
  auto next = tensors.begin();
  auto take = [&next](int64_t n) {
    std::vector<at::Tensor> part(next, next + n);
    next += n;
    return part;
  };
  Inputs in;
  in.x = *next++;
  in.weights = take(L);
  in.biases = take(L);
  if (ctx->saved_data["held"].toBool()) in.held = *next++;
  in.sample_biases = take(ctx->saved_data["n_sample_biases"].toInt());
  in.gates = take(ctx->saved_data["n_gates"].toInt());
  in.masks = take(ctx->saved_data["n_masks"].toInt());
  in.saved = std::vector<at::Tensor>(next, tensors.end());
  return in;
}

// The gradients in the order of the inputs, `plan` slots (no gradient) after them.
inline torch::autograd::variable_list gradients(const Inputs& in, BackwardGrads grads, size_t plan) {
  auto& [grad_x, grad_w, grad_b, grad_s, grad_g] = grads;
  torch::autograd::variable_list result{defined_or_none(grad_x)};
  result.insert(result.end(), grad_w.begin(), grad_w.end());
  append_present(result, in.biases, grad_b);
  result.emplace_back();  // the held tangents: constants
  append_present(result, in.sample_biases, grad_s);
  append_present(result, in.gates, grad_g);
  result.resize(result.size() + in.masks.size() + plan);  // the masks: constants
  return result;
}

}  // namespace jacext
