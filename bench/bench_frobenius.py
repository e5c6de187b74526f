"""Penalty forward+backward: jacext against the ways people compute ||J||_F^2 today.

Each (case, method) runs in its own subprocess so that its peak memory is its own; all run in
this one invocation, on the same machine, and the table gives each method's median time and its
ratio to jacext's automatic choice.

    python bench/bench_frobenius.py                      # P1, P2, P3 on the CPU
    python bench/bench_frobenius.py --device cuda
    python bench/bench_frobenius.py --smoke              # tiny sizes, seconds (CI)

Methods (each: compute the per-sample penalty, take its batch mean, backward to the parameters):
  jacext-auto     the fused exact op with the strategy jacext picks (named in the note)
  jacext-reverse / jacext-forward   the same op forced to carry m rows / n_0 columns
  autograd-loop   one autograd.grad(create_graph=True) per output (the seed code); only
                  --loop-outputs outputs are timed and the time is scaled by m / that number
  vmap-jacrev / vmap-jacfwd         torch.func per-sample Jacobians, then the square-sum
  random-1proj    a one-projection random estimate (v^T J with Gaussian v) in PyTorch, not exact
  jacext-hutchinson-1               the same estimate, fused (Rademacher v)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch

CASES = {
    "P1": ([784, 1024, 1000], 64),
    "P2": ([784, 256, 256, 10], 128),
    "P3": ([784, 1024, 1024, 1000], 64),
}
SMOKE_CASES = {"S1": ([20, 16, 12], 4), "S2": ([12, 16, 16, 3], 5)}
METHODS = ["jacext-auto", "jacext-reverse", "jacext-forward", "autograd-loop", "vmap-jacrev", "vmap-jacfwd", "random-1proj",
           "jacext-hutchinson-1"]


def make_step(method, model, x, loop_outputs):
    """The function that is timed, and the scale that turns its time into the method's time."""
    import jacext
    from torch.func import jacfwd, jacrev, vmap

    def per_sample(xi):
        return model(xi.unsqueeze(0)).squeeze(0)

    m = model[-1].out_features
    scale = 1.0
    if method == "jacext-hutchinson-1":
        def penalty():
            return jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=1)[1]
    elif method.startswith("jacext-"):
        def penalty():
            return jacext.jacobian_frobenius(model, x, method=method.split("-")[1])[1]
    elif method == "vmap-jacrev":
        def penalty():
            return vmap(jacrev(per_sample))(x).pow(2).sum((1, 2))
    elif method == "vmap-jacfwd":
        def penalty():
            return vmap(jacfwd(per_sample))(x).pow(2).sum((1, 2))
    elif method == "autograd-loop":
        outputs = min(loop_outputs, m)
        scale = m / outputs

        def penalty():
            xg = x.detach().requires_grad_()
            y = model(xg)
            sq = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for j in range(outputs):
                (g,) = torch.autograd.grad(y[:, j].sum(), xg, create_graph=True)
                sq = sq + g.pow(2).sum(1)
            return sq
    elif method == "random-1proj":
        def penalty():
            xg = x.detach().requires_grad_()
            y = model(xg)
            v = torch.randn_like(y)
            (g,) = torch.autograd.grad(y, xg, grad_outputs=v, create_graph=True)
            return g.pow(2).sum(1)
    else:
        raise ValueError(method)

    def step():
        model.zero_grad(set_to_none=True)
        sq = penalty()
        sq.mean().backward()
        return sq

    return step, scale


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn):
    """How far the process's resident memory rises above its level before fn() during fn(),
    sampled every half millisecond (large tensors are mapped and unmapped per call)."""
    base = current_rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0] - base, 0)


def worker(case, widths, batch, method, args):
    import jacext
    from torch.utils import benchmark

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = jacext.MLP(widths, activation="tanh").to(device=device, dtype=dtype)
    x = torch.randn(batch, widths[0], device=device, dtype=dtype)
    step, scale = make_step(method, model, x, args.loop_outputs)

    step()  # warm-up: one-time allocations and lazy imports are not the method's memory
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sq = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        sq, peak = peak_rss_growth(step)
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=args.min_run_time)
    median = measurement.median * scale
    result = {
        "case": case, "method": method, "widths": widths, "batch": batch, "device": args.device,
        "dtype": args.dtype, "median_s": median, "runs": len(measurement.times),
        "scaled_from_outputs": (min(args.loop_outputs, widths[-1]) if method == "autograd-loop" else None),
        "peak_bytes": max(int(peak), 0),
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth during one step",
        "sq_mean": float(sq.detach().double().mean()),
    }
    if method.startswith("jacext-"):
        from jacext.planner import STRATEGY_NAMES, penalty_macs, resolve_strategy

        projections = 1 if method == "jacext-hutchinson-1" else 0
        strategy = resolve_strategy(method.split("-")[1], widths, batch=batch, projections=projections,
                                    output_linear=True)  # jacext.MLP: no output activation
        result["strategy"] = STRATEGY_NAMES[strategy]
        macs = penalty_macs(widths, batch, strategy, projections=projections)
        result["gflop"] = 2 * macs / 1e9
        result["gflops_per_s"] = 2 * macs / median / 1e9
    print("RESULT " + json.dumps(result))


def machine_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def print_table(machine, dtype, results):
    print(f"\n{machine}; {dtype}; penalty forward+backward, median of timed runs\n", flush=True)
    header = f"{'case':5} {'method':20} {'median ms':>11} {'x jacext-auto':>13} {'peak MB':>9} {'GFLOP/s':>8}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        note = []
        if "strategy" in r:
            note.append(r["strategy"])
        if r["scaled_from_outputs"]:
            note.append(f"{r['scaled_from_outputs']} of {r['widths'][-1]} outputs timed, time scaled, memory not")
        if r["method"] in ("random-1proj", "jacext-hutchinson-1"):
            note.append("estimate, not exact")
        gflops = f"{r['gflops_per_s']:8.1f}" if "gflops_per_s" in r else " " * 8
        ratio = f"{r['time_vs_jacext_auto']:13.3g}" if "time_vs_jacext_auto" in r else " " * 13
        print(f"{r['case']:5} {r['method']:20} {r['median_s'] * 1e3:11.1f} {ratio} "
              f"{r['peak_bytes'] / 2**20:9.1f} {gflops}  {', '.join(note)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="P1,P2,P3", help="comma-separated names from " + ",".join(CASES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timed runs per method")
    parser.add_argument("--loop-outputs", type=int, default=16, help="outputs timed for autograd-loop")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, short runs (CI)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/frobenius_<device>.json)")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        print_table(saved["machine"], saved["results"][0]["dtype"], saved["results"])
        return

    cases = SMOKE_CASES if args.smoke else {name: CASES[name] for name in args.cases.split(",")}
    if args.smoke:
        args.min_run_time, args.loop_outputs = 0.05, 4
    if args.worker:
        widths, batch = cases[args.worker[0]]
        worker(args.worker[0], widths, batch, args.worker[1], args)
        return

    methods = args.methods.split(",")
    results = []
    total = len(cases) * len(methods)
    for name, (widths, batch) in cases.items():
        for method in methods:
            started = time.time()
            command = [sys.executable, os.path.abspath(__file__), "--worker", name, method,
                       "--device", args.device, "--dtype", args.dtype,
                       "--min-run-time", str(args.min_run_time), "--loop-outputs", str(args.loop_outputs)]
            if args.smoke:
                command.append("--smoke")
            run = subprocess.run(command, capture_output=True, text=True)
            lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                sys.exit(f"{name} {method} failed:\n{run.stdout}\n{run.stderr}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"[{len(results)}/{total}] {name} {method}: {results[-1]['median_s'] * 1e3:.1f} ms "
                  f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    for name, (widths, batch) in cases.items():
        rows = [r for r in results if r["case"] == name]
        reference = next((r for r in rows if r["method"] == "jacext-auto"), None)
        exact = [r for r in rows if r["method"] in ("jacext-auto", "jacext-reverse", "jacext-forward",
                                                    "vmap-jacrev", "vmap-jacfwd")]
        for r in rows:
            if reference:
                r["time_vs_jacext_auto"] = r["median_s"] / reference["median_s"]
            if exact and r in exact:  # exact methods must agree on the value they time
                r["sq_rel_diff_vs_first_exact"] = abs(r["sq_mean"] - exact[0]["sq_mean"]) / abs(exact[0]["sq_mean"])

    machine = machine_description(args.device)
    print_table(machine, args.dtype, results)
    for r in results:
        rel = r.get("sq_rel_diff_vs_first_exact")
        if rel is not None and rel > 1e-3:
            sys.exit(f"{r['case']} {r['method']}: penalty differs from the other exact methods by {rel:.2e}")

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"frobenius_{args.device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "command": " ".join(sys.argv), "results": results}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
