"""Which exact strategy to run: a multiply-add count per strategy, and the choice it implies.

The op's `strategy` argument (csrc/mlp_jacobian.h): carry the m output rows back (REVERSE),
carry the n_layer input columns forward (FORWARD), carry rows back and end the Frobenius norm
with the Gram epilogue (REVERSE_GRAM), carry columns forward and end with the mirror epilogue at
a linear output layer (FORWARD_GRAM), or, for one hidden layer and a linear output, d^T M d with
the sample-independent M = (W_1 W_1^T) .* (W_2^T W_2) (GRAM1). A `Split` at hidden layer s
runs two Jacobian ops instead, C = dh_s/dx on layers 1..s and A = dy/dh_s on the rest, and
combines them per sample: ||J||^2 = sum((A^T A) .* (C C^T)), which wins where a narrow layer
(a bottleneck) sits between wide inputs and outputs."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .activations import IDENTITY, LEAKY_RELU, RELU
from .layouts import (CARRY_FORWARD, DIAGONAL_GRAM1, FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM,
                      TRACE_GRAM2, CarryLayout, carry_saved_shapes, diagonal_layout, first_carry_index,
                      laplacian_layout, saved_shapes)

STRATEGY_NAMES = {REVERSE: "reverse", FORWARD: "forward", REVERSE_GRAM: "reverse + Gram epilogue",
                  GRAM1: "one-hidden-layer Gram", FORWARD_GRAM: "forward + Gram epilogue"}


@dataclass(frozen=True)
class Split:
    """||J||^2 from J = A C split at hidden layer `layer` (s): C = dh_s/dx (n_s, n_0) by the
    jacobian op with strategy `bottom` on layers 1..s, A = dy/dh_s (m, n_s) by the op with
    strategy `top` on layers s+1..L; per sample sum((A^T A) .* (C C^T)) when `gram`, else
    ||A C||^2 (whichever needs fewer multiply-adds)."""
    layer: int
    bottom: int
    top: int
    gram: bool

    @property
    def name(self) -> str:
        return f"split at layer {self.layer} ({'Grams' if self.gram else 'A C'})"


Strategy = Union[int, Split]


def _cheapest(candidates, cost):
    """The first candidate of least cost, or None (a plain loop, which torch.compile traces)."""
    best = None
    for candidate in candidates:
        if best is None or cost(candidate) < cost(best):
            best = candidate
    return best


def strategy_name(strategy: Strategy) -> str:
    return strategy.name if isinstance(strategy, Split) else STRATEGY_NAMES[strategy]


def _split_macs(widths: Sequence[int], batch: int, split: Split) -> int:
    n, s = list(widths), split.layer
    m, n0, ns = n[-1], n[0], n[s]
    # the per-sample combination runs three times too: forward, and two products in the backward
    combine = 3 * batch * ns * ns * (m + n0) if split.gram else 3 * batch * m * ns * n0
    return penalty_macs(n[:s + 1], batch, split.bottom) + penalty_macs(n[s:], batch, split.top) + combine


def best_split(widths: Sequence[int], batch: int) -> Optional[Split]:
    """The split of least predicted cost over every hidden layer (None without one)."""
    n = list(widths)
    splits = []
    for s in range(1, len(n) - 1):
        bottom = _cheapest((REVERSE, FORWARD), lambda st: predicted_cost(n[:s + 1], batch, st, frobenius=False))
        top = _cheapest((REVERSE, FORWARD), lambda st: predicted_cost(n[s:], batch, st, frobenius=False))
        splits.append(Split(s, bottom, top, n[s] * (n[-1] + n[0]) < n[-1] * n[0]))
    return _cheapest(splits, lambda split: predicted_cost(n, batch, split))


# The cost model's second term: the elementwise work around the GEMMs (the scaling passes, the
# backward's row-wise dots, the square-sums), per element of the per-sample tensors a plan
# carries, in multiply-add equivalents. Refitted by least squares to every exact jacext row of a
# bench_frobenius run (it prints the fit; docs/benchmarks.md has the fit's history).
CARRY_ELEMENT_COST = 180


def carry_elements(widths: Sequence[int], batch: int, strategy: Strategy, layer: int = 0,
                   rows: Optional[int] = None, frobenius: bool = True) -> int:
    """Elements of the per-sample tensors a plan carries: the op's carries (its `saved` beyond the
    activations), and for a split J's two factors and the per-sample products. A Jacobian (not
    its norm) adds the returned J."""
    n = list(widths)
    if isinstance(strategy, Split):
        s, m, n0, ns = strategy.layer, n[-1], n[0], n[strategy.layer]
        combine = 2 * ns * ns if strategy.gram else m * n0
        return (carry_elements(n[:s + 1], batch, strategy.bottom, frobenius=False)
                + carry_elements(n[s:], batch, strategy.top, frobenius=False) + batch * combine)
    depth = len(n) - 1
    carries = saved_shapes(n, batch, layer, strategy, rows)[first_carry_index(depth):]
    # forward mode's first carry W^T D (B, n_layer, n_layer+1) is formed, not saved
    first = batch * n[layer] * n[layer + 1] if strategy in (FORWARD, FORWARD_GRAM) else 0
    returned = 0 if frobenius else batch * n[-1] * n[layer]
    return sum(math.prod(shape) for shape in carries) + first + returned


def predicted_cost(widths: Sequence[int], batch: int, strategy: Strategy, layer: int = 0,
                   projections: int = 0, frobenius: bool = True) -> int:
    """What the planner minimizes, in multiply-add equivalents: GEMM multiply-adds plus the
    elementwise passes over the carries (CARRY_ELEMENT_COST per element)."""
    return (penalty_macs(widths, batch, strategy, layer, projections)
            + CARRY_ELEMENT_COST * carry_elements(widths, batch, strategy, layer, projections or None, frobenius))


def penalty_macs(widths: Sequence[int], batch: int, strategy: Strategy, layer: int = 0,
                 projections: int = 0) -> int:
    """GEMM multiply-adds of one forward + backward of the op for layer widths [n_0, ..., n_L]
    (elementwise work is not counted). Each carry GEMM runs three times: forward, and in the
    backward once for the carry's adjoint and once for the weight gradient; so does each of the
    MLP's own GEMMs. With k = `projections` random rows (the estimator) the reverse carry has k
    rows instead of m, and starts with one more GEMM (V D_L W_L)."""
    if isinstance(strategy, Split):
        return _split_macs(widths, batch, strategy)
    n = list(widths)
    m, depth = (projections or n[-1]), len(n) - 1
    mlp = 3 * batch * sum(n[i] * n[i + 1] for i in range(depth))
    if projections:
        if strategy in (FORWARD, FORWARD_GRAM, GRAM1):
            raise ValueError("projections are carried in reverse mode only")
        mlp += 3 * batch * projections * n[-1] * n[-2]
    if strategy == FORWARD:  # the first carry is W_{layer+1}^T itself: no GEMM
        return mlp + 3 * batch * n[layer] * sum(n[i] * n[i + 1] for i in range(layer + 1, depth))
    if strategy == REVERSE:  # the first carry is D_L W_L itself: no GEMM
        return mlp + 3 * batch * m * sum(n[i] * n[i + 1] for i in range(layer, depth - 1))
    if strategy == GRAM1:  # G1, G2 and M d forward; dM, then dW_1 and dW_2 backward
        return mlp + 2 * n[1] ** 2 * (n[0] + n[2]) + 2 * batch * n[1] ** 2
    if strategy == REVERSE_GRAM:  # carry down to R^(1); G = W_1 W_1^T replaces the last GEMM
        carry = 3 * batch * m * sum(n[i] * n[i + 1] for i in range(1, depth - 1))
        return mlp + carry + 2 * n[1] ** 2 * n[0] + 2 * batch * m * n[1] ** 2
    if strategy == FORWARD_GRAM:  # carry up to T^(L-1); H = W_L^T W_L replaces the last GEMM
        carry = 3 * batch * n[0] * sum(n[i] * n[i + 1] for i in range(1, depth - 1))
        return mlp + carry + 2 * n[-2] ** 2 * n[-1] + 2 * batch * n[0] * n[-2] ** 2
    raise ValueError(f"unknown strategy {strategy}")


def _l2_cache_bytes() -> int:
    """One core's L2 cache (Linux sysfs), or 512 KiB where it cannot be read."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, KeyError, IndexError):
        return 512 * 2**10


L2_CACHE_BYTES = _l2_cache_bytes()
# A tile's working set is about this many copies of its largest per-sample carry (the saved carry,
# the scaled GEMM input, the adjoint and the GEMM's output in the backward).
TILE_WORKING_COPIES = 4
# Fewer GEMM rows than this per tile and the per-call overhead and the weight's trips through the
# cache cost more than the cache saves (measured: bench/bench_tiles.py, bench/results/tiles_cpu.json).
MIN_TILE_ROWS = 256


def tile_size(widths: Sequence[int], batch: int, strategy: int, element_size: int = 4,
              rows: Optional[int] = None, layer: int = 0, device="cpu", threads: Optional[int] = None) -> int:
    """Samples per tile for the op (0: the whole batch in one tile). On the CPU a tile holds the
    samples whose working set (TILE_WORKING_COPIES copies of the largest per-sample carry) fits one
    core's L2 cache, but at least MIN_TILE_ROWS GEMM rows and at most an equal share of the batch
    per thread, and as many tiles for every thread. The whole batch runs at once where one
    sample's working set alone overflows L2 (tiles would not stay in cache) or where a thread's
    share has too few GEMM rows (MKL splits one large GEMM better). CUDA, and a graph under
    torch.compile, run the whole batch. Cached by its arguments."""
    if (torch.device(device).type != "cpu" or not isinstance(batch, int) or batch == 0
            or torch.compiler.is_compiling()):  # a compiled graph runs the batch in one call
        return 0
    threads = torch.get_num_threads() if threads is None else threads
    return _cached_tile(tuple(widths), batch, strategy, element_size, rows, layer, threads)


@functools.lru_cache(maxsize=512)
def _cached_tile(widths, batch: int, strategy: int, element_size: int, rows: Optional[int], layer: int,
                 threads: int) -> int:
    """tile_size on the CPU, for a thread count."""
    n, depth = list(widths), len(widths) - 1
    carries = saved_shapes(n, 1, layer, strategy, rows)[first_carry_index(depth):]
    per_sample = [math.prod(shape[1:]) for shape in carries if shape[0] == 1]
    if strategy in (FORWARD, FORWARD_GRAM):  # the first carry W^T D is formed per tile, not saved
        per_sample.append(n[layer] * n[layer + 1])
    working_set = TILE_WORKING_COPIES * max(per_sample + [max(n)]) * element_size
    # rows per sample of the carries' GEMMs
    gemm_rows = 1 if strategy == GRAM1 else n[layer] if strategy in (FORWARD, FORWARD_GRAM) else (rows or n[-1])
    return _balanced_tile(working_set, gemm_rows, batch, threads)


def _balanced_tile(working_set: int, gemm_rows: int, batch: int, threads: int, min_rows: int = MIN_TILE_ROWS) -> int:
    """tile_size's rule from one sample's working set (bytes) and GEMM rows."""
    share = -(-batch // max(threads, 1))
    if working_set > L2_CACHE_BYTES or share * gemm_rows < min_rows:
        return 0
    tile = min(share, max(L2_CACHE_BYTES // working_set, -(-min_rows // gemm_rows)))
    # as many tiles per thread: a thread with one tile more than the others would set the pace
    tiles = -(-batch // tile)
    tiles = -(-tiles // threads) * threads
    tile = -(-batch // tiles)
    return 0 if tile >= batch else tile


def op_element_size(x: torch.Tensor) -> int:
    """Bytes per element of the dtype the ops run in for x: float32's under autocast for a half x
    (the ops cast it; memory estimates and tiles count that), x's own otherwise."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return 4
    return x.element_size()


def footprint(widths: Sequence[int], batch: int, strategy: Strategy, element_size: int = 4,
              rows: Optional[int] = None) -> int:
    """Estimated peak bytes of one forward + backward of the op: what it saves for the backward,
    plus two temporaries the size of its largest carry (the backward sweep's adjoint and the
    carry it recomputes). A split: both ops, J's two factors and the per-sample products."""
    if isinstance(strategy, Split):
        n, s = list(widths), strategy.layer
        m, n0, ns = n[-1], n[0], n[s]
        combine = batch * (2 * ns * ns if strategy.gram else m * n0) + batch * ns * (m + n0)
        return (footprint(n[:s + 1], batch, strategy.bottom, element_size)
                + footprint(n[s:], batch, strategy.top, element_size) + element_size * combine)
    sizes = [math.prod(shape) for shape in saved_shapes(widths, batch, 0, strategy, rows)]
    return element_size * (sum(sizes) + 2 * max(sizes))


def default_memory_budget(device) -> int:
    """A quarter of the device's memory, room for the model, the optimizer and the data beside; on a
    GPU at most half of what was free when jacext first planned for it (cached per device: asking
    the driver every step would cost more than a small step's work)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_memory_budget(torch.cuda.current_device() if device.index is None else device.index)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


@functools.lru_cache(maxsize=None)
def _cuda_memory_budget(index: int) -> int:
    free, total = torch.cuda.mem_get_info(index)
    return min(total // 4, free // 2)


def batch_chunk(widths: Sequence[int], batch, strategy: Strategy, element_size: int, max_memory: int,
                rows: Optional[int] = None):
    """The most samples per op call whose footprint stays under max_memory (at least one)."""
    if batch == 0:
        return batch
    per_sample, fixed = _footprint_terms(tuple(widths), strategy, element_size, rows)
    return max(1, min(batch, (max_memory - fixed) // max(per_sample, 1)))


@functools.lru_cache(maxsize=512)
def _footprint_terms(widths, strategy: Strategy, element_size: int, rows: Optional[int]):
    """footprint's bytes per sample and sample-independent bytes (cached: batch_chunk runs every step)."""
    one = footprint(widths, 1, strategy, element_size, rows)
    per_sample = footprint(widths, 2, strategy, element_size, rows) - one
    return per_sample, one - per_sample  # the sample-independent bytes: the Grams


def applicable(strategy: int, widths: Sequence[int], layer: int = 0, frobenius: bool = True,
               projections: int = 0, output_linear: bool = False) -> bool:
    """Whether the op can run `strategy` for this request (the checks of csrc/mlp_jacobian.h)."""
    norm_of_input_jacobian = frobenius and layer == 0
    if strategy == REVERSE:
        return True
    if strategy == FORWARD:
        return not projections
    if strategy == REVERSE_GRAM:
        return norm_of_input_jacobian and len(widths) >= 3
    if strategy == FORWARD_GRAM:
        return norm_of_input_jacobian and len(widths) >= 3 and output_linear and not projections
    if strategy == GRAM1:
        # J = W_2 D_1 W_1: two layers, no output activation
        return norm_of_input_jacobian and len(widths) == 3 and output_linear and not projections
    raise ValueError(f"unknown strategy {strategy}")


def resolve_strategy(method: str, widths: Sequence[int], layer: int = 0, frobenius: bool = True,
                     batch: int = 64, projections: int = 0, output_linear: bool = False,
                     skips: bool = False) -> Strategy:
    """The strategy for a method name (_choose_strategy), cached by its arguments: planning a step
    costs a few hundred microseconds, more than a small step's GPU work."""
    if not isinstance(batch, int):  # a symbolic size under torch.compile: plan for a typical batch
        batch = 64
    if torch.compiler.is_compiling():  # traced, not cached
        return _choose_strategy(method, tuple(widths), layer, frobenius, batch, projections, output_linear, skips)
    return _cached_strategy(method, tuple(widths), layer, frobenius, batch, projections, output_linear, skips)


def _choose_strategy(method: str, widths: Sequence[int], layer: int = 0, frobenius: bool = True,
                     batch: int = 64, projections: int = 0, output_linear: bool = False,
                     skips: bool = False) -> Strategy:
    """The strategy for a method name ("hutchinson": the reverse carry of k = `projections`
    random rows; "gram": the one-hidden-layer Gram formula where it applies, else the cheapest of
    the Gram epilogues and the splits).

    "reverse" and "forward" end the Frobenius norm with their Gram epilogue when that costs less
    (predicted_cost: multiply-adds plus the carries' elementwise traffic); "auto" takes whichever
    exact strategy, split included, costs least (reverse on a tie).

    With residual skips (`skips`) only the plain reverse and forward carries apply (csrc/mlp_jacobian.h):
    the Gram forms (epilogues, one-hidden-layer, split) factor J through single layers, which a skip
    bypasses."""
    if method not in ("auto", "reverse", "forward", "gram", "hutchinson"):
        raise ValueError(f"unknown method {method!r} for the op; expected 'auto', 'reverse', 'forward', "
                         f"'gram' or 'hutchinson'")
    if skips:
        if method == "gram":
            raise ValueError("method='gram' does not apply across a residual skip: the Jacobian ops carry a model "
                             "with skips in reverse or forward (method 'auto', 'reverse', 'forward' or 'hutchinson')")
        if method == "auto":
            return _cheapest([REVERSE, FORWARD], lambda strategy: predicted_cost(widths, batch, strategy, layer,
                                                                             projections, frobenius))
        return FORWARD if method == "forward" else REVERSE
    def able(strategy):
        return applicable(strategy, widths, layer, frobenius, projections, output_linear)

    def cost(strategy):
        return predicted_cost(widths, batch, strategy, layer, projections, frobenius)

    split = best_split(widths, batch) if frobenius and layer == 0 and not projections else None
    if method == "gram":
        if able(GRAM1):
            return GRAM1
        grams = [st for st in (REVERSE_GRAM, FORWARD_GRAM) if able(st)] + ([split] if split else [])
        if not grams:
            raise ValueError("method='gram' needs the norm of the input Jacobian of a net with a hidden "
                             f"layer; got widths {list(widths)}")
        return _cheapest(grams, cost)
    reverse = REVERSE_GRAM if able(REVERSE_GRAM) and cost(REVERSE_GRAM) < cost(REVERSE) else REVERSE
    forward = FORWARD_GRAM if able(FORWARD_GRAM) and cost(FORWARD_GRAM) < cost(FORWARD) else FORWARD
    if method in ("reverse", "hutchinson"):
        return reverse
    if method == "forward":
        return forward
    candidates = [reverse, forward] + ([GRAM1] if able(GRAM1) else []) + ([split] if split else [])
    return _cheapest(candidates, cost)


_cached_strategy = functools.lru_cache(maxsize=512)(_choose_strategy)


# ---------------------------------------------------------------------------------------------
# The forward-carry ops (csrc/mlp_laplacian.h): the Laplacian, the Jacobian diagonal and the
# divergence. A plan carries `rows` rows per sample, [h; c tangent rows; Delta], through the first
# `carried` layers; above them the op's epilogue maps what it needs.

DIAGONAL_STRATEGY_NAMES = {CARRY_FORWARD: "forward columns + diagonal epilogue",
                           DIAGONAL_GRAM1: "one-hidden-layer closed form", TRACE_GRAM2: "two-hidden-layer trace"}


def carry_macs(widths: Sequence[int], batch: int, layout: CarryLayout, strategy: int = CARRY_FORWARD,
               gated: Sequence[int] = ()) -> int:
    """GEMM multiply-adds of one forward + backward of a forward-carry op (elementwise work not
    counted): a carried layer's GEMM over `rows` rows runs three times (forward, the weight
    gradient, the adjoint; the first layer's adjoint on the h row alone), four with a per-sample
    gate (`gated`: those layers; the backward recomputes the unscaled rows for the gate's
    gradient), the layers above once per mapped row, and the epilogues' own products."""
    n, depth, rows = list(widths), len(widths) - 1, layout.rows
    macs = 0
    for i in range(layout.carried):
        passes = 3 if i in gated else 2  # forward and weight gradient (and the gate's recomputation)
        macs += batch * n[i] * n[i + 1] * (rows * passes + (rows if i > 0 else 1))
    if layout.carried < depth:  # the thin top: h and Delta (Laplacian) or h and the row-dots (diagonal)
        macs += 3 * batch * n[-2] * n[-1] * (2 if layout.laplacian else 1)
        if not layout.laplacian:
            macs += 2 * batch * n[0] * n[-2]
    if strategy == DIAGONAL_GRAM1:  # d_1 M, its adjoint and dM
        macs += 3 * batch * n[1] * n[0]
    elif strategy == TRACE_GRAM2:  # C = W_1 W_3 and its two gradient products once; d_1 M^T, adjoint, dM
        macs += 3 * n[1] * n[0] * n[2] + 3 * batch * n[1] * n[2]
    return macs


def carry_cost(widths: Sequence[int], batch: int, activations: Sequence[int], layout: CarryLayout,
               strategy: int = CARRY_FORWARD, gated: Sequence[int] = ()) -> int:
    """What the planner minimizes, as predicted_cost: multiply-adds plus CARRY_ELEMENT_COST per
    element of the saved carries; gated as in carry_macs."""
    carried = sum(math.prod(shape) for shape in carry_saved_shapes(widths, batch, activations, layout)[3 * (len(widths) - 1):])
    return carry_macs(widths, batch, layout, strategy, gated) + CARRY_ELEMENT_COST * carried


def diagonal_applicable(strategy: int, widths: Sequence[int], trace: bool, output_linear: bool,
                        projections: int = 0, residual: Optional[Sequence[int]] = None,
                        per_sample: bool = False) -> bool:
    """Whether mlp_jacobian_diagonal can run `strategy` (the checks of csrc/mlp_laplacian.h): the
    closed forms carry h alone, so they take neither projections nor a residual skip, and their
    sample-independent matrices hold no per-sample bias, gate or dropout mask (`per_sample`)."""
    depth = len(widths) - 1
    if strategy == CARRY_FORWARD:
        return True
    if projections or residual is not None or per_sample:
        return False
    if strategy == DIAGONAL_GRAM1:
        return depth == 2
    if strategy == TRACE_GRAM2:
        return trace and depth == 3 and output_linear
    raise ValueError(f"unknown strategy {strategy}")


DIAGONAL_METHODS = ("auto", "forward", "gram", "hutchinson")


def resolve_diagonal_strategy(method: str, widths: Sequence[int], activations: Sequence[int], trace: bool,
                              batch: int = 64, residual: Optional[Sequence[int]] = None,
                              per_sample: bool = False) -> int:
    """The strategy for jacobian_diagonal (trace=False) or divergence (trace=True): "forward"
    carries the input columns; "gram" takes the closed form with a sample-independent matrix
    (one hidden layer; for the trace, two hidden layers and a linear output too; never across a
    residual skip or with per-sample biases, gates or dropout masks: `per_sample`); "hutchinson" carries
    projected columns; "auto" the exact strategy of least carry_cost."""
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {DIAGONAL_METHODS}")
    if not isinstance(batch, int):  # a symbolic size under torch.compile
        batch = 64
    output_linear = activations[-1] == IDENTITY
    closed = [st for st in (DIAGONAL_GRAM1, TRACE_GRAM2)
              if diagonal_applicable(st, widths, trace, output_linear, residual=residual, per_sample=per_sample)]
    if method in ("forward", "hutchinson"):
        return CARRY_FORWARD
    if method == "gram":
        if not closed:
            what = "a net with one hidden layer, or for the divergence two and a linear output layer"
            skip = f" and no residual skip (the model's skips: {list(residual)})" if residual is not None else ""
            skip += " and no per-sample bias, gate or dropout mask" if per_sample else ""
            raise ValueError(f"method='gram' needs {what}{skip}; got widths {list(widths)}")
        return closed[0]
    return _cheapest([CARRY_FORWARD] + closed,
                     lambda st: carry_cost(widths, batch, activations, diagonal_layout(widths, st, residual=residual),
                                           st))


# A carry tile's GEMMs have at least this many rows: below it they run slower and the ~20 ATen calls
# per layer and tile cost more than the cache saves. Measured on one thread of a loaded 2-core EPYC
# (so indicative): bench_laplacian's L1 at 208 samples per tile in 0.95x the median time of 52
# (MIN_TILE_ROWS), L2 at 88 in 0.86x that of 22, examples/pinn_poisson.py's net at 256 in 0.8x the
# best time of 128.
CARRY_MIN_TILE_ROWS = 1024


def carry_tile_size(widths: Sequence[int], batch, layout: CarryLayout, element_size: int = 4, device="cpu",
                    threads: Optional[int] = None) -> int:
    """tile_size's rule for a forward carry (samples per tile, 0 for the whole batch): one sample's
    working set is TILE_WORKING_COPIES copies of its widest carry, its GEMMs have `rows` rows, and a
    tile at least CARRY_MIN_TILE_ROWS; with fewer rows per thread than that, one tile per thread."""
    if (torch.device(device).type != "cpu" or not isinstance(batch, int) or batch == 0
            or torch.compiler.is_compiling()):
        return 0
    threads = torch.get_num_threads() if threads is None else threads
    working_set = TILE_WORKING_COPIES * layout.rows * max(widths) * element_size
    share = -(-batch // max(threads, 1))
    if working_set <= L2_CACHE_BYTES and share * layout.rows < CARRY_MIN_TILE_ROWS:
        # too few rows for tiles that pay in cache, but one tile per thread still runs the carry's
        # own passes on every thread (the whole batch in one call runs them on one); measured on
        # small carries in docs/benchmarks.md ("Users' own models")
        return share if share < batch else 0
    return _balanced_tile(working_set, layout.rows, batch, threads, CARRY_MIN_TILE_ROWS)


# ---------------------------------------------------------------------------------------------
# The large-margin loss on the engine (margin.py): which rows carry the gradient norms.

MARGIN_PATHS = ("rows", "jacobian")


def margin_costs(widths: Sequence[int], batch: int, layers: Sequence[int], rows: int, q: float,
                 constant: bool, residual: Optional[Sequence[int]] = None) -> dict:
    """{path: (GEMM multiply-adds, predicted cost)} of one forward + backward of the large-margin
    loss (or margin_distances) on the engine, for `rows` direction rows per sample (top_k, or m for
    every class), the gradient norm's order q (1, 2 or inf) and constant norms (use_approximation).

    "rows": the forward in torch ops, then the `rows` directions u carried back from the logits to
    the lowest requested layer, giving u^T J_l at every layer on the way; with constant norms once
    without a graph, else again twice in the backward (the rows' adjoint, the weights' gradient),
    except q = inf's last product, whose backward reads one column per row. With constant norms down
    to the input, the loss's backward reuses the rows (no reverse GEMMs of the MLP's backward).
    "jacobian": the engine's sweep of all m rows (its first carry D_L W_L is free), then J J^T
    (q = 2; at the input the Gram epilogue S (W_1 W_1^T) S^T where cheaper) or u^T J (q = 1, inf;
    q = inf at the input from the factors (u^T S) W_1); with constant norms, forward only, plus
    the model's own forward for the logits.
    Both: the MLP's forward and backward (3 GEMMs per layer), and CARRY_ELEMENT_COST per element of
    the per-sample tensors carried (the rows, the Jacobians), per pass.
    residual (MLPSpec.residual, None without skips): a skip adds elementwise work alone, but the
    factored forms that read J_l as (...) W_{l+1} (the input Gram epilogue; q = inf's last product
    at the lowest layer, on either path) do not apply where a skip leaves h_l, and no Gram epilogue
    applies in a net with skips (mlp_jacobian_grams forms every Gram from its J)."""
    n, depth, m, low = list(widths), len(widths) - 1, widths[-1], min(layers)
    sources = set() if residual is None else {j for j in residual if j >= 0}  # the h_j that skips leave
    passes = 1 if constant else 3
    mlp = batch * sum(n[i] * n[i + 1] for i in range(depth))
    # rows: k rows through every layer from the top down to the lowest one requested
    gemms = [batch * rows * n[i] * n[i + 1] for i in range(low, depth)]
    one_column = not constant and q == math.inf and low not in sources
    rows_macs = 3 * mlp + passes * sum(gemms) - (2 * gemms[0] if one_column else 0)
    if constant and low == 0:  # the loss's backward reuses the sweep's rows (margin._ReusedRows): the
        # MLP backward's reverse GEMMs become a k-row combination per layer
        rows_macs -= sum(batch * n[i] * n[i + 1] - batch * rows * n[i + 1] for i in range(1, depth))
    rows_elements = passes * batch * rows * sum(n[low:depth])
    # jacobian: m rows from D_L W_L down to layer max(low, 1), then the input layer's own way
    input_special = low == 0 and depth >= 2 and (q == 2 and not sources or q == math.inf and 0 not in sources)
    carry = passes * sum(batch * m * n[i] * n[i + 1] for i in range(1 if input_special else low, depth - 1))
    if input_special and q == 2:  # the last GEMM, or the Gram epilogue where cheaper
        epilogue = n[1] ** 2 * n[0] + batch * m * n[1] ** 2  # G = W_1 W_1^T, then S G S^T; twice with the backward
        carry += min(passes * batch * m * n[0] * n[1], (1 if constant else 2) * epilogue)
    elif input_special:  # q = inf: the k rows (u^T S) W_1, one column each in the backward
        carry += batch * rows * n[0] * n[1]
    # the norms: J J^T (q = 2), u^T J (q = 1), u^T J with a one-column backward (q = inf)
    norm_passes = 1 if q == math.inf else passes
    norms = norm_passes * sum(batch * (m * m if q == 2 else rows * m) * n[l] for l in layers
                              if not (l == 0 and input_special))
    jacobian_macs = (3 + constant) * mlp + carry + norms
    jacobian_elements = passes * batch * m * sum(n[low:depth])
    return {"rows": (rows_macs, rows_macs + CARRY_ELEMENT_COST * rows_elements),
            "jacobian": (jacobian_macs, jacobian_macs + CARRY_ELEMENT_COST * jacobian_elements)}


def margin_path(widths: Sequence[int], batch, layers: Sequence[int], rows: int, q: float, constant: bool,
                residual: Optional[Sequence[int]] = None) -> str:
    """The path of least predicted cost (margin_costs), "rows" on a tie; cached by its arguments."""
    if not isinstance(batch, int):  # a symbolic size under torch.compile: plan for a typical batch
        batch = 64
    return _cached_margin_path(tuple(widths), batch, tuple(sorted(layers)), rows, q, bool(constant),
                               None if residual is None else tuple(residual))


@functools.lru_cache(maxsize=512)
def _cached_margin_path(widths, batch, layers, rows, q, constant, residual) -> str:
    costs = margin_costs(widths, batch, layers, rows, q, constant, residual)
    return "rows" if costs["rows"][1] <= costs["jacobian"][1] else "jacobian"
