"""Residual skips h + g(h) in the fused Jacobian family (csrc/mlp_jacobian.h: the reverse carry dy/dh_j
gains dy/dh_{i+1} for a skip from h_j into layer i's output; the MLP's value path adds the skip, its
backward passes the block's outgoing adjoint to its input; the forward carry T^(i+1) adds T^(j)): the penalty (exact, Hutchinson with fixed
projections, Hutch++ where it is exact), the Jacobians at one and several layers, the Gram and the
chosen columns, in float64 against torch.func on the users' residual modules of test_residual.py and on
the network written as a plain function; the ops' gradcheck and gradgradcheck, tiles, Dropout in train()
together with the skips, and the methods that do not apply across a skip."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import jacext
from jacext import activations as act
from jacext import ops
from jacext._library import normalize_activations
from jacext.frontend import lower
from jacext.functional import JACOBIAN_FAMILY
from jacext.layouts import FORWARD, REVERSE, first_carry_index
from test_residual import MODELS, NETS, Block, TwoLayerBlock, assert_all_close, model_and_x, per_sample, random_net

TOL = dict(rtol=1e-9, atol=1e-10)


def on_engine(call):
    """call() with the generic path's warning turned into an error: it must run on the engine."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return call()


def params_of(model):
    return list(model.parameters())


def grads(outputs, inputs, seed=7):
    """The gradients of a random combination of the outputs w.r.t. the inputs (None: unused)."""
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs, allow_unused=True)


def node_jacobian(spec, x, layer, masks=None):
    """(y, dy/dh_layer) per sample of the network in `spec` written as a plain function: h_layer the
    input of Linear `layer` (a node: every use of it, skips included, sees a change of it), by
    vmap(jacrev) over a perturbation added there."""
    L = len(spec.weights)
    masks = masks or [None] * L

    def one(xi, eps, mi):
        h, inputs = xi, []
        for i in range(L):
            if i == layer:
                h = h + eps
            inputs.append(h)
            w, b = spec.weights[i], spec.biases[i]
            z = w @ h + (0 if b is None else b)
            h = act.activation_value(z, spec.activations[i], spec.act_params[2 * i], spec.act_params[2 * i + 1])
            if mi[i] is not None:
                h = mi[i] * h
            if spec.residual is not None and spec.residual[i] >= 0:
                h = h + inputs[spec.residual[i]]
        return h, h

    eps = x.new_zeros(x.shape[0], spec.widths[layer])
    jac, y = vmap(jacrev(one, argnums=1, has_aux=True),
                  in_dims=(0, 0, [0 if m is not None else None for m in masks]))(x, eps, masks)
    return y, jac


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_penalty_values_and_gradients(name, method):
    model, x = model_and_x(name)
    x.requires_grad_()
    y, sq = on_engine(lambda: jacext.jacobian_frobenius(model, x, method=method))
    jac = vmap(jacrev(per_sample(model)))(x)
    y_ref, sq_ref = model(x), jac.square().sum((1, 2))
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(sq, sq_ref, **TOL)
    inputs = [x, *params_of(model)]
    assert_all_close(grads([y, sq], inputs), grads([y_ref, sq_ref], inputs))


@pytest.mark.parametrize("name", MODELS)
def test_hutchinson_fixed_projections(name):
    """The Hutchinson terms ||v_i^T J||^2 of the reverse carry of fixed rows V, values and gradients."""
    model, x = model_and_x(name)
    x.requires_grad_()
    spec = lower(model, x, supports=JACOBIAN_FAMILY).spec
    m = spec.widths[-1]
    v = torch.randn(x.shape[0], 3, m, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    y, terms = ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                          method="hutchinson", projections=v, residual=spec.residual)
    jac = vmap(jacrev(per_sample(model)))(x)
    want = (v @ jac).square().sum(2)
    torch.testing.assert_close(terms, want, **TOL)
    inputs = [x, *params_of(model)]
    assert_all_close(grads([terms], inputs), grads([want], inputs))


@pytest.mark.parametrize("name", ["pinn-depth3", "output-block", "square-mixed"])
def test_estimators_on_the_engine(name):
    """jacobian_frobenius's estimators with skips: Hutchinson's mean over orthogonal rows is exact at
    n_proj = m, Hutch++ (its sketch by the forward product with the skips) once n_proj >= 3 m."""
    model, x = model_and_x(name)
    m = model(x).shape[1]
    exact = vmap(jacrev(per_sample(model)))(x).square().sum((1, 2))
    g = torch.Generator().manual_seed(0)
    hutch = on_engine(lambda: jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=m, orthogonal=True,
                                                        generator=g))[1]
    plus = on_engine(lambda: jacext.jacobian_frobenius(model, x, method="hutch++", n_proj=3 * m, generator=g))[1]
    torch.testing.assert_close(hutch, exact, **TOL)
    torch.testing.assert_close(plus, exact, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_jacobians_at_several_layers(name):
    """jacobian at layer 0 against vmap(jacrev) of the module, and at a list of layers (one reverse sweep)
    against the node derivatives of the plain function; gradients through them."""
    model, x = model_and_x(name)
    x.requires_grad_()
    spec = lower(model, x, supports=JACOBIAN_FAMILY).spec
    jac = on_engine(lambda: jacext.jacobian(model, x))
    want = vmap(jacrev(per_sample(model)))(x)
    torch.testing.assert_close(jac, want, **TOL)
    layers = list(range(len(spec.weights)))
    got = on_engine(lambda: jacext.jacobian(model, x, layer=layers))
    wants = [node_jacobian(spec, x, l)[1] for l in layers]
    for g, w in zip(got, wants):
        torch.testing.assert_close(g, w, **TOL)
    inputs = [x, *params_of(model)]
    assert_all_close(grads(got, inputs), grads(wants, inputs))
    for layer in layers:
        for method in ("reverse", "forward"):
            single = on_engine(lambda: jacext.jacobian(model, x, layer=layer, method=method))
            torch.testing.assert_close(single, wants[layer], **TOL)
    forward = on_engine(lambda: jacext.jacobian(model, x, method="forward"))
    assert_all_close(grads([forward], inputs), grads([want], inputs))


@pytest.mark.parametrize("name", MODELS)
def test_gram_and_chosen_columns(name):
    model, x = model_and_x(name)
    x.requires_grad_()
    jac = vmap(jacrev(per_sample(model)))(x)
    gram = on_engine(lambda: jacext.jacobian_gram(model, x))
    torch.testing.assert_close(gram, jac @ jac.transpose(1, 2), **TOL)
    cols = [1, 0]
    got = on_engine(lambda: jacext.jacobian(model, x, wrt=cols))
    sq = on_engine(lambda: jacext.jacobian_frobenius(model, x, wrt=cols))[1]
    torch.testing.assert_close(got, jac[:, :, cols], **TOL)
    torch.testing.assert_close(sq, jac[:, :, cols].square().sum((1, 2)), **TOL)
    inputs = [x, *params_of(model)]
    assert_all_close(grads([gram, sq], inputs), grads([jac @ jac.transpose(1, 2), jac[:, :, cols].square().sum((1, 2))],
                                                      inputs))


def test_methods_that_do_not_apply_across_a_skip_raise():
    model, x = model_and_x("square-mixed")
    with pytest.raises(ValueError, match="residual skip"):
        jacext.jacobian_frobenius(model, x, method="gram")
    spec = lower(model, x, supports=JACOBIAN_FAMILY).spec
    codes, params = normalize_activations(spec.activations, spec.act_params, len(spec.weights))
    biases = [x.new_empty(0) if b is None else b for b in spec.biases]
    for strategy in (2, 4):
        with pytest.raises(RuntimeError, match="strategy 0 or 1"):
            torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, codes, params, strategy,
                                                    residual=spec.residual)
    with pytest.raises(RuntimeError, match="the widths must match"):
        torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, codes, params, 0,
                                                residual=[-1, 0, -1, -1, -1])


@pytest.mark.parametrize("widths, codes, residual", NETS, ids=[str(r) for *_, r in NETS])
def test_ops_gradcheck_and_gradgradcheck(widths, codes, residual):
    x, weights, biases, codes = random_net(widths, codes)
    L = len(weights)
    v = torch.randn(4, 2, widths[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calls = [lambda x, *p: ops.mlp_jacobian_frobenius(x, p[:L], p[L:], codes, residual=residual),
             lambda x, *p: ops.mlp_jacobian_frobenius(x, p[:L], p[L:], codes, method="forward", residual=residual),
             lambda x, *p: ops.mlp_jacobian(x, p[:L], p[L:], codes, method="forward", residual=residual),
             lambda x, *p: ops.mlp_jacobian(x, p[:L], p[L:], codes, layer=1, method="forward", residual=residual),
             lambda x, *p: ops.mlp_jacobian_frobenius(x, p[:L], p[L:], codes, method="hutchinson", projections=v,
                                                      residual=residual),
             lambda x, *p: ops.mlp_jacobian(x, p[:L], p[L:], codes, residual=residual),
             lambda x, *p: ops.mlp_jacobian(x, p[:L], p[L:], codes, layer=1, residual=residual),
             lambda x, *p: (lambda y, js: (y, *js))(*ops.mlp_jacobians(x, p[:L], p[L:], codes, layers=[0, 1, L - 1],
                                                                       residual=residual))]
    for call in calls:
        assert torch.autograd.gradcheck(call, (x, *weights, *biases))
        assert torch.autograd.gradgradcheck(call, (x, *weights, *biases))


@pytest.mark.parametrize("widths, codes, residual", NETS, ids=[str(r) for *_, r in NETS])
def test_ops_against_the_plain_function(widths, codes, residual):
    """The carries at every layer and the penalty against the node derivatives of the plain net."""
    x, weights, biases, codes = random_net(widths, codes)
    codes_, params = normalize_activations(codes, None, len(codes))
    spec = type("Spec", (), dict(weights=weights, biases=biases, activations=codes_, act_params=params,
                                 residual=residual, widths=list(widths)))
    layers = list(range(len(weights)))
    y, jacs = ops.mlp_jacobians(x, weights, biases, codes, layers=layers, residual=residual)
    for l, jac in zip(layers, jacs):
        y_ref, want = node_jacobian(spec, x, l)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(jac, want, **TOL)
    for method in ("reverse", "forward"):
        _, sq = ops.mlp_jacobian_frobenius(x, weights, biases, codes, method=method, residual=residual)
        torch.testing.assert_close(sq, jacs[0].square().sum((1, 2)), **TOL)
        for l, want in zip(layers, jacs):
            torch.testing.assert_close(ops.mlp_jacobian(x, weights, biases, codes, layer=l, method=method,
                                                        residual=residual)[1], want, **TOL)


@pytest.mark.parametrize("widths, codes, residual", NETS, ids=[str(r) for *_, r in NETS])
def test_tiles_give_the_same_values(widths, codes, residual):
    _, weights, biases, codes = random_net(widths, codes)
    x = torch.randn(11, widths[0], dtype=torch.float64)
    codes, params = normalize_activations(codes, None, len(codes))
    cases = [(op, strategy) for op in ("mlp_jacobian_frobenius", "mlp_jacobian") for strategy in (REVERSE, FORWARD)]
    for op, strategy in cases:
        args = (x, weights, biases, codes, params, strategy) if op == "mlp_jacobian_frobenius" else \
            (x, weights, biases, codes, params, 0, strategy)
        whole = getattr(torch.ops.jacext, op)(*args, residual=residual)
        tiled = getattr(torch.ops.jacext, op)(*args, residual=residual, tile=3)
        for a, b in zip(whole[:2], tiled[:2]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        grad_y, grad_out = [torch.randn_like(t) for t in whole[:2]]
        frob = op == "mlp_jacobian_frobenius"
        carries = [] if frob or strategy == FORWARD else \
            [torch.randn_like(c) for c in whole[2][first_carry_index(len(weights)):]]
        back = [torch.ops.jacext.mlp_jacobian_backward(grad_y, grad_out if frob else None, None if frob else grad_out,
                                                       x, weights, biases, codes, params, 0, strategy, saved[2],
                                                       carries, tile=tile, residual=residual)
                for saved, tile in ((whole, 0), (tiled, 3))]
        for a, b in zip([back[0][0]] + back[0][1] + back[0][2], [back[1][0]] + back[1][1] + back[1][2]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class DropoutPINN(nn.Module):
    """n -> width, blocks h + tanh(W h + b) with a Dropout after each block's activation, -> m."""

    def __init__(self, n=3, width=6, m=2, p=0.3):
        super().__init__()
        self.inp = nn.Linear(n, width)
        self.drop = nn.Dropout(p)
        self.block, self.block2 = Block(width), TwoLayerBlock(width, 5)
        self.out = nn.Linear(width, m)

    def forward(self, x):
        h = self.drop(torch.tanh(self.inp(x)))
        h = h + self.drop(torch.tanh(self.block.lin(h)))
        return self.out(self.block2(h))


def test_dropout_with_residual_skips():
    """Dropout in train() and skips together: y == model(x) under the same seed, and J, the penalty and
    their gradients are the masked network's (the masks the front-end draws, on the plain function)."""
    torch.manual_seed(0)
    model = DropoutPINN().double().train()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y, sq = on_engine(lambda: jacext.jacobian_frobenius(model, x))
    torch.manual_seed(5)
    y_model = model(x)
    torch.manual_seed(5)
    spec = lower(model, x, supports=JACOBIAN_FAMILY).spec
    assert spec.residual is not None and spec.masks is not None and any(m is not None for m in spec.masks)
    y_ref, jac = node_jacobian(spec, x, 0, spec.masks)
    torch.testing.assert_close(y, y_model, **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(sq, jac.square().sum((1, 2)), **TOL)
    inputs = [x, *params_of(model)]
    assert_all_close(grads([y, sq], inputs), grads([y_ref, jac.square().sum((1, 2))], inputs))
    torch.manual_seed(5)
    got = on_engine(lambda: jacext.jacobian(model, x))
    torch.testing.assert_close(got, jac, **TOL)
    masks = [None if m is None else m for m in spec.masks]
    codes = spec.activations
    L = len(spec.weights)
    biases = [torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b
              for w, b in zip(spec.weights, spec.biases)]
    params = [p.detach().clone().requires_grad_() for p in (*spec.weights, *biases)]

    def call(x, *p):
        return ops.mlp_jacobian_frobenius(x, p[:L], p[L:], codes, spec.act_params, masks=masks,
                                          residual=spec.residual)

    x0 = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(call, (x0, *params))
    assert torch.autograd.gradgradcheck(call, (x0, *params))


def test_compile_and_vmap_take_the_skip():
    """The fakes with the skip (torch.compile, fullgraph, with the backward traced); vmap over the
    samples folds into the op's batch with the keyword passed through."""
    model, x = model_and_x("output-block", batch=6)
    spec = lower(model, x, supports=JACOBIAN_FAMILY).spec
    args = (spec.weights, spec.biases, spec.activations, spec.act_params)
    x.requires_grad_()

    def penalty(x):
        y, sq = ops.mlp_jacobian_frobenius(x, *args, residual=spec.residual)
        return y, sq, torch.autograd.grad(sq.sum(), x, create_graph=True)[0]

    torch._dynamo.reset()
    compiled = torch.compile(penalty, backend="aot_eager")
    for got, eager in zip(compiled(x), penalty(x)):
        torch.testing.assert_close(got, eager, **TOL)
    with torch.no_grad():
        want = ops.mlp_jacobian(x, *args, residual=spec.residual)[1]
        mapped = vmap(lambda s: ops.mlp_jacobian(s.unsqueeze(0), *args, residual=spec.residual)[1])(x)
    torch.testing.assert_close(mapped.squeeze(1), want, **TOL)


def test_explain_says_only_reverse_and_forward_apply():
    model, x = model_and_x("pinn-depth3", batch=64)
    plan = jacext.explain(model, x)
    assert plan.choice in (REVERSE, FORWARD) and sorted(plan.candidates) == [REVERSE, FORWARD]
    text = repr(plan)
    assert "residual skips (i, j), layer i's output adds layer j's input: (1, 1), (2, 2), (3, 3)" in text
    assert "do not apply across a skip" in text


def test_dropout_with_skips_refused_elsewhere_names_the_dropout():
    """A quantity that takes Dropout and skips but not both together (lower's supports without the
    combination) names the Dropout module."""
    from jacext.frontend import FACTORS, NotLowerable

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Dropout(0.2), Block(3)).train()
    with pytest.raises(NotLowerable, match=r"2 \(Dropout\) .* Dropout in train\(\) in a model with residual skips"):
        lower(model, torch.randn(2, 3), supports=FACTORS)
