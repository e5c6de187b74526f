"""The strategy choice follows the cost model: multiply-adds plus the carries' elementwise traffic."""
import math

import pytest

from jacext.planner import (FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM, best_split, margin_costs,
                            margin_path, penalty_macs, resolve_strategy, strategy_name)


def test_macs_of_a_one_hidden_layer_net():
    # 784 -> 1024 -> 1000, B = 64: MLP 3*B*(784*1024 + 1024*1000); reverse carries 1000 rows
    # through W_1 (1000*1024*784 per sample); forward carries 784 columns through W_2.
    mlp = 3 * 64 * (784 * 1024 + 1024 * 1000)
    assert penalty_macs([784, 1024, 1000], 64, REVERSE) == mlp + 3 * 64 * 1000 * 1024 * 784
    assert penalty_macs([784, 1024, 1000], 64, FORWARD) == mlp + 3 * 64 * 784 * 1024 * 1000


@pytest.mark.parametrize("widths, expected", [
    ([784, 256, 256, 10], REVERSE_GRAM),     # small-m classifier, first layer narrows
    ([784, 1024, 1024, 1000], FORWARD),      # m > n_0: fewer columns than rows
    ([784, 1024, 1000], REVERSE_GRAM),       # 1000 rows through n_1^2 beat 1000 rows through n_1 n_0 x 3
    ([8, 16, 8], REVERSE),                   # a tie in multiply-adds and carried elements goes to reverse
    ([10, 64, 64, 1], REVERSE),              # widening first layer: no Gram epilogue
])
def test_auto_choice(widths, expected):
    assert resolve_strategy("auto", widths, batch=64) == expected


def test_one_hidden_layer_gram_is_chosen_when_the_output_is_linear():
    assert resolve_strategy("auto", [784, 1024, 1000], batch=64, output_linear=True) == GRAM1
    # G1, G2 and M d, then dM, dW_1, dW_2: O(n_1^2) per sample plus two n_1^2 (n_0 + m) products
    assert penalty_macs([784, 1024, 1000], 64, GRAM1) == (
        3 * 64 * (784 * 1024 + 1024 * 1000) + 2 * 1024 ** 2 * (784 + 1000) + 2 * 64 * 1024 ** 2)
    assert resolve_strategy("auto", [784, 256, 256, 10], batch=64, output_linear=True) == REVERSE_GRAM
    # deeper: "gram" is the cheapest of the Gram epilogues and the splits
    assert resolve_strategy("gram", [784, 256, 256, 10], batch=64, output_linear=True) == REVERSE_GRAM
    with pytest.raises(ValueError, match="hidden layer"):
        resolve_strategy("gram", [784, 10])


def test_split_at_a_bottleneck():
    # a contractive autoencoder: 784 rows or 784 columns through every layer, or 32 of each to
    # the bottleneck and two 32 x 32 Grams per sample
    widths = [784, 256, 32, 256, 784]
    split = resolve_strategy("auto", widths, batch=128, output_linear=True)
    assert split == best_split(widths, 128) and split.layer == 2 and split.gram
    assert penalty_macs(widths, 128, split) < min(penalty_macs(widths, 128, st) for st in (REVERSE, FORWARD)) / 10
    assert penalty_macs(widths, 128, split) == (penalty_macs(widths[:3], 128, split.bottom)
                                               + penalty_macs(widths[2:], 128, split.top)
                                               + 3 * 128 * 32 * 32 * (784 + 784))
    assert "split at layer 2 (Grams)" in strategy_name(split)


def test_forward_gram_epilogue_when_the_output_is_linear_and_wide():
    # P3: 1000 outputs from 1024 hidden units: H = W_3^T W_3 (1024^2) replaces 1000 x 1024 per
    # input column, but it runs twice (P = T H, dH) where the last forward GEMM runs three times
    widths = [784, 1024, 1024, 1000]
    mlp = 3 * 64 * (784 * 1024 + 1024 * 1024 + 1024 * 1000)
    assert penalty_macs(widths, 64, FORWARD_GRAM) == (
        mlp + 3 * 64 * 784 * 1024 * 1024 + 2 * 1024 ** 2 * 1000 + 2 * 64 * 784 * 1024 ** 2)
    assert resolve_strategy("auto", widths, batch=64, output_linear=True) == FORWARD_GRAM
    assert resolve_strategy("forward", widths, batch=64, output_linear=True) == FORWARD_GRAM
    assert resolve_strategy("forward", widths, batch=64, output_linear=False) == FORWARD
    assert resolve_strategy("forward", [784, 256, 256, 10], output_linear=True) == FORWARD  # m << n_2


def test_layer_jacobian_never_uses_the_gram_epilogue():
    assert resolve_strategy("reverse", [784, 256, 256, 10], frobenius=False) == REVERSE
    assert resolve_strategy("auto", [784, 256, 256, 10], layer=1, frobenius=False) == REVERSE


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        resolve_strategy("exact", [3, 4, 5])


def test_explain_reports_every_candidate_and_the_choice():
    import torch
    import jacext

    model = jacext.MLP([784, 256, 256, 10])
    plan = jacext.explain(model, torch.randn(128, 784))
    assert plan.choice == resolve_strategy("auto", [784, 256, 256, 10], batch=128) == REVERSE_GRAM
    assert set(plan.candidates) == {REVERSE, REVERSE_GRAM, FORWARD, FORWARD_GRAM, best_split([784, 256, 256, 10], 128)}
    assert plan.candidates[REVERSE_GRAM][0] == penalty_macs([784, 256, 256, 10], 128, REVERSE_GRAM)
    # saved for the backward, float32: forward mode keeps a (128, 784, 256) carry
    assert plan.candidates[FORWARD][2] > 128 * 784 * 256 * 4 > plan.candidates[REVERSE_GRAM][2]
    text = repr(plan)
    assert "reverse + Gram epilogue" in text and "<- chosen" in text


def test_plans_are_cached_by_their_key():
    """Planning costs a few hundred microseconds (more than a small GPU step): a repeated key is a
    cache hit and gives the same plan; a different key is planned afresh."""
    from jacext.planner import _cached_strategy
    widths = [37, 53, 41, 7]  # a key no other test uses
    before = _cached_strategy.cache_info()
    first = resolve_strategy("auto", widths, batch=29)
    again = resolve_strategy("auto", list(widths), batch=29)
    after = _cached_strategy.cache_info()
    assert first == again
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1
    resolve_strategy("auto", widths, batch=30)
    assert _cached_strategy.cache_info().misses == after.misses + 1


def test_margin_costs_follow_the_rows_carried():
    """The rows path carries top_k rows through every layer from the logits down (3 passes with the
    norms differentiated, 1 held constant, when the loss's backward reuses the rows instead of the
    MLP backward's reverse GEMMs); the jacobian path all m rows, so its carry does not grow with
    top_k. With one row the rows path wins at every setting."""
    widths, batch, layers = [784, 512, 512, 10], 128, (0, 1, 2)
    mlp = batch * (784 * 512 + 512 * 512 + 512 * 10)
    sweep = batch * (784 * 512 + 512 * 512 + 512 * 10)  # one row through every layer
    reverse = batch * (512 * 512 + 512 * 10)  # the MLP backward's reverse GEMMs above the input

    def combined(k):  # the reused rows' combination per layer above the input
        return batch * k * (512 + 10)

    for constant in (True, False):
        passes = 1 if constant else 3
        one, three = (margin_costs(widths, batch, layers, k, 2, constant)["rows"][0] for k in (1, 3))
        saved = (reverse - combined(1), reverse - combined(3)) if constant else (0, 0)
        assert one == 3 * mlp + passes * sweep - saved[0]
        assert three - one == 2 * passes * sweep - saved[1] + saved[0]
    for q in (1, 2, math.inf):
        for constant in (True, False):
            assert margin_path(widths, batch, layers, 1, q, constant) == "rows"
            costs = margin_costs(widths, batch, layers, 1, q, constant)
            assert costs["rows"][1] < costs["jacobian"][1]
    # the jacobian path's carry is the same for every top_k; only its u^T J norms grow
    carry = [margin_costs(widths, batch, layers, k, 2, False)["jacobian"][0] for k in (1, 9)]
    assert carry[0] == carry[1]


def test_carry_tiles_put_every_thread_to_work():
    """A forward carry too small for cache-sized tiles still runs one tile per thread; large carries
    get tiles of at least CARRY_MIN_TILE_ROWS rows, a thread's share or less; one thread: the whole batch."""
    from jacext.layouts import CARRY_FORWARD, diagonal_layout
    from jacext.planner import CARRY_MIN_TILE_ROWS, carry_tile_size

    widths = [16, 64, 64, 16]
    layout = diagonal_layout(widths, CARRY_FORWARD, 1, None, False)  # h and one projection: 2 rows a sample
    assert layout.rows * 256 < CARRY_MIN_TILE_ROWS
    assert carry_tile_size(widths, 512, layout, threads=2) == 256
    assert carry_tile_size(widths, 511, layout, threads=2) == 256
    assert carry_tile_size(widths, 512, layout, threads=1) == 0
    assert carry_tile_size(widths, 1, layout, threads=2) == 0
    large = carry_tile_size(widths, 1 << 16, layout, threads=2)
    assert 0 < large <= 1 << 15 and large * layout.rows >= CARRY_MIN_TILE_ROWS
