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
using BackwardSignature = BackwardGrads(
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

// The inputs in autograd_common.h's order (the projections are the held tangents).
struct FrobeniusFunction : public torch::autograd::Function<FrobeniusFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList weights,
                               at::TensorList biases, const std::optional<Tensor>& projections,
                               at::TensorList sample_biases, at::TensorList gates, at::TensorList masks,
                               at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t strategy,
                               int64_t tile, at::OptionalIntArrayRef residual) {
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
    save_inputs(ctx, x, weights, biases, projections, sample_biases, gates, masks, saved);
    variable_list outputs{y, sq};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto activations = ctx->saved_data["activations"].toIntVector();  // one per layer
    const Inputs in = load_inputs(ctx, static_cast<int64_t>(activations.size()));
    const auto residual = loaded_ints(ctx->saved_data["residual"]);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (backward_below_autograd()) below_autograd.emplace();
    auto result = backward_op().call(
        optional(grads[0]), optional(grads[1]), std::nullopt, in.x, in.weights, in.biases, activations,
        ctx->saved_data["act_params"].toDoubleVector(), /*layer=*/0, ctx->saved_data["strategy"].toInt(), in.saved,
        /*grad_carries=*/{}, optional(in.held), optional_list(in.masks), optional_list(in.sample_biases),
        optional_list(in.gates), ctx->saved_data["tile"].toInt(), /*input_grad=*/ctx->needs_input_grad(0),
        residual.has_value() ? at::OptionalIntArrayRef(*residual) : at::OptionalIntArrayRef());
    return gradients(in, std::move(result), 5);  // activations, act_params, strategy, tile, residual
  }
};

std::tuple<Tensor, Tensor, std::vector<Tensor>> frobenius_autograd(
    const Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, int64_t strategy, const std::optional<Tensor>& projections,
    const std::optional<at::TensorList>& masks, const std::optional<at::TensorList>& sample_biases,
    const std::optional<at::TensorList>& gates, int64_t tile, at::OptionalIntArrayRef residual) {
  // the lists as inputs (none: empty): the masks answered with no gradient, the conditioning with its
  auto outputs = FrobeniusFunction::apply(x, weights, biases, projections, sample_biases.value_or(at::TensorList()),
                                          gates.value_or(at::TensorList()), masks.value_or(at::TensorList()),
                                          activations, act_params, strategy, tile, residual);
  return {outputs[0], outputs[1], std::vector<Tensor>(outputs.begin() + 2, outputs.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(jacext, Autograd, m) { m.impl("mlp_jacobian_frobenius", &frobenius_autograd); }

}  // namespace jacext
