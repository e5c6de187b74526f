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
using Grads = std::tuple<std::optional<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                         std::vector<Tensor>>;

using LaplacianSignature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, TensorList, TensorList, at::IntArrayRef, at::ArrayRef<double>, bool, const std::optional<Tensor>&,
    int64_t, const OptionalList&, const OptionalList&, const OptionalList&, int64_t, at::OptionalIntArrayRef);
using LaplacianBackwardSignature = Grads(
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
    TensorList, TensorList, at::IntArrayRef, at::ArrayRef<double>, bool, TensorList, const std::optional<Tensor>&,
    int64_t, const OptionalList&, const OptionalList&, const OptionalList&, int64_t, bool, at::OptionalIntArrayRef);
using DiagonalSignature = std::tuple<Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, TensorList, TensorList, at::IntArrayRef, at::ArrayRef<double>, int64_t,
    const std::optional<Tensor>&, const OptionalList&, const OptionalList&, const OptionalList&, int64_t,
    at::OptionalIntArrayRef);
using DiagonalBackwardSignature = Grads(
    const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, TensorList, TensorList,
    at::IntArrayRef, at::ArrayRef<double>, int64_t, TensorList, const std::optional<Tensor>&, const OptionalList&,
    const OptionalList&, const OptionalList&, int64_t, bool, at::OptionalIntArrayRef);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Both ops' inputs, in this order (the backward returns one gradient per input, each tensor of a
// list counting as one): x, the weights, the biases (an empty tensor for a layer without), the
// held tangents (directions or projections: constants), the per-sample biases and the gates (each
// empty, or one per layer with an empty tensor for none), the dropout masks (constants; empty or
// one per layer), then the plan. What the forward saves, in this order: x, weights, biases, the
// held tangents if given, the per-sample biases, the gates, the masks, then the op's `saved`.
struct Inputs {
  Tensor x;
  std::vector<Tensor> weights, biases, sample_biases, gates, masks, saved;
  Tensor held;
};

void save_inputs(AutogradContext* ctx, const Tensor& x, TensorList weights, TensorList biases,
                 const std::optional<Tensor>& held, TensorList sample_biases, TensorList gates, TensorList masks,
                 const std::vector<Tensor>& saved) {
  for (const Tensor& m : masks) {
    TORCH_CHECK(!m.requires_grad(), "jacext: masks are constants (dropout masks) and take no gradient; "
                "pass them detached");
  }
  const bool has_held = held.has_value() && held->defined();
  ctx->saved_data["held"] = has_held;
  ctx->saved_data["n_sample_biases"] = static_cast<int64_t>(sample_biases.size());
  ctx->saved_data["n_gates"] = static_cast<int64_t>(gates.size());
  ctx->saved_data["n_masks"] = static_cast<int64_t>(masks.size());
  variable_list to_save{x};
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

Inputs load_inputs(AutogradContext* ctx, int64_t L) {
  const auto tensors = ctx->get_saved_variables();
  auto next = tensors.begin();
  auto take = [&next](int64_t n) {
    std::vector<Tensor> part(next, next + n);
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
  in.saved = std::vector<Tensor>(next, tensors.end());
  return in;
}

// The gradients in the order of the inputs, `plan` slots (no gradient) after them.
variable_list gradients(const Inputs& in, Grads grads, size_t plan) {
  auto& [grad_x, grad_w, grad_b, grad_s, grad_g] = grads;
  variable_list result{defined_or_none(grad_x)};
  result.insert(result.end(), grad_w.begin(), grad_w.end());
  append_present(result, in.biases, grad_b);
  result.emplace_back();  // the held tangents: constants
  append_present(result, in.sample_biases, grad_s);
  append_present(result, in.gates, grad_g);
  result.resize(result.size() + in.masks.size() + plan);  // the masks: constants
  return result;
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
