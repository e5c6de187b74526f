"""The memory budget: chunked runs equal unchunked ones, and the chunk size honours the budget."""
import pytest
import torch
from torch import nn

import jacext
from jacext import planner
from jacext.planner import FORWARD, FORWARD_GRAM, REVERSE, REVERSE_GRAM, batch_chunk, footprint
from conftest import cuda_only
from helpers import make_mlp, weighted_objective

WIDTHS = (9, 13, 11, 7)


def penalty_and_grads(model, x, **kwargs):
    """sq, first derivatives w.r.t. x and the parameters, and a second derivative (d/dx of the
    gradient norm of the first weight), all from one call of jacobian_frobenius."""
    x = x.clone().requires_grad_()
    y, sq = jacext.jacobian_frobenius(model, x, **kwargs)
    grads = torch.autograd.grad(weighted_objective(y, sq), [x, *model.parameters()], create_graph=True)
    (second,) = torch.autograd.grad(grads[1].square().sum(), x)
    return [sq.detach(), *[g.detach() for g in grads], second]


@pytest.mark.parametrize("method", ["reverse", "forward", "auto"])
def test_chunked_equals_unchunked(method, device):
    model = make_mlp(WIDTHS, nn.Tanh, device=device)
    x = torch.randn(10, WIDTHS[0], dtype=torch.float64, device=device)
    strategy = jacext.ops.resolve_strategy(method, list(WIDTHS), batch=10, output_linear=True)
    budget = footprint(list(WIDTHS), 3, strategy, element_size=8)  # room for 3 samples: 4 chunks
    assert batch_chunk(list(WIDTHS), 10, strategy, 8, budget) == 3
    whole = penalty_and_grads(model, x, method=method)
    chunked = penalty_and_grads(model, x, method=method, max_memory=budget)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_estimator_equals_unchunked(device):
    model = make_mlp(WIDTHS, nn.Tanh, device=device)
    x = torch.randn(10, WIDTHS[0], dtype=torch.float64, device=device)
    runs = [jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=3, max_memory=budget,
                                      generator=torch.Generator(device).manual_seed(5))[1]
            for budget in (None, 1)]  # 1 byte: one sample per chunk
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


def test_no_grad_chunks_without_checkpointing(device):
    model = make_mlp(WIDTHS, nn.Tanh, device=device)
    x = torch.randn(5, WIDTHS[0], dtype=torch.float64, device=device)
    with torch.no_grad():
        y, sq = jacext.jacobian_frobenius(model, x, max_memory=1)
    _, sq_ref = jacext.jacobian_frobenius(model, x)
    assert not sq.requires_grad
    torch.testing.assert_close(sq, sq_ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", [REVERSE, FORWARD, REVERSE_GRAM, FORWARD_GRAM])
def test_chunk_is_the_largest_that_fits(strategy):
    widths = [784, 1024, 1024, 1000]
    for budget in (10 * 2**20, 300 * 2**20, 2**30):
        chunk = batch_chunk(widths, 64, strategy, 4, budget)
        assert 1 <= chunk <= 64
        assert chunk == 1 or footprint(widths, chunk, strategy) <= budget
        assert chunk == 64 or footprint(widths, chunk + 1, strategy) > budget


def test_explain_reports_the_chunks():
    model = jacext.MLP([784, 1024, 1024, 1000])
    x = torch.empty(64, 784)
    plan = jacext.explain(model, x, max_memory=200 * 2**20)
    assert plan.chunk == batch_chunk([784, 1024, 1024, 1000], 64, plan.choice, 4, 200 * 2**20) < 64
    assert f"chunks of <= {plan.chunk} samples" in repr(plan)
    assert "whole batch in one call" in repr(jacext.explain(model, x, max_memory=2**40))


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1GB"])
def test_bad_budget(bad):
    model = make_mlp(WIDTHS, nn.Tanh)
    with pytest.raises(ValueError, match="max_memory"):
        jacext.jacobian_frobenius(model, torch.randn(2, WIDTHS[0], dtype=torch.float64), max_memory=bad)
    with pytest.raises(ValueError, match="max_memory"):  # the generic path's budget too
        jacext.jacobian_frobenius(model, torch.randn(2, WIDTHS[0], dtype=torch.float64), method="autograd",
                                  max_memory=bad)


@cuda_only
def test_chunking_lowers_the_measured_peak():
    model = make_mlp((256, 512, 512, 500), nn.Tanh, dtype=torch.float32, device="cuda")
    x = torch.randn(64, 256, device="cuda")
    peaks = []
    for budget in (None, 32 * 2**20):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y, sq = jacext.jacobian_frobenius(model, x, max_memory=budget)
        sq.sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] < peaks[0] / 2


def test_cuda_budget_follows_free_memory_once(monkeypatch):
    """On a GPU the default budget is min(a quarter of the memory, half of what is free), read from
    the driver once per device (no query every step)."""
    calls = []

    def mem_get_info(index):
        calls.append(index)
        return (6 * 2**30, 80 * 2**30)  # 6 GiB free of 80

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    planner._cuda_memory_budget.cache_clear()
    try:
        assert planner.default_memory_budget("cuda:3") == 3 * 2**30
        assert planner.default_memory_budget("cuda:3") == 3 * 2**30
        assert calls == [3]
    finally:
        planner._cuda_memory_budget.cache_clear()
