// What the C++ autograd nodes (frobenius_autograd.cpp, carry_autograd.cpp) share: converting between
// an op's optional arguments and the undefined tensors / empty lists an autograd node holds.
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

}  // namespace jacext
