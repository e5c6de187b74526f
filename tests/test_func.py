"""jacext under torch.func: vmap over the samples and over an ensemble of stacked weights equals
the loop (values and gradients, float64); torch.func.grad raises an error naming the alternative."""
import copy

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import jacext
from helpers import make_mlp

TOL = dict(rtol=1e-10, atol=1e-12)


def model_and_x(device, seed=0):
    model = make_mlp([5, 7, 6, 3], torch.nn.Tanh, device=device, seed=seed)
    x = torch.randn(4, 5, dtype=torch.float64, device=device, generator=None)
    return model, x


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "gram"])
def test_vmap_over_samples_is_the_batched_call(method, device):
    model, x = model_and_x(device)
    xg = x.clone().requires_grad_()
    y_v, sq_v = vmap(lambda xi: jacext.jacobian_frobenius(model, xi[None], method=method))(xg)
    y, sq = jacext.jacobian_frobenius(model, x.clone().requires_grad_(), method=method)
    torch.testing.assert_close(y_v[:, 0], y, **TOL)
    torch.testing.assert_close(sq_v[:, 0], sq, **TOL)
    params = list(model.parameters())
    got = torch.autograd.grad(sq_v.sum() + y_v.square().sum(), [xg, *params])
    xr = x.clone().requires_grad_()
    y, sq = jacext.jacobian_frobenius(model, xr, method=method)
    want = torch.autograd.grad(sq.sum() + y.square().sum(), [xr, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_vmap_over_samples_for_jacobians_grams_and_the_estimator(device):
    model, x = model_and_x(device)
    j = vmap(lambda xi: jacext.jacobian(model, xi[None], layer=(0, 1)))(x)
    for got, want in zip(j, jacext.jacobian(model, x, layer=(0, 1))):
        torch.testing.assert_close(got[:, 0], want, **TOL)
    g = vmap(lambda xi: jacext.jacobian_gram(model, xi[None]))(x)
    torch.testing.assert_close(g[:, 0], jacext.jacobian_gram(model, x), **TOL)
    # the estimator with orthogonal rows at n_proj = m is exact, whatever the draws
    _, est = vmap(lambda xi: jacext.jacobian_frobenius(model, xi[None], method="hutchinson", n_proj=3, orthogonal=True),
                  randomness="different")(x)
    torch.testing.assert_close(est[:, 0], jacext.jacobian_frobenius(model, x)[1], rtol=1e-10, atol=1e-10)


def ensemble(device, n=3):
    models = [make_mlp([5, 7, 6, 3], torch.nn.Tanh, device=device, seed=s) for s in range(n)]
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    return models, x


@pytest.mark.parametrize("wrapper", ["frobenius", "jacobian", "gram", "estimator"])
def test_vmap_over_an_ensemble_of_stacked_models_is_the_loop(wrapper, device):
    models, x = ensemble(device)
    wrap = {"frobenius": lambda m: jacext.JacobianFrobenius(m),
            "jacobian": lambda m: jacext.Jacobian(m, layer=(0, 2)),
            "gram": lambda m: jacext.JacobianGram(m, layer=1),
            "estimator": lambda m: jacext.JacobianFrobenius(m, method="hutchinson", n_proj=3, orthogonal=True)}[wrapper]
    modules = [wrap(m) for m in models]
    params, buffers = stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")

    def call(p, b, x):
        out = functional_call(base, (p, b), (x,))
        return out if isinstance(out, (tuple, list)) else (out,)

    outs = vmap(call, in_dims=(0, 0, None), randomness="same")(params, buffers, x)
    total = sum(o.square().sum() for o in outs)
    grads = torch.autograd.grad(total, list(params.values()))
    for i, module in enumerate(modules):
        loop = module(x)
        loop = loop if isinstance(loop, (tuple, list)) else (loop,)
        for got, want in zip(outs, loop):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)
        want_grads = torch.autograd.grad(sum(o.square().sum() for o in loop), list(module.parameters()))
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g[i], w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("quantity", [jacext.jacobian_frobenius, jacext.laplacian, jacext.divergence])
def test_func_grad_names_the_supported_alternative(quantity):
    model, x = model_and_x("cpu")
    if quantity is jacext.divergence:  # a square map
        model = torch.nn.Sequential(*model[:-1], torch.nn.Linear(model[-1].in_features, x.shape[1])).double()
    try:
        g = torch.func.grad(lambda xi: quantity(model, xi[None])[1].sum())(x[0])
    except RuntimeError as error:
        assert "torch.autograd.grad" in str(error) and "vmap" in str(error)
    else:  # a torch whose register_autograd works under torch.func.grad (pytorch#170834)
        xr = x[:1].clone().requires_grad_()
        (want,) = torch.autograd.grad(quantity(model, xr)[1].sum(), xr)
        torch.testing.assert_close(g, want[0], **TOL)
