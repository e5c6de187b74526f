"""Where a penalty step's time goes (CPU): the step against its GEMM floor and its overheads.

For each case (as in bench_frobenius; tanh, float32, jacobian_frobenius "auto" forward + backward
of the penalty's mean), in its own process:
  step          the user's step (zero_grad, jacobian_frobenius, mean, backward), median of --steps
  ops only      the same two registered ops (forward, backward) called directly below autograd,
                interleaved with the step: step - ops only = Python, autograd and zero_grad
  wrapper split the step's own Python and autograd time, in the step (after the ops, whose
                streams of memory leave the interpreter's data out of cache): zero_grad, jacext
                before and after the forward op (timestamps at the op's entry and exit, from a
                stand-in for torch.ops.jacext), mean; the rest of the wrapper is the backward
                outside its op (the autograd engine and jacext's C++ node,
                csrc/frobenius_autograd.cpp, which calls the backward op unseen from Python)
  GEMM floor    the planner's multiply-adds at this machine's GEMM rate: one thread's rate on a
                256 x 256 x 256 product (MKL at its peak here; 10th percentile time, the better
                of a measurement before and after the step's) times the threads, no other work
  profiler      torch.profiler's self CPU time per step, summed over the threads, by kind: GEMMs
                (aten mm/addmm/bmm), jacext's elementwise passes (jacext::*_cpu), other ATen ops
                (views, adds, copies, tanh), and the rest of the CPU time the threads had
                (threads x step: waiting, Python, dispatch). The profiler adds its own cost to
                every op, so the small ops' shares read high.

    python bench/profile_step.py --cases P2,P5 --out bench/results/profile_step_cpu.json
    python bench/profile_step.py --smoke      # a tiny case, seconds (CI)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench_frobenius import CASES as FROBENIUS_CASES, SMOKE_CASES  # the cases' one home
from common import machine_description, report, run_worker, write_results  # bench/common.py

CASES = {**FROBENIUS_CASES, **SMOKE_CASES}
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def gemm_rate(n: int = 256, repeats: int = 400) -> float:
    """Multiply-adds per second of one thread on an n x n x n float32 product, at its 10th
    percentile time: the rate the core reaches, for a floor (a busy moment would lower a median)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        for _ in range(20):
            torch.mm(a, b, out=c)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return n ** 3 / sorted(times)[len(times) // 10]


class _TimedOps:
    """Stands in for torch.ops.jacext in jacext._jacobian_ops and records when each op called from Python
    starts and ends (the backward op is called from the C++ autograd node, unseen)."""

    def __init__(self, ops):
        self.ops, self.marks = ops, {}

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def timed(*args, **kwargs):
            self.marks[name] = [time.perf_counter()]
            result = op(*args, **kwargs)
            self.marks[name].append(time.perf_counter())
            return result
        return timed


def wrapper_split(model, x, steps):
    """Median seconds of each part of the step outside the two ops that Python sees (see the
    module's docstring)."""
    import jacext
    import jacext._jacobian_ops

    timed = _TimedOps(torch.ops.jacext)
    real, jacext._jacobian_ops.compiled = jacext._jacobian_ops.compiled, timed
    parts = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            sq = jacext.jacobian_frobenius(model, x)[1]
            t2 = time.perf_counter()
            loss = sq.mean()
            t3 = time.perf_counter()
            loss.backward()
            f0, f1 = timed.marks["mlp_jacobian_frobenius"]
            parts.append({"zero_grad": t1 - t0, "before_forward_op": f0 - t1, "after_forward_op": t2 - f1,
                          "mean": t3 - t2})
    finally:
        jacext._jacobian_ops.compiled = real
    return {key: statistics.median(p[key] for p in parts) for key in parts[0]}


def worker(case, steps):
    import jacext
    from jacext.activations import IDENTITY
    from jacext.planner import Split, penalty_macs, resolve_strategy, tile_size
    from torch.profiler import profile

    widths, batch, output_activation = CASES[case]
    torch.manual_seed(0)
    model = jacext.MLP(widths, activation="tanh", output_activation=output_activation)
    x = torch.randn(batch, widths[0])
    spec = jacext.nn.parse_model(model)
    weights = [w.detach() for w in spec.weights]
    biases = [b.detach() for b in spec.biases]
    strategy = resolve_strategy("auto", widths, batch=batch, output_linear=spec.activations[-1] == IDENTITY)
    tile = tile_size(widths, batch, strategy, x.element_size())
    if isinstance(strategy, Split):  # its step is two jacobian ops and their combination, not these two ops
        sys.exit(f"{case} plans a {strategy.name}; profile_step times the single-op plans only")

    def step():
        model.zero_grad(set_to_none=True)
        jacext.jacobian_frobenius(model, x)[1].mean().backward()

    def ops_only():
        with torch._C._AutoDispatchBelowAutograd():
            _, sq, saved = torch.ops.jacext.mlp_jacobian_frobenius(x, weights, biases, spec.activations, spec.act_params,
                                                       strategy, None, tile=tile)
            torch.ops.jacext.mlp_jacobian_backward(None, torch.full_like(sq, 1 / batch), None, x, weights, biases,
                                       spec.activations, spec.act_params, 0, strategy, saved, [], None, tile=tile,
                                       input_grad=False)

    rate_before = gemm_rate()
    for _ in range(5):
        step()
        ops_only()
    step_s, ops_s = [], []
    for _ in range(steps):  # interleaved, so that a noisy machine's drift hits both alike
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        ops_only()
        step_s.append(t1 - t0)
        ops_s.append(time.perf_counter() - t1)

    split = wrapper_split(model, x, steps)
    profiled = max(steps // 5, 5)
    with profile() as prof:
        for _ in range(profiled):
            step()
    kinds = {"gemm": 0.0, "jacext_passes": 0.0, "other_aten": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / profiled
        if event.key in GEMMS:
            kinds["gemm"] += seconds
        elif event.key.startswith("jacext::") and event.key.endswith("_cpu"):
            kinds["jacext_passes"] += seconds
        elif event.key.startswith("aten::"):
            kinds["other_aten"] += seconds
    threads = torch.get_num_threads()
    step_median = statistics.median(step_s)
    wrapper = statistics.median(a - b for a, b in zip(step_s, ops_s))
    macs = penalty_macs(widths, batch, strategy)
    rate = max(rate_before, gemm_rate())
    report({"case": case, "widths": widths, "batch": batch, "tile": tile, "threads": threads, "macs": macs,
            "step_s": step_median, "ops_only_s": statistics.median(ops_s),
            "wrapper_s": wrapper, "wrapper_split_s": {**split, "rest_backward_outside_op": wrapper - sum(split.values())},
            "gemm_rate_one_thread": rate, "gemm_floor_s": macs / (threads * rate),
            "profiler_cpu_s_per_step": kinds,
            "profiler_rest_cpu_s_per_step": threads * step_median - sum(kinds.values())})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="P2,P5")
    parser.add_argument("--steps", type=int, default=200, help="interleaved step / ops-only pairs per case")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="bench_frobenius's tiny case S1, 10 steps")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    if args.smoke:
        args.cases, args.steps = "S1", 10
    results = []
    for case in args.cases.split(","):
        if case not in CASES:
            sys.exit(f"unknown case {case!r}; expected some of {','.join(CASES)}")
        results.append(run_worker(__file__, ["--worker", case, args.steps], case))
    print(f"\n{machine_description()}")
    print(f"{'case':5} {'tile':>4} {'step ms':>8} {'ops only':>8} {'wrapper':>8} {'GEMM floor':>10} {'floor/step':>10}"
          f"   profiler CPU ms per step: GEMM / jacext passes / other ATen / rest (of threads x step)")
    for r in results:
        k = r["profiler_cpu_s_per_step"]
        print(f"{r['case']:5} {r['tile']:4d} {r['step_s'] * 1e3:8.2f} {r['ops_only_s'] * 1e3:8.2f} "
              f"{r['wrapper_s'] * 1e3:8.2f} {r['gemm_floor_s'] * 1e3:10.2f} {r['gemm_floor_s'] / r['step_s']:10.2f}"
              f"   {k['gemm'] * 1e3:.1f} / {k['jacext_passes'] * 1e3:.1f} / {k['other_aten'] * 1e3:.1f} / "
              f"{r['profiler_rest_cpu_s_per_step'] * 1e3:.1f}")
    print("\nthe wrapper in the step, us (median): zero_grad / jacext before the forward op / after it / mean / "
          "the rest (the backward outside its op)")
    for r in results:
        print(f"{r['case']:5} " + " / ".join(f"{v * 1e6:.0f}" for v in r["wrapper_split_s"].values()))
    rates = ", ".join(f"{r['case']} {r['gemm_rate_one_thread'] / 1e9:.1f}" for r in results)
    print(f"GEMM rate, one thread, 256^3 float32, G multiply-adds/s (each case's process): {rates}")
    write_results(args.out, "profile_step", "cpu", args.smoke, {"machine": machine_description(), "date":
                                                           time.strftime("%Y-%m-%d"), "results": results})


if __name__ == "__main__":
    main()
