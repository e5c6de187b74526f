// The forward-carry ops' autograd (mlp_laplacian, mlp_jacobian_diagonal), in C++ on the Autograd
// key (every device), as frobenius_autograd.cpp for the penalty: each op differentiates through its
// backward op, whose own autograd (jacext/_laplacian_ops.py) gives the double backward and every
// higher order. In C++ because torch.library's Python autograd wrapper (pytree over the op's
// arguments, saving and unpacking in Python) costs a small net's step more than its kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "autograd_common.h"

namespace jacext {
namespace {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalList = std::optional<TensorList>;

using LaplacianSignature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, TensorList, TensorList, at::IntArrayRef, at::ArrayRef<double>, bool, const std::optional<Tensor>&,
    int64_t, const OptionalList&, const OptionalList&, const OptionalList&, int64_t, at::OptionalIntArrayRef);
using LaplacianBackwardSignature = BackwardGrads(
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
    TensorList, TensorList, at::IntArrayRef, at::ArrayRef<double>, bool, TensorList, const std::optional<Tensor>&,
    int64_t, const OptionalList&, const OptionalList&, const OptionalList&, int64_t, bool, at::OptionalIntArrayRef);
using DiagonalSignature = std::tuple<Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, TensorList, TensorList, at::IntArrayRef, at::ArrayRef<double>, int64_t,
    const std::optional<Tensor>&, const OptionalList&, const OptionalList&, const OptionalList&, int64_t,
    at::OptionalIntArrayRef);
using DiagonalBackwardSignature = BackwardGrads(
    const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, TensorList, TensorList,
    at::IntArrayRef, at::ArrayRef<double>, int64_t, TensorList, const std::optional<Tensor>&, const OptionalList&,
    const OptionalList&, const OptionalList&, int64_t, bool, at::OptionalIntArrayRef);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct LaplacianFunction : public torch::autograd::Function<LaplacianFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList weights, TensorList biases,
                               const std::optional<Tensor>& directions, TensorList sample_biases, TensorList gates,
                               TensorList masks, at::IntArrayRef activations, at::ArrayRef<double> act_params, bool gradient,
                               int64_t laplacian_rows, int64_t tile, at::OptionalIntArrayRef residual) {
    static const auto mlp_laplacian_op = find<LaplacianSignature>("jacext::mlp_laplacian");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, grad, lap, saved] = mlp_laplacian_op
                                     .call(x, weights, biases, activations, act_params, gradient, directions,
                                           laplacian_rows, optional_list(sample_biases), optional_list(gates),
                                           optional_list(masks), tile, residual);
    // An unused output's gradient stays undefined: the backward op takes none for it.
    ctx->set_materialize_grads(false);
    ctx->saved_data["activations"] = activations.vec();
    ctx->saved_data["act_params"] = act_params.vec();
    ctx->saved_data["gradient"] = gradient;
    ctx->saved_data["laplacian_rows"] = laplacian_rows;
    ctx->saved_data["tile"] = tile;  // the backward runs the same tiles
    ctx->saved_data["residual"] = saved_ints(residual);
    save_inputs(ctx, x, weights, biases, directions, sample_biases, gates, masks, saved);
    if (!gradient) ctx->mark_non_differentiable({grad});  // an empty placeholder
    variable_list outputs{y, grad, lap};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto activations = ctx->saved_data["activations"].toIntVector();
    const Inputs in = load_inputs(ctx, static_cast<int64_t>(activations.size()));
    const bool gradient = ctx->saved_data["gradient"].toBool();
    const auto residual = loaded_ints(ctx->saved_data["residual"]);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (backward_below_autograd()) below_autograd.emplace();
    static const auto mlp_laplacian_backward_op =
        find<LaplacianBackwardSignature>("jacext::mlp_laplacian_backward");
    auto result = mlp_laplacian_backward_op
                      .call(optional(grads[0]), gradient ? optional(grads[1]) : std::nullopt, optional(grads[2]),
                            in.x, in.weights, in.biases, activations, ctx->saved_data["act_params"].toDoubleVector(),
                            gradient, in.saved, optional(in.held), ctx->saved_data["laplacian_rows"].toInt(),
                            optional_list(in.sample_biases), optional_list(in.gates), optional_list(in.masks),
                            ctx->saved_data["tile"].toInt(), /*input_grad=*/ctx->needs_input_grad(0),
                            residual.has_value() ? at::OptionalIntArrayRef(*residual) : at::OptionalIntArrayRef());
    return gradients(in, std::move(result), 6);  // activations, act_params, gradient, rows, tile, residual
  }
};

struct DiagonalFunction : public torch::autograd::Function<DiagonalFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList weights, TensorList biases,
                               const std::optional<Tensor>& projections, TensorList sample_biases, TensorList gates,
                               TensorList masks, at::IntArrayRef activations, at::ArrayRef<double> act_params, int64_t strategy,
                               int64_t tile, at::OptionalIntArrayRef residual) {
    static const auto mlp_jacobian_diagonal_op = find<DiagonalSignature>("jacext::mlp_jacobian_diagonal");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, out, saved] = mlp_jacobian_diagonal_op
                               .call(x, weights, biases, activations, act_params, strategy, projections,
                                     optional_list(sample_biases), optional_list(gates), optional_list(masks), tile,
                                     residual);
    ctx->set_materialize_grads(false);
    ctx->saved_data["activations"] = activations.vec();
    ctx->saved_data["act_params"] = act_params.vec();
    ctx->saved_data["strategy"] = strategy;
    ctx->saved_data["tile"] = tile;
    ctx->saved_data["residual"] = saved_ints(residual);
    save_inputs(ctx, x, weights, biases, projections, sample_biases, gates, masks, saved);
    variable_list outputs{y, out};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto activations = ctx->saved_data["activations"].toIntVector();
    const Inputs in = load_inputs(ctx, static_cast<int64_t>(activations.size()));
    const auto residual = loaded_ints(ctx->saved_data["residual"]);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (backward_below_autograd()) below_autograd.emplace();
    static const auto mlp_jacobian_diagonal_backward_op =
        find<DiagonalBackwardSignature>("jacext::mlp_jacobian_diagonal_backward");
    auto result = mlp_jacobian_diagonal_backward_op
                      .call(optional(grads[0]), optional(grads[1]), in.x, in.weights, in.biases, activations,
                            ctx->saved_data["act_params"].toDoubleVector(), ctx->saved_data["strategy"].toInt(),
                            in.saved, optional(in.held), optional_list(in.sample_biases), optional_list(in.gates), optional_list(in.masks),
                            ctx->saved_data["tile"].toInt(), /*input_grad=*/ctx->needs_input_grad(0),
                            residual.has_value() ? at::OptionalIntArrayRef(*residual) : at::OptionalIntArrayRef());
    return gradients(in, std::move(result), 5);  // activations, act_params, strategy, tile, residual
  }
};

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> laplacian_autograd(
    const Tensor& x, TensorList weights, TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, bool gradient, const std::optional<Tensor>& directions, int64_t laplacian_rows,
    const OptionalList& sample_biases, const OptionalList& gates, const OptionalList& masks, int64_t tile,
    at::OptionalIntArrayRef residual) {
  auto outputs = LaplacianFunction::apply(x, weights, biases, directions, sample_biases.value_or(TensorList()),
                                          gates.value_or(TensorList()), masks.value_or(TensorList()), activations,
                                          act_params, gradient, laplacian_rows, tile, residual);
  return {outputs[0], outputs[1], outputs[2], std::vector<Tensor>(outputs.begin() + 3, outputs.end())};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> diagonal_autograd(
    const Tensor& x, TensorList weights, TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, int64_t strategy, const std::optional<Tensor>& projections,
    const OptionalList& sample_biases, const OptionalList& gates, const OptionalList& masks, int64_t tile,
    at::OptionalIntArrayRef residual) {
  auto outputs = DiagonalFunction::apply(x, weights, biases, projections, sample_biases.value_or(TensorList()),
                                         gates.value_or(TensorList()), masks.value_or(TensorList()), activations,
                                         act_params, strategy, tile, residual);
  return {outputs[0], outputs[1], std::vector<Tensor>(outputs.begin() + 2, outputs.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(jacext, Autograd, m) {
  m.impl("mlp_laplacian", &laplacian_autograd);
  m.impl("mlp_jacobian_diagonal", &diagonal_autograd);
}

}  // namespace jacext
