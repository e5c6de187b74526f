// mlp_jacobian_frobenius's autograd, in C++ (the Autograd key, every device): its backward is
// mlp_jacobian_backward, whose own autograd (jacext/_ops.py) gives the double backward and every
// higher order. In C++ because a Python autograd.Function costs a training step noticeably
// (docs/benchmarks.md): Function.apply and saving in Python in the forward, and in the backward a
// Python node that unpacks the saved tensors and rebuilds the op's arguments.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "autograd_common.h"

namespace jacext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FrobeniusSignature = std::tuple<Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, at::ArrayRef<double>, int64_t,
    const std::optional<Tensor>&, const std::optional<at::TensorList>&, const std::optional<at::TensorList>&,
    const std::optional<at::TensorList>&, int64_t, at::OptionalIntArrayRef);
using BackwardSignature = std::tuple<std::optional<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                     std::vector<Tensor>, std::vector<Tensor>>(
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
    at::TensorList, at::TensorList, at::IntArrayRef, at::ArrayRef<double>, int64_t, int64_t, at::TensorList,
    at::TensorList, const std::optional<Tensor>&, const std::optional<at::TensorList>&,
    const std::optional<at::TensorList>&, const std::optional<at::TensorList>&, int64_t, bool,
    at::OptionalIntArrayRef);

const c10::TypedOperatorHandle<FrobeniusSignature>& frobenius_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("jacext::mlp_jacobian_frobenius", "")
                             .typed<FrobeniusSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("jacext::mlp_jacobian_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

// Inputs, in this order (the backward returns one gradient per input, each tensor of a list
// counting as one): x, the weights, the biases (an empty tensor for a layer without bias), the
// projections (random draws, held constant), the masks (constants: one per layer or none), the
// per-sample biases and the gates (one per layer or none; differentiable, an empty tensor for a layer
// without), then the plan (with the residual skips).
struct FrobeniusFunction : public torch::autograd::Function<FrobeniusFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList weights,
                               at::TensorList biases, const std::optional<Tensor>& projections,
                               at::TensorList masks, at::TensorList sample_biases, at::TensorList gates,
                               at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t strategy,
                               int64_t tile, at::OptionalIntArrayRef residual) {
    for (const Tensor& m : masks) {
      TORCH_CHECK(!m.requires_grad(), "jacext: masks are constants (dropout masks) and take no gradient; "
                  "pass them detached");
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, sq, saved] =
        frobenius_op().call(x, weights, biases, activations, act_params, strategy, projections, optional_list(masks),
                            optional_list(sample_biases), optional_list(gates), tile, residual);
    // An unused output's gradient stays undefined: the backward op takes none for grad_y or
    // grad_sq, where zeros would cost a pass over them.
    ctx->set_materialize_grads(false);
    ctx->saved_data["activations"] = activations.vec();
    ctx->saved_data["act_params"] = act_params.vec();
    ctx->saved_data["strategy"] = strategy;
    ctx->saved_data["tile"] = tile;  // the backward runs the same tiles
    ctx->saved_data["residual"] = saved_ints(residual);
    ctx->saved_data["projections"] = projections.has_value() && projections->defined();
    ctx->saved_data["masks"] = static_cast<int64_t>(masks.size());
    ctx->saved_data["sample_biases"] = static_cast<int64_t>(sample_biases.size());
    ctx->saved_data["gates"] = static_cast<int64_t>(gates.size());
    variable_list to_save{x};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), biases.begin(), biases.end());
    if (projections.has_value() && projections->defined()) to_save.push_back(*projections);
    to_save.insert(to_save.end(), masks.begin(), masks.end());
    to_save.insert(to_save.end(), sample_biases.begin(), sample_biases.end());
    to_save.insert(to_save.end(), gates.begin(), gates.end());
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->mark_non_differentiable(saved);
    variable_list outputs{y, sq};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto tensors = ctx->get_saved_variables();
    const auto activations = ctx->saved_data["activations"].toIntVector();  // one per layer
    const auto L = static_cast<int64_t>(activations.size());
    const bool has_projections = ctx->saved_data["projections"].toBool();
    const Tensor& x = tensors[0];
    const std::vector<Tensor> weights(tensors.begin() + 1, tensors.begin() + 1 + L);
    const std::vector<Tensor> biases(tensors.begin() + 1 + L, tensors.begin() + 1 + 2 * L);
    const Tensor projections = has_projections ? tensors[1 + 2 * L] : Tensor();
    const int64_t n_masks = ctx->saved_data["masks"].toInt();
    const auto masks_begin = tensors.begin() + 1 + 2 * L + has_projections;
    const std::vector<Tensor> masks(masks_begin, masks_begin + n_masks);
    const int64_t n_biases = ctx->saved_data["sample_biases"].toInt(), n_gates = ctx->saved_data["gates"].toInt();
    const auto biases_begin = masks_begin + n_masks, gates_begin = biases_begin + n_biases;
    const std::vector<Tensor> sample_biases(biases_begin, gates_begin);
    const std::vector<Tensor> gates(gates_begin, gates_begin + n_gates);
    const std::vector<Tensor> saved(gates_begin + n_gates, tensors.end());
    const auto act_params = ctx->saved_data["act_params"].toDoubleVector();
    const auto residual = loaded_ints(ctx->saved_data["residual"]);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (backward_below_autograd()) below_autograd.emplace();
    auto [grad_x, grad_w, grad_b, grad_s, grad_g] = backward_op().call(
        optional(grads[0]), optional(grads[1]), std::nullopt, x, weights, biases, activations, act_params,
        /*layer=*/0, ctx->saved_data["strategy"].toInt(), saved, /*grad_carries=*/{}, optional(projections),
        optional_list(masks), optional_list(sample_biases), optional_list(gates), ctx->saved_data["tile"].toInt(),
        /*input_grad=*/ctx->needs_input_grad(0),
        residual.has_value() ? at::OptionalIntArrayRef(*residual) : at::OptionalIntArrayRef());
    variable_list result{defined_or_none(grad_x)};
    result.insert(result.end(), grad_w.begin(), grad_w.end());
    append_present(result, biases, grad_b);
    result.resize(result.size() + 1 + n_masks);  // projections and masks: constants
    append_present(result, sample_biases, grad_s);  // per sample; none for a layer without
    append_present(result, gates, grad_g);
    result.resize(result.size() + 5);  // the plan: no gradient
    return result;
  }
};

std::tuple<Tensor, Tensor, std::vector<Tensor>> frobenius_autograd(
    const Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, int64_t strategy, const std::optional<Tensor>& projections,
    const std::optional<at::TensorList>& masks, const std::optional<at::TensorList>& sample_biases,
    const std::optional<at::TensorList>& gates, int64_t tile, at::OptionalIntArrayRef residual) {
  // the lists as inputs (none: empty): the masks answered with no gradient, the conditioning with its
  auto outputs = FrobeniusFunction::apply(x, weights, biases, projections, masks.value_or(at::TensorList()),
                                          sample_biases.value_or(at::TensorList()), gates.value_or(at::TensorList()),
                                          activations, act_params, strategy, tile, residual);
  return {outputs[0], outputs[1], std::vector<Tensor>(outputs.begin() + 2, outputs.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(jacext, Autograd, m) { m.impl("mlp_jacobian_frobenius", &frobenius_autograd); }

}  // namespace jacext
