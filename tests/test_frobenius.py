"""The fused exact penalty and the layer Jacobians against torch.func in float64."""
import pytest
import torch
from torch import nn

import jacext
from jacext._jacobian_ops import _BatchedGram, _split_frobenius
from jacext.planner import FORWARD, REVERSE, Split
from jacext.reference import jacobian_frobenius_ref, per_sample_jacobian
from helpers import ACTIVATIONS, ACTIVATION_IDS, make_mlp, weighted_objective

# Depths 1-4, odd widths, m = 1 and m > n_0.
ARCHITECTURES = [
    (17, 1),
    (3, 17),
    (17, 3, 1),
    (3, 129, 17),
    (1, 17, 3, 129),
    (129, 17, 3, 17, 1),
    (3, 17, 1, 129, 17),
]
TOL = dict(rtol=1e-10, atol=1e-10)


def params_of(model):
    return [p for p in model.parameters()]


def check_against_reference(model, x, method):
    x = x.clone().requires_grad_()
    y, sq = jacext.jacobian_frobenius(model, x, method=method)
    grads = torch.autograd.grad(weighted_objective(y, sq), [x] + params_of(model))

    x_ref = x.detach().clone().requires_grad_()
    y_ref, sq_ref = jacobian_frobenius_ref(model, x_ref)
    grads_ref = torch.autograd.grad(weighted_objective(y_ref, sq_ref), [x_ref] + params_of(model))

    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(sq, sq_ref, **TOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("method", ["reverse", "forward", "auto"])
@pytest.mark.parametrize("widths", ARCHITECTURES, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("activation", [a for _, a in ACTIVATIONS], ids=ACTIVATION_IDS)
def test_penalty_and_grads_match_torch_func(activation, widths, method, device):
    model = make_mlp(widths, activation, device=device)
    x = torch.randn(7, widths[0], dtype=torch.float64, device=device)
    check_against_reference(model, x, method)


def check_op_strategy(model, x, strategy):
    """The op run with `strategy` against the reference: the penalty and every gradient."""
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    x = x.clone().requires_grad_()
    y, sq, _ = torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations,
                                                       spec.act_params, strategy)
    grads = torch.autograd.grad(weighted_objective(y, sq), [x] + params_of(model))
    x_ref = x.detach().clone().requires_grad_()
    y_ref, sq_ref = jacobian_frobenius_ref(model, x_ref)
    grads_ref = torch.autograd.grad(weighted_objective(y_ref, sq_ref), [x_ref] + params_of(model))
    torch.testing.assert_close(sq, sq_ref, **TOL)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


# The Gram epilogues split J at the first hidden layer (reverse) or the last one (forward, which
# needs a linear output layer): depths 2-5, widths that narrow and widen around the split.
GRAM_ARCHITECTURES = [(5, 9, 4), (6, 3, 11, 7), (4, 13, 2, 9, 5), (7, 5, 8, 3, 12, 6)]


@pytest.mark.parametrize("strategy", ["reverse_gram", "forward_gram"])
@pytest.mark.parametrize("widths", GRAM_ARCHITECTURES, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("activation", [a for _, a in ACTIVATIONS], ids=ACTIVATION_IDS)
def test_gram_epilogues_at_every_depth(activation, widths, strategy, device):
    model = make_mlp(widths, activation, bias=[i % 2 == 0 for i in range(len(widths) - 1)], device=device)
    x = torch.randn(6, widths[0], dtype=torch.float64, device=device)
    check_op_strategy(model, x, {"reverse_gram": jacext.ops.REVERSE_GRAM, "forward_gram": jacext.ops.FORWARD_GRAM}[strategy])


@pytest.mark.parametrize("gram", [True, False], ids=["grams", "product"])
@pytest.mark.parametrize("widths", GRAM_ARCHITECTURES, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("activation", [a for _, a in ACTIVATIONS], ids=ACTIVATION_IDS)
def test_split_at_every_hidden_layer(activation, widths, gram, device):
    model = make_mlp(widths, activation, bias=[i % 2 == 1 for i in range(len(widths) - 1)],
                     output_activation=nn.Sigmoid, device=device)
    x = torch.randn(5, widths[0], dtype=torch.float64, device=device)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    y_ref, sq_ref = jacobian_frobenius_ref(model, x)
    for layer in range(1, len(widths) - 1):
        for bottom, top in [(REVERSE, FORWARD), (FORWARD, REVERSE)]:
            xg = x.clone().requires_grad_()
            split = Split(layer, bottom, top, gram)
            y, sq = _split_frobenius(xg, spec.weights, biases, spec.activations, spec.act_params, split)
            torch.testing.assert_close(y, y_ref, **TOL)
            torch.testing.assert_close(sq, sq_ref, **TOL)
            grads = torch.autograd.grad(weighted_objective(y, sq), [xg] + params_of(model))
            x_ref = x.clone().requires_grad_()
            grads_ref = torch.autograd.grad(weighted_objective(*jacobian_frobenius_ref(model, x_ref)),
                                            [x_ref] + params_of(model))
            for g, g_ref in zip(grads, grads_ref):
                torch.testing.assert_close(g, g_ref, **TOL)


def test_auto_runs_the_split_for_a_bottleneck(device):
    model = make_mlp((40, 24, 3, 24, 40), nn.Tanh, device=device)
    x = torch.randn(6, 40, dtype=torch.float64, device=device)
    assert isinstance(jacext.explain(model, x).choice, Split)
    check_against_reference(model, x, "auto")


@pytest.mark.parametrize("batch", [0, 1, 7, 64])
@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_batch_sizes(batch, method, device):
    model = make_mlp((17, 3, 129, 17), nn.Tanh, device=device)
    x = torch.randn(batch, 17, dtype=torch.float64, device=device)
    if batch == 0:
        y, sq = jacext.jacobian_frobenius(model, x, method=method)
        assert y.shape == (0, 17) and sq.shape == (0,)
        return
    check_against_reference(model, x, method)


@pytest.mark.parametrize("method", ["reverse", "forward"])
@pytest.mark.parametrize("output_activation", [nn.Sigmoid, nn.Tanh, nn.GELU], ids=["sigmoid", "tanh", "gelu"])
def test_mixed_activations_bias_free_layers_and_output_activation(output_activation, method, device):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 8, bias=False), nn.Softplus(beta=2.0),
        nn.Linear(8, 7), nn.ELU(), nn.Linear(7, 11, bias=False), output_activation(),
    ).double().to(device)
    check_against_reference(model, torch.randn(6, 5, dtype=torch.float64, device=device), method)


def test_mlp_builder_matches_sequential(device):
    model = jacext.MLP([4, 6, 3], activation="silu", output_activation="sigmoid").double().to(device)
    assert [type(m) for m in model] == [nn.Linear, nn.SiLU, nn.Linear, nn.Sigmoid]
    check_against_reference(model, torch.randn(5, 4, dtype=torch.float64, device=device), "auto")


def test_reused_module_gives_tied_gradients(device):
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 2)).double().to(device)
    check_against_reference(model, torch.randn(4, 6, dtype=torch.float64, device=device), "forward")


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_float32_close_to_float64(method, device):
    model = make_mlp((33, 65, 17), nn.Tanh, device=device)
    x = torch.randn(16, 33, dtype=torch.float64, device=device)
    y64, sq64 = jacext.jacobian_frobenius(model, x, method=method)
    y32, sq32 = jacext.jacobian_frobenius(model.float(), x.float(), method=method)
    assert y32.dtype == sq32.dtype == torch.float32
    torch.testing.assert_close(sq32.double(), sq64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)


def test_autograd_method_any_module(device):
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double().to(device)
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    y, sq = jacext.jacobian_frobenius(model, x, method="autograd")
    torch.testing.assert_close(y, model(x))
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi) for xi in x])
    torch.testing.assert_close(sq, jac.pow(2).sum((1, 2)))


@pytest.mark.parametrize("widths", [(5, 7, 3), (3, 9, 4, 11), (6, 2, 5, 8, 4)], ids=str)
def test_layer_jacobians_and_gram(widths, device):
    model = make_mlp(widths, nn.Tanh, output_activation=nn.Sigmoid, device=device)
    x = torch.randn(6, widths[0], dtype=torch.float64, device=device)
    for layer in range(len(widths) - 1):
        head, tail = model[: 2 * layer], model[2 * layer:]
        h = head(x)
        _, ref = per_sample_jacobian(tail, h)
        jac = jacext.jacobian(model, x, layer=layer)
        assert jac.shape == (6, widths[-1], widths[layer])
        torch.testing.assert_close(jac, ref, **TOL)
        torch.testing.assert_close(jacext.jacobian_gram(model, x, layer=layer), ref @ ref.transpose(1, 2), **TOL)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_gram_gradients_twice(layer, device):
    """J J^T at every layer (hidden layers: _BatchedGram's own backward): its gradients, and the
    gradient of their squared norm (a double backward), against torch.func's Jacobians."""
    model = make_mlp((4, 6, 5, 7), nn.SiLU, output_activation=nn.Tanh, device=device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.randn(5, 7, 7, dtype=torch.float64, device=device)  # not symmetric: A + A^T matters
    params = [x] + params_of(model)

    def ref_gram():
        _, jac = per_sample_jacobian(model[2 * layer:], model[: 2 * layer](x))
        return jac @ jac.transpose(1, 2)

    def gradients_twice(gram):
        grads = torch.autograd.grad((gram() * weights).sum(), params, create_graph=True)
        return list(grads) + list(torch.autograd.grad(sum(g.square().sum() for g in grads), params))

    got, ref = gradients_twice(lambda: jacext.jacobian_gram(model, x, layer)), gradients_twice(ref_gram)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_batched_gram_gradcheck():
    jac = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    gram = _BatchedGram.apply
    torch.testing.assert_close(gram(jac), jac @ jac.transpose(1, 2))
    assert torch.autograd.gradcheck(gram, (jac,))
    assert torch.autograd.gradgradcheck(gram, (jac,))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_jacobian_gradients(layer, device):
    model = make_mlp((4, 6, 5, 7), nn.SiLU, output_activation=nn.Tanh, device=device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.randn(5, 7, (4, 6, 5)[layer], dtype=torch.float64, device=device)
    loss = (jacext.jacobian(model, x, layer) * weights).sum()
    grads = torch.autograd.grad(loss, [x] + params_of(model))

    def ref_loss():
        h = model[: 2 * layer](x)
        _, jac = per_sample_jacobian(model[2 * layer:], h)
        return (jac * weights).sum()

    grads_ref = torch.autograd.grad(ref_loss(), [x] + params_of(model))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("layers", [(0, 1, 2), (2, 0), (1,), (1, 2)], ids=str)
def test_several_layer_jacobians_from_one_sweep(layers, device):
    """jacobian(model, x, layers) gives every layer's J, values and gradients, from one op."""
    model = make_mlp((4, 6, 5, 7), nn.SiLU, output_activation=nn.Tanh, device=device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    cotangents = [torch.randn(5, 7, (4, 6, 5)[l], generator=g, dtype=torch.float64).to(device) for l in layers]
    jacs = jacext.jacobian(model, x, layers)
    loss = sum((jac * c).sum() for jac, c in zip(jacs, cotangents))
    grads = torch.autograd.grad(loss, [x] + params_of(model))

    refs = [per_sample_jacobian(model[2 * l:], model[: 2 * l](x))[1] for l in layers]
    grads_ref = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cotangents)), [x] + params_of(model))
    assert len(jacs) == len(layers)
    for jac, ref, gram in zip(jacs, refs, jacext.jacobian_gram(model, x, layers)):
        torch.testing.assert_close(jac, ref, **TOL)
        torch.testing.assert_close(gram, ref @ ref.transpose(1, 2), **TOL)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, **TOL)


@pytest.mark.parametrize("widths", [(17, 3, 1), (129, 17, 3, 17, 1), (40, 9, 12, 5)], ids=str)
def test_every_strategy_of_the_op_agrees(widths, device):
    model = make_mlp(widths, nn.Tanh, output_activation=nn.Sigmoid, device=device)
    x = torch.randn(5, widths[0], dtype=torch.float64, device=device)
    spec = jacext.parse_model(model)
    biases = jacext.ops.bias_tensors(spec.biases, spec.weights)
    _, sq_ref = jacobian_frobenius_ref(model, x)
    for strategy in (jacext.ops.REVERSE, jacext.ops.FORWARD, jacext.ops.REVERSE_GRAM):
        _, sq, _ = torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations,
                                                           spec.act_params, strategy)
        torch.testing.assert_close(sq, sq_ref, **TOL)
    assert jacext.ops.resolve_strategy("reverse", list(widths)) == jacext.ops.REVERSE_GRAM
    # the forward Gram epilogue needs a linear output layer: the op says so
    with pytest.raises(RuntimeError, match="linear output layer"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations, spec.act_params,
                                                jacext.ops.FORWARD_GRAM)


def test_op_level_entry_point(device):
    model = make_mlp((5, 8, 3), nn.LeakyReLU, device=device)  # default slope 0.01
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    y, sq = jacext.ops.mlp_jacobian_frobenius(x, weights, biases, ["leaky_relu", "identity"])
    y_ref, sq_ref = jacobian_frobenius_ref(model, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(sq, sq_ref, **TOL)


@pytest.mark.parametrize("method", ["gram", "auto"])
@pytest.mark.parametrize("widths", [(17, 33, 5), (3, 9, 1), (40, 1, 7)], ids=str)
@pytest.mark.parametrize("activation", [a for _, a in ACTIVATIONS], ids=ACTIVATION_IDS)
def test_one_hidden_layer_gram(activation, widths, method, device):
    """d^T ((W1 W1^T) .* (W2^T W2)) d: values and gradients against torch.func."""
    model = make_mlp(widths, activation, device=device)  # linear output layer
    check_against_reference(model, torch.randn(7, widths[0], dtype=torch.float64, device=device), method)


@pytest.mark.parametrize("widths, output_activation", [((5, 7, 7, 3), None), ((5, 7, 3), nn.Sigmoid),
                                                       ((5, 7, 2, 7, 5), None)], ids=str)
def test_gram_method_runs_the_cheapest_gram_plan(widths, output_activation):
    model = make_mlp(widths, nn.Tanh, output_activation=output_activation)
    check_against_reference(model, torch.randn(4, widths[0], dtype=torch.float64), "gram")
    assert jacext.explain(model, torch.empty(4, widths[0]), method="gram").choice not in (
        jacext.ops.REVERSE, jacext.ops.FORWARD)


def test_gram_method_needs_a_hidden_layer():
    with pytest.raises(ValueError, match="hidden layer"):
        jacext.jacobian_frobenius(make_mlp((5, 3), nn.Tanh), torch.randn(2, 5, dtype=torch.float64), method="gram")
