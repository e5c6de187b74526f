"""The fused engine (csrc/mlp_jacobian.h): tiles, the workspace, and the dead work it skips.

Tiles: the ops cut the batch into tiles of `tile` samples (the planner's choice; the keyword-only
op argument), each thread summing its own tiles' weight gradients, and each tile that may change
threads into a slot of its own. Tiled and whole-batch (tile=0) runs must give the same values
and gradients (to rounding: 1e-12 in float64) for every strategy and activation, and both must
match torch.func at the tile boundaries."""
import ctypes
import resource

import pytest
import torch
from torch import nn

import jacext
from jacext import activations as act
from jacext.planner import FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM, tile_size
from jacext.reference import jacobian_frobenius_ref, per_sample_jacobian
from helpers import ACTIVATIONS, ACTIVATION_IDS, make_mlp

TILE = 4
ALL_STRATEGIES = {"reverse": REVERSE, "forward": FORWARD, "reverse_gram": REVERSE_GRAM,
                  "forward_gram": FORWARD_GRAM, "gram1": GRAM1}


def op_inputs(model, x):
    spec = jacext.parse_model(model)
    return spec, jacext.ops.bias_tensors(spec.biases, spec.weights)


def frobenius(model, x, strategy, tile, projections=None):
    """(y, sq) from the op with a given tile, differentiable."""
    spec, biases = op_inputs(model, x)
    y, sq, _ = torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations,
                                                       spec.act_params, strategy, projections, tile=tile)
    return y, sq


def model_for(strategy, activation_factory, widths=(5, 7, 6, 4)):
    if strategy == GRAM1:
        widths = (5, 7, 4)
    return make_mlp(list(widths), activation_factory)


def values_and_grads(model, x, fn):
    """(y, sq, gradients of a weighted objective w.r.t. x and every parameter); the objective's
    weights are drawn in float64 whatever the dtype, so that dtypes can be compared."""
    y, sq = fn(x)
    g = torch.Generator().manual_seed(3)
    objective = (torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype) * y).sum() \
        + ((torch.rand(sq.shape, generator=g, dtype=torch.float64).to(sq.dtype) + 0.5) * sq).sum()
    grads = torch.autograd.grad(objective, [x, *model.parameters()], allow_unused=True)
    return y, sq, [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, [x, *model.parameters()])]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("activation", ACTIVATION_IDS)
def test_tiled_and_whole_batch_agree(strategy, activation):
    """Every strategy and activation: tiles of 3 over a batch of 11 (a short last tile) against
    the whole batch at once, values and gradients to 1e-12 in float64."""
    model = model_for(ALL_STRATEGIES[strategy], dict(ACTIVATIONS)[activation])
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    whole = values_and_grads(model, x, lambda x: frobenius(model, x, ALL_STRATEGIES[strategy], 0))
    tiled = values_and_grads(model, x, lambda x: frobenius(model, x, ALL_STRATEGIES[strategy], 3))
    torch.testing.assert_close(tiled[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiled[1], whole[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(tiled[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_float32_kernels_match_float64(strategy):
    """The float32 instantiations of the CPU loops (the float64 ones are checked at 1e-12 above), with
    widths that fill their vector blocks and leave tails, tiled and whole, against float64."""
    widths = (20, 33, 5) if ALL_STRATEGIES[strategy] == GRAM1 else (20, 33, 18, 5)
    model = make_mlp(list(widths), nn.Tanh)
    x = torch.randn(13, 20, dtype=torch.float64, requires_grad=True)
    want = values_and_grads(model, x, lambda x: frobenius(model, x, ALL_STRATEGIES[strategy], 0))
    model32 = model.float()
    x32 = x.detach().float().requires_grad_()
    for tile in (0, 3):
        got = values_and_grads(model32, x32, lambda x: frobenius(model32, x, ALL_STRATEGIES[strategy], tile))
        for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * max(w.abs().max().item(), 1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 5, 24, 25])
def test_small_batch_products_against_torch_func(batch, dtype):
    """A batch of at most 24 rows with at least 256 inputs takes the CPU's own x W^T loops (blocks of
    4 rows by 3 columns, a tail of each); 25 rows go to MKL. Values and gradients against torch.func."""
    model = make_mlp([301, 8, 5], nn.Tanh)
    x = torch.randn(batch, 301, dtype=torch.float64, requires_grad=True)
    ref = values_and_grads(model, x, lambda x: jacobian_frobenius_ref(model, x))
    model = model.to(dtype)
    xd = x.detach().to(dtype).requires_grad_()
    got = values_and_grads(model, xd, lambda x: jacext.jacobian_frobenius(model, x))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("batch", [1, TILE - 1, TILE, TILE + 1, 3 * TILE + 2])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_tile_boundaries_against_torch_func(strategy, batch):
    model = model_for(ALL_STRATEGIES[strategy], nn.Tanh)
    x = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    got = values_and_grads(model, x, lambda x: frobenius(model, x, ALL_STRATEGIES[strategy], TILE))
    ref = values_and_grads(model, x, lambda x: jacobian_frobenius_ref(model, x))
    for a, b in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# Widths and batches at which the MLP's multiply-adds and the Grams' balance (common.h's
# side_by_side): forward B * sum(n_i n_i+1) against half the Grams' products, backward twice that.
SIDE_BY_SIDE = {"reverse_gram": ((16, 16, 3), 7), "forward_gram": ((3, 16, 16), 7), "gram1": ((8, 16, 8), 8)}


@pytest.mark.parametrize("strategy", SIDE_BY_SIDE)
def test_side_by_side_chains_match_one_thread_and_torch_func(strategy):
    """On two threads the MLP and the Grams' products run side by side where their costs balance:
    the profile must show it (forward and backward), and values and gradients must equal one
    thread's (in turn) to 1e-12 and torch.func's in float64."""
    widths, batch = SIDE_BY_SIDE[strategy]
    model = make_mlp(list(widths), nn.Tanh)
    x = torch.randn(batch, widths[0], dtype=torch.float64, requires_grad=True)
    fn = lambda x: frobenius(model, x, ALL_STRATEGIES[strategy], 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = values_and_grads(model, x, fn)
        torch.set_num_threads(2)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            two = values_and_grads(model, x, fn)
    finally:
        torch.set_num_threads(threads)
    assert [e.name for e in prof.events()].count("jacext::side_by_side") == 2
    ref = values_and_grads(model, x, lambda x: jacobian_frobenius_ref(model, x))
    for a, b, r in zip([two[0], two[1], *two[2]], [one[0], one[1], *one[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", [1, TILE + 1, 3 * TILE + 2])
@pytest.mark.parametrize("strategy", ["reverse", "forward"])
def test_tiled_jacobian_and_carries(strategy, batch):
    """mlp_jacobian in tiles: J, its gradient, and the carries' gradients (several layers)."""
    model = make_mlp([5, 7, 6, 4], nn.Tanh, output_activation=nn.Sigmoid)
    spec, biases = op_inputs(model, None)
    x = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    code = ALL_STRATEGIES[strategy]
    out = {}
    for tile in (0, TILE):
        y, jac, saved = torch.ops.jacext.mlp_jacobian(x, spec.weights, biases, spec.activations, spec.act_params,
                                                      0, code, tile=tile)
        objective = jac.square().sum() + y.sum()
        if code == REVERSE:  # dy/dh_1 from the same sweep, differentiated too
            objective = objective + saved[jacext.layouts.first_carry_index(3) + 1].sin().sum()
        out[tile] = (jac, torch.autograd.grad(objective, [x, *model.parameters()]))
    torch.testing.assert_close(out[TILE][0], out[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(out[TILE][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _, ref = per_sample_jacobian(model, x)
    torch.testing.assert_close(out[TILE][0], ref, rtol=1e-10, atol=1e-10)


def test_tiled_projections_match_whole_batch():
    model = make_mlp([5, 7, 6, 4], nn.Tanh)
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 3, 4, dtype=torch.float64)
    for strategy in (REVERSE, REVERSE_GRAM):
        whole = values_and_grads(model, x, lambda x: frobenius(model, x, strategy, 0, v))
        tiled = values_and_grads(model, x, lambda x: frobenius(model, x, strategy, 2, v))
        for a, b in zip([tiled[1], *tiled[2]], [whole[1], *whole[2]]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tile_must_not_be_negative():
    model = make_mlp([5, 7, 4], nn.Tanh)
    spec, biases = op_inputs(model, None)
    with pytest.raises(RuntimeError, match="tile must be >= 0"):
        torch.ops.jacext.mlp_jacobian_frobenius(torch.randn(3, 5, dtype=torch.float64), spec.weights, biases,
                                                spec.activations, spec.act_params, REVERSE, tile=-1)


def test_planner_tiles_everyday_widths_and_not_large_ones():
    """The rule (jacext/planner.py tile_size): tiles whose working set fits L2 with enough GEMM
    rows; the whole batch where one sample overflows L2 or the rows per thread are too few."""
    assert 0 < tile_size([64, 256, 256], 256, FORWARD, threads=2) < 256  # the penultimate-layer case
    assert 0 < tile_size([64, 256, 256, 10], 256, REVERSE, threads=2) < 256  # the demo classifier
    assert tile_size([784, 1024, 1024, 1000], 64, FORWARD_GRAM, threads=2) == 0  # a sample overflows L2
    assert tile_size([784, 1024, 1000], 64, GRAM1, threads=2) == 0  # one GEMM row per sample
    assert tile_size([64, 256, 256], 256, FORWARD, device="cuda") == 0
    plan = jacext.explain(make_mlp([64, 256, 256, 10], nn.Tanh), torch.randn(256, 64))
    assert "tile" in repr(plan)


def test_dead_work_is_skipped_and_values_unchanged():
    """x without grad gets no grad_x (None from the op); identity layers save no d, piecewise-linear
    ones no act''; a layer without bias gets no bias gradient; the values are the same."""
    model = make_mlp([5, 7, 6, 4], nn.ReLU, bias=(True, False, True))
    spec, biases = op_inputs(model, None)
    x = torch.randn(6, 5, dtype=torch.float64)
    y, sq, saved = torch.ops.jacext.mlp_jacobian_frobenius(x, spec.weights, biases, spec.activations,
                                                           spec.act_params, REVERSE)
    L = 3
    assert [tuple(t.shape) for t in saved[:L]] == [(6, 7), (6, 6), (0,)]  # relu, relu, identity output
    assert all(tuple(t.shape) == (0,) for t in saved[L:2 * L])  # no act'' anywhere
    grad_sq = torch.rand(6, dtype=torch.float64)
    without = torch.ops.jacext.mlp_jacobian_backward(None, grad_sq, None, x, spec.weights, biases, spec.activations,
                                                     spec.act_params, 0, REVERSE, list(saved), [], input_grad=False)
    with_x = torch.ops.jacext.mlp_jacobian_backward(None, grad_sq, None, x, spec.weights, biases, spec.activations,
                                                    spec.act_params, 0, REVERSE, list(saved), [])
    assert without[0] is None and with_x[0] is not None
    assert tuple(with_x[2][1].shape) == (0,)  # layer 1 has no bias
    for a, b in zip(without[1], with_x[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, sq_ref = jacobian_frobenius_ref(model, x)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-12, atol=1e-12)
    # through autograd: x that does not require grad gets none, the parameters get theirs
    xg = x.clone()
    _, sq2 = jacext.jacobian_frobenius(model, xg)
    sq2.sum().backward()
    assert xg.grad is None and all(p.grad is not None for p in model.parameters())


def _give_freed_memory_back():
    """Start from a cold workspace and a trimmed heap, whatever earlier tests left behind: the
    workspace is process-wide (an earlier test with the same shapes leaves its blocks cached), and
    glibc keeps freed heap pages mapped until malloc_trim."""
    jacext.release_workspace()
    ctypes.CDLL(None).malloc_trim(0)


def test_second_training_step_faults_in_no_new_carry_pages():
    """The workspace keeps freed carries: the second identical step's page faults are a small
    fraction of the pages its carries span (the first step, from a cold workspace, faults them in)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh())
    x = torch.randn(256, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    plan_widths = [64, 256, 256]
    carry_pages = 256 * 64 * 256 * 4 // 4096  # the forward carry U (B, n_0, n_2), float32

    def step():
        y, sq = jacext.jacobian_frobenius(model, x, method="forward")
        loss = sq.mean() + y.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm up what is not jacext's (autograd, the optimizer state, the plan cache)
    _give_freed_memory_back()
    faults, misses = [], []
    for _ in range(3):
        before, misses_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, jacext.workspace_stats()["misses"]
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        misses.append(jacext.workspace_stats()["misses"] - misses_before)
    assert faults[0] > carry_pages and misses[0] > 0, (faults, misses, "the cold step maps its carries", plan_widths)
    # Later steps are served from the workspace. A tile that another thread takes over can put one
    # more block of a size in use at once than any step before did, a miss the workspace then
    # keeps (seen: misses [49, 1, 0]); a workspace that kept nothing would miss as often as cold.
    assert misses[1] + misses[2] <= misses[0] // 10, (misses, "later steps are served from the workspace")
    assert faults[1] < carry_pages // 10 and faults[2] < carry_pages // 10, faults
    stats = jacext.workspace_stats()
    assert stats["hits"] > 0 and stats["cached_bytes"] > 0


def test_workspace_limit_and_release():
    model = make_mlp([64, 256, 256], nn.Tanh, dtype=torch.float32)
    x = torch.randn(128, 64)
    jacext.jacobian_frobenius(model, x, method="forward")
    assert jacext.workspace_stats()["cached_bytes"] > 0
    old = jacext.workspace_stats()["limit_bytes"]
    try:
        jacext.set_workspace_limit(0)
        assert jacext.workspace_stats()["cached_bytes"] == 0
        _, sq = jacext.jacobian_frobenius(model, x, method="forward")  # still correct with no cache
        torch.testing.assert_close(sq, jacobian_frobenius_ref(model, x)[1], rtol=1e-4, atol=1e-4)
        assert jacext.workspace_stats()["cached_bytes"] == 0
    finally:
        jacext.set_workspace_limit(old)
    jacext.jacobian_frobenius(model, x, method="forward")
    jacext.release_workspace()
    assert jacext.workspace_stats()["cached_bytes"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        jacext.set_workspace_limit(-1)


def test_identity_hidden_layer_in_every_mode():
    """A linear hidden layer (no d) inside the net, in every strategy and in tiles."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Identity(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    assert jacext.parse_model(model).activations[0] == act.IDENTITY
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    ref = values_and_grads(model, x, lambda x: jacobian_frobenius_ref(model, x))
    for strategy in (REVERSE, FORWARD, REVERSE_GRAM, FORWARD_GRAM):
        for tile in (0, 2):
            got = values_and_grads(model, x, lambda x: frobenius(model, x, strategy, tile))
            for a, b in zip([got[1], *got[2]], [ref[1], *ref[2]]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def gram_op_fn(weights, biases, codes, params, tile):
    """fn(x, *weights, *biases) -> (y, J J^T) from mlp_jacobian with strategy 2 (the Gram output)."""
    n = len(weights)

    def fn(x, *flat):
        ws, bs = list(flat[:n]), list(flat[n:])
        y, gram, _ = torch.ops.jacext.mlp_jacobian(x, ws, bs, codes, params, 0, REVERSE_GRAM, tile=tile, gram=True)
        return y, gram

    return fn


@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus", "identity"])
@pytest.mark.parametrize("tile", [0, 2])
def test_gram_output_of_mlp_jacobian(activation, tile):
    """mlp_jacobian with strategy 2 returns J J^T at the input by S G S^T (J never formed): values
    and gradients against J J^T from torch.func, gradcheck, gradgradcheck and opcheck."""
    model = make_mlp([6, 4, 5, 3], dict(ACTIVATIONS)[activation], output_activation=nn.Sigmoid)
    spec, biases = op_inputs(model, None)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    fn = gram_op_fn(spec.weights, biases, spec.activations, spec.act_params, tile)
    y, gram = fn(x, *spec.weights, *biases)
    _, jac = per_sample_jacobian(model, x)
    torch.testing.assert_close(gram, jac @ jac.transpose(1, 2), rtol=1e-10, atol=1e-10)
    inputs = [x] + [t.detach().clone().requires_grad_() for t in (*spec.weights, *biases)]
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    torch.library.opcheck(torch.ops.jacext.mlp_jacobian.default,
                          (x, spec.weights, biases, spec.activations, spec.act_params, 0, REVERSE_GRAM),
                          {"tile": tile, "gram": True})


def test_gram_output_with_carry_gradients():
    """Strategy 2's sweep passes the upper layers too: J_l J_l^T for several layers (jacobian_gram)
    and their gradients, the input layer's by the Gram epilogue, against torch.func Jacobians."""
    model = make_mlp([9, 5, 6, 3], nn.Tanh)
    x = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    spec, _ = op_inputs(model, None)
    assert jacext.ops.resolve_strategy("reverse", spec.widths, batch=7) == REVERSE_GRAM  # 5 < 9: the epilogue
    grams = jacext.jacobian_gram(model, x, layer=(0, 1, 2))
    _, jacs = jacext.ops.mlp_jacobians(x, spec.weights, spec.biases, spec.activations, spec.act_params,
                                       layers=(0, 1, 2))
    _, jac0 = per_sample_jacobian(model, x)
    jacs[0] = jac0
    params = [x, *model.parameters()]

    def grads(outputs):
        objective = sum(o.sin().sum() for o in outputs)
        return [torch.zeros_like(p) if g is None else g
                for g, p in zip(torch.autograd.grad(objective, params, allow_unused=True), params)]

    for g, j in zip(grams, jacs):
        torch.testing.assert_close(g, j @ j.transpose(1, 2), rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(grams), grads([j @ j.transpose(1, 2) for j in jacs])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", ["reverse", "forward", "reverse_gram"])
def test_tiles_taken_over_keep_gradients_bitwise_identical(strategy):
    """A thread done with its own tiles takes the last quarter of the others' (for_tiles): each such
    tile sums its weight gradients into a slot of its own, so gradients do not depend on which
    thread ran it. Four threads on this machine's cores (some start late) make tiles change hands:
    the profile must show it, every call's gradients must be equal to the bit, and match the whole
    batch's and torch.func's in float64."""
    model = make_mlp([6, 9, 8, 5], nn.Tanh)
    x = torch.randn(64, 6, dtype=torch.float64, requires_grad=True)
    code = ALL_STRATEGIES[strategy]
    threads = torch.get_num_threads()
    runs, taken_over = [], 0
    try:
        torch.set_num_threads(4)  # 32 tiles of 2: 4 lanes of 8, tails of 2
        for _ in range(10):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                runs.append(values_and_grads(model, x, lambda x: frobenius(model, x, code, 2)))
            taken_over += [e.name for e in prof.events()].count("jacext::tile_taken_over")
    finally:
        torch.set_num_threads(threads)
    assert taken_over > 0, "no tile changed threads: the test did not exercise the tails"
    for run in runs[1:]:
        for a, b in zip([run[0], run[1], *run[2]], [runs[0][0], runs[0][1], *runs[0][2]]):
            assert torch.equal(a, b)
    whole = values_and_grads(model, x, lambda x: frobenius(model, x, code, 0))
    ref = values_and_grads(model, x, lambda x: jacobian_frobenius_ref(model, x))
    for a, b, r in zip([runs[0][0], runs[0][1], *runs[0][2]], [whole[0], whole[1], *whole[2]],
                       [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
