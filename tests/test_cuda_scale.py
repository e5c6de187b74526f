"""On a GPU, every op at a realistic size in float32 against the same op in float64 (which the other
tests check against torch.func): 784-256-256-10 at B = 4096, widths of 1024 and more. Skipped
without a GPU; bench/gpu_check.sh runs them."""
import math

import pytest
import torch
import torch.nn.functional as F

import jacext
from conftest import cuda_only
from jacext.flows import MLPFlow

pytestmark = cuda_only
REL = 2e-4  # float32 against float64, relative to each tensor's largest entry


def close(got, want, rel=REL):
    torch.testing.assert_close(got.double(), want.double(), rtol=rel, atol=rel * want.abs().max().item())


def models(widths, batch, seed=0, output_activation=None):
    torch.manual_seed(seed)
    m32 = jacext.MLP(widths, activation="tanh", output_activation=output_activation).cuda()
    m64 = jacext.MLP(widths, activation="tanh", output_activation=output_activation).cuda().double()
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    x = torch.randn(batch, widths[0], device="cuda")
    return m32, m64, x, x.double()


def penalty_and_grads(model, x, **kwargs):
    y, sq = jacext.jacobian_frobenius(model, x, **kwargs)
    grads = torch.autograd.grad(sq.mean() + y.square().mean(), list(model.parameters()))
    return sq, grads


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "gram"])
def test_cuda_frobenius_784_256_256_10_batch_4096(method):
    m32, m64, x32, x64 = models([784, 256, 256, 10], 4096)
    sq32, g32 = penalty_and_grads(m32, x32, method=method)
    sq64, g64 = penalty_and_grads(m64, x64, method=method)
    close(sq32, sq64)
    for a, b in zip(g32, g64):
        close(a, b)


@pytest.mark.parametrize("widths, batch", [([784, 1024, 1000], 256), ([784, 1024, 1024, 1000], 64),
                                           ([784, 256, 32, 256, 784], 512)])
def test_cuda_frobenius_wide_layers(widths, batch):
    m32, m64, x32, x64 = models(widths, batch)
    sq32, g32 = penalty_and_grads(m32, x32)
    sq64, g64 = penalty_and_grads(m64, x64)
    close(sq32, sq64)
    for a, b in zip(g32, g64):
        close(a, b)


def test_cuda_estimator_batch_4096():
    m32, m64, x32, x64 = models([784, 256, 256, 10], 4096)
    out = {}
    for name, model, x in (("32", m32, x32), ("64", m64, x64)):
        g = torch.Generator(device="cuda").manual_seed(0)
        out[name] = penalty_and_grads(model, x, method="hutchinson", n_proj=8, generator=g)
    close(out["32"][0], out["64"][0])
    for a, b in zip(out["32"][1], out["64"][1]):
        close(a, b)


def test_cuda_jacobians_and_grams_batch_4096():
    m32, m64, x32, x64 = models([784, 256, 256, 10], 4096)
    for layer in (0, 1, (0, 2)):
        j32, j64 = jacext.jacobian(m32, x32, layer=layer), jacext.jacobian(m64, x64, layer=layer)
        for a, b in zip(j32 if isinstance(layer, tuple) else [j32], j64 if isinstance(layer, tuple) else [j64]):
            close(a, b)
    g32 = jacext.jacobian_gram(m32, x32, layer=0)
    g64 = jacext.jacobian_gram(m64, x64, layer=0)
    close(g32, g64)
    (d32,) = torch.autograd.grad(g32.square().mean(), [m32[0].weight])
    (d64,) = torch.autograd.grad(g64.square().mean(), [m64[0].weight])
    close(d32, d64)


@pytest.mark.parametrize("dist_norm", [2, 1, math.inf])
def test_cuda_large_margin_loss_784_512_512_10(dist_norm):
    m32, m64, x32, x64 = models([784, 512, 512, 10], 1024)
    target = torch.randint(0, 10, (1024,), device="cuda")
    losses = {}
    for name, model, x in (("32", m32, x32), ("64", m64, x64)):
        loss = jacext.large_margin_loss(model, x, target, layers=(0, 1, 2), gamma=0.5, top_k=9,
                                        dist_norm=dist_norm, use_approximation=False)
        losses[name] = (loss, torch.autograd.grad(loss, list(model.parameters())))
    close(losses["32"][0], losses["64"][0], rel=1e-3)
    for a, b in zip(losses["32"][1], losses["64"][1]):
        close(a, b, rel=1e-3)


def test_cuda_flow_1024_batch_256():
    torch.manual_seed(0)
    f32 = MLPFlow(1024, 2).cuda()
    f64 = MLPFlow(1024, 2).cuda().double()
    f64.load_state_dict({k: v.double() for k, v in f32.state_dict().items()})
    x = torch.randn(256, 1024, device="cuda")
    for relative in (True, False):
        l32, l64 = f32.nll(x, relative_gradient=relative), f64.nll(x.double(), relative_gradient=relative)
        close(l32, l64, rel=1e-4)
        for a, b in zip(torch.autograd.grad(l32, list(f32.parameters())), torch.autograd.grad(l64, list(f64.parameters()))):
            close(a, b, rel=1e-3)


def test_cuda_training_step_784_256_256_10_batch_4096():
    m32, m64, x32, x64 = models([784, 256, 256, 10], 4096)
    target = torch.randint(0, 10, (4096,), device="cuda")
    grads = []
    for model, x in ((m32, x32), (m64, x64)):
        y, sq = jacext.jacobian_frobenius(model, x)
        loss = F.cross_entropy(y, target) + 0.01 * sq.mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        close(a, b)
