"""Penalty forward+backward: jacext against the ways people compute ||J||_F^2 today.

Each (case, method) runs in its own subprocess so that its peak memory is its own; all run in
this one invocation, on the same machine, and the table gives each method's median time and its
ratio to jacext's automatic choice. After the table, the cost model against the measurements: for
each exact jacext row, the GEMM multiply-adds jacext.planner counts for its strategy, and whether
ranking the strategies by that count ranks them as their measured times do.

    python bench/bench_frobenius.py                      # every case on the CPU
    python bench/bench_frobenius.py --cases P2,P5,P6 --repeats 5   # ratios as medians of 5 runs
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
  jax-vmap-jacrev / jax-vmap-jacfwd the same MLP in JAX (weights copied): jax.vmap of jax.jacrev /
                  jax.jacfwd, the step jax.jit(jax.grad(penalty)) compiled before the timing; run
                  only where jax imports (and, for --device cuda, sees a GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

from common import TIME_KEY, machine_description, report, run_worker, summarise, time_step, write_results  # bench/common.py

# name: (widths, batch, output activation); tanh hidden layers
CASES = {
    "P1": ([784, 1024, 1000], 64, None),
    "P2": ([784, 256, 256, 10], 128, None),
    "P3": ([784, 1024, 1024, 1000], 64, None),
    "P1b": ([784, 1024, 1000], 256, None),
    "P4": ([784, 256, 32, 256, 784], 128, None),  # a contractive autoencoder: the split at its bottleneck
    "P5": ([64, 256, 256], 256, "tanh"),  # the penalty on the last hidden layer's Jacobian (m = 256)
    "P6": ([64, 256, 256, 10], 256, None),  # the digits demo classifier's penalty step
}
SMOKE_CASES = {"S1": ([20, 16, 12], 4, None), "S2": ([12, 16, 16, 3], 5, None), "S3": ([24, 12, 2, 12, 24], 5, None),
               "S4": ([6, 9, 9], 5, "tanh")}
METHODS = ["jacext-auto", "jacext-reverse", "jacext-forward", "autograd-loop", "vmap-jacrev", "vmap-jacfwd", "random-1proj",
           "jacext-hutchinson-1", "jax-vmap-jacrev", "jax-vmap-jacfwd"]
ESTIMATES = ("random-1proj", "jacext-hutchinson-1")
EXACT = ("jacext-auto", "jacext-reverse", "jacext-forward", "vmap-jacrev", "vmap-jacfwd", "jax-vmap-jacrev",
         "jax-vmap-jacfwd")


def make_step(method, model, x, loop_outputs, max_memory=None):
    """The function that is timed, and the scale that turns its time into the method's time."""
    import jacext
    from torch.func import jacfwd, jacrev, vmap

    def per_sample(xi):
        return model(xi.unsqueeze(0)).squeeze(0)

    m = [module for module in model if isinstance(module, torch.nn.Linear)][-1].out_features
    scale = 1.0
    if method == "jacext-hutchinson-1":
        def penalty():
            return jacext.jacobian_frobenius(model, x, method="hutchinson", n_proj=1, max_memory=max_memory)[1]
    elif method.startswith("jacext-"):
        def penalty():
            return jacext.jacobian_frobenius(model, x, method=method.split("-")[1], max_memory=max_memory)[1]
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


def jax_step(method, model, x, device, output_tanh):
    """The timed function for a JAX peer: the gradient of the batch-mean penalty of the same MLP
    (jacext.MLP's tanh hidden layers, a linear or tanh output, its weights), jit-compiled. It
    returns the per-sample penalty."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", x.dtype == torch.float64)
    params = [(layer.weight.detach().numpy(), layer.bias.detach().numpy())
              for layer in model if isinstance(layer, torch.nn.Linear)]
    params, x = jax.device_put((params, x.numpy()), jax.devices("gpu" if device == "cuda" else "cpu")[0])
    jacobian = jax.jacrev if method == "jax-vmap-jacrev" else jax.jacfwd

    def f(params, xi):
        h = xi
        for i, (w, b) in enumerate(params):
            h = w @ h + b
            if i < len(params) - 1 or output_tanh:
                h = jnp.tanh(h)
        return h

    def loss(params, x):
        sq = (jax.vmap(jacobian(f, argnums=1), in_axes=(None, 0))(params, x) ** 2).sum((1, 2))
        return sq.mean(), sq

    grad = jax.jit(jax.grad(loss, has_aux=True))

    def step():
        return jax.block_until_ready(grad(params, x))[1]

    return step


def jax_missing(device):
    """Why the JAX peers cannot run on this device, or None. Asked in a subprocess: JAX takes most
    of a GPU's memory once it sees it."""
    check = subprocess.run([sys.executable, "-c", f"import jax; jax.devices({'gpu' if device == 'cuda' else 'cpu'!r})"],
                           capture_output=True, text=True)
    return check.stderr.strip().splitlines()[-1] if check.returncode else None


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


def worker(case, widths, batch, output_activation, method, args):
    import jacext

    on_jax = method.startswith("jax-")
    torch.manual_seed(0)
    device = torch.device("cpu" if on_jax else args.device)  # JAX copies the weights from the host
    dtype = getattr(torch, args.dtype)
    model = jacext.MLP(widths, activation="tanh", output_activation=output_activation).to(device=device, dtype=dtype)
    x = torch.randn(batch, widths[0], dtype=dtype).to(device)  # the same x on every device
    if on_jax:
        step, scale = jax_step(method, model, x, args.device, output_activation == "tanh"), 1.0
    else:
        budget = None if args.max_memory_mb is None else int(args.max_memory_mb * 2**20)
        step, scale = make_step(method, model, x, args.loop_outputs, budget)

    step()  # warm-up: one-time allocations, lazy imports and JAX's compilation are not the method's
    if on_jax and args.device == "cuda":
        sq, peak = step(), None
    elif device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sq = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # jacext keeps the previous step's memory for reuse (its workspace): give it back first, so
        # that the growth is the step's working memory, as for the methods that allocate afresh
        jacext.release_workspace()
        sq, peak = peak_rss_growth(step)
    sq = torch.from_dlpack(sq) if on_jax else sq.detach()
    timing = time_step(step, args.min_run_time)
    median = timing[TIME_KEY] * scale
    result = {
        "case": case, "method": method, "widths": widths, "batch": batch, "output_activation": output_activation,
        "repeat": args.repeat, "device": args.device,
        "dtype": args.dtype, TIME_KEY: median, "runs": timing["runs"],
        "scaled_from_outputs": (min(args.loop_outputs, widths[-1]) if method == "autograd-loop" else None),
        "peak_bytes": None if peak is None else max(int(peak), 0),
        "peak_kind": ("not measured: JAX's GPU memory is not torch's" if peak is None else
                      "cuda max_memory_allocated" if device.type == "cuda" else
                      "peak RSS growth during one step (jacext's workspace emptied first)"),
        "sq_mean": float(sq.double().mean()),
    }
    if method.startswith("jacext-"):
        from jacext.planner import (Split, carry_elements, penalty_macs, predicted_cost, resolve_strategy,
                                    strategy_name, tile_size)

        projections = 1 if method == "jacext-hutchinson-1" else 0
        strategy = resolve_strategy(method.split("-")[1], widths, batch=batch, projections=projections,
                                    output_linear=output_activation is None)
        result["strategy"] = strategy_name(strategy)
        result["tile"] = 0 if isinstance(strategy, Split) else tile_size(widths, batch, strategy, x.element_size(),
                                                                         projections or None, device=device)
        macs = penalty_macs(widths, batch, strategy, projections=projections)
        result["macs"] = macs
        result["carry_elements"] = carry_elements(widths, batch, strategy, rows=projections or None)
        result["predicted_cost"] = predicted_cost(widths, batch, strategy, projections=projections)
        result["max_memory_mb"] = args.max_memory_mb
        result["gflops_per_s"] = 2 * macs / median / 1e9
    report(result)


def print_table(machine, dtype, results):
    print(f"\n{machine}; {dtype}; penalty forward+backward, median of timed runs (with --repeats: the median "
          f"over the runs, and the median of the per-run ratios)\n", flush=True)
    header = f"{'case':5} {'method':20} {'median ms':>11} {'x jacext-auto':>13} {'peak MB':>9} {'GFLOP/s':>8}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        note = []
        if "strategy" in r:
            note.append(r["strategy"])
            if r.get("max_memory_mb") is not None:
                note.append(f"max_memory {r['max_memory_mb']:g} MiB")
        if r["scaled_from_outputs"]:
            note.append(f"{r['scaled_from_outputs']} of {r['widths'][-1]} outputs timed, time scaled, memory not")
        if r["method"] in ESTIMATES:
            note.append("estimate, not exact")
        if r["method"].startswith("jax-"):
            note.append("jax.jit, compilation not timed")
        if r["peak_bytes"] is None:
            note.append("memory " + r["peak_kind"])
        gflops = f"{r['gflops_per_s']:8.1f}" if "gflops_per_s" in r else " " * 8
        ratio = f"{r['time_vs_jacext_auto']:13.3g}" if "time_vs_jacext_auto" in r else " " * 13
        if len(r.get("run_medians_s", [])) > 1 and "time_vs_jacext_auto_range" in r and r["method"] != "jacext-auto":
            low, high = r["time_vs_jacext_auto_range"]
            note.append(f"ratio over {len(r['run_medians_s'])} runs {low:.3g}-{high:.3g}")
        peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r["peak_bytes"] is not None else " " * 9
        print(f"{r['case']:5} {r['method']:20} {r[TIME_KEY] * 1e3:11.1f} {ratio} "
              f"{peak} {gflops}  {', '.join(note)}")


def cost_model(results):
    """Per case, the planner's predicted cost (multiply-adds plus carried elements, what it minimizes)
    of each exact jacext row against its measured time. The ranks are over distinct strategies, each
    timed by its fastest row; a flip is a pair of strategies that the prediction orders one way and
    the times the other."""
    model = {}
    for case in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == case and "macs" in r and r["method"] not in ESTIMATES]
        if not rows:
            continue
        fastest = {}
        for r in sorted(rows, key=lambda r: r[TIME_KEY]):
            fastest.setdefault(r["strategy"], r)
        strategies = list(fastest.values())  # fastest first

        def rank(strategy, key):
            return 1 + sum(key(other) < key(fastest[strategy]) for other in strategies)

        def faster(fast, slow):
            ratio = slow[TIME_KEY] / fast[TIME_KEY]
            return f"{ratio - 1:.0%}" if ratio < 2 else f"{ratio:.3g}x"

        flips = [f"{fast['strategy']} measured {faster(fast, slow)} faster than "
                 f"{slow['strategy']} ({fast[TIME_KEY] * 1e3:.1f} vs {slow[TIME_KEY] * 1e3:.1f} ms) "
                 f"but predicted {fast['predicted_cost'] / slow['predicted_cost']:.3g}x the cost"
                 for i, fast in enumerate(strategies) for slow in strategies[i + 1:]
                 if fast["predicted_cost"] > slow["predicted_cost"]]
        model[case] = {"rows": [{"method": r["method"], "strategy": r["strategy"], "macs": r["macs"],
                                 "predicted_cost": r["predicted_cost"],
                                 TIME_KEY: r[TIME_KEY], "gflops_per_s": r["gflops_per_s"],
                                 "predicted_rank": rank(r["strategy"], lambda s: s["predicted_cost"]),
                                 "measured_rank": rank(r["strategy"], lambda s: s[TIME_KEY])}
                                for r in rows],
                       "agrees": not flips, "flips": flips}
    return model


def fit_carry_cost(results):
    """The planner's two constants refitted to this run: time = macs / rate + elements * t_element by
    least squares over every exact jacext row, t_element as multiply-add equivalents at that rate
    (what planner.CARRY_ELEMENT_COST holds). None with fewer than two distinct rows."""
    rows = [r for r in results if "carry_elements" in r and r["method"] not in ESTIMATES]
    if len({(r["macs"], r["carry_elements"]) for r in rows}) < 2:
        return None
    # normal equations of t = a m + b e, each row weighted by 1/t (relative errors)
    w = [1 / r[TIME_KEY] ** 2 for r in rows]
    smm = sum(wi * r["macs"] ** 2 for wi, r in zip(w, rows))
    see = sum(wi * r["carry_elements"] ** 2 for wi, r in zip(w, rows))
    sme = sum(wi * r["macs"] * r["carry_elements"] for wi, r in zip(w, rows))
    smt = sum(wi * r["macs"] * r[TIME_KEY] for wi, r in zip(w, rows))
    set_ = sum(wi * r["carry_elements"] * r[TIME_KEY] for wi, r in zip(w, rows))
    det = smm * see - sme ** 2
    if det <= 0:
        return None
    a, b = (smt * see - set_ * sme) / det, (smm * set_ - sme * smt) / det
    if a <= 0 or b < 0:  # overhead-dominated sizes (--smoke): no meaningful fit
        return None
    return {"macs_per_s": 1 / a, "seconds_per_element": b, "carry_element_cost": b / a}


def print_cost_model(model, fit=None):
    print("\ncost model (jacext.planner.predicted_cost: multiply-adds + carried elements) vs measured; ranks "
          "over distinct strategies, each timed by its fastest row\n")
    header = (f"{'case':5} {'method':20} {'strategy':24} {'G mult-adds':>11} {'G cost':>9} {'median ms':>11} "
              f"{'GFLOP/s':>8} {'pred rank':>9} {'meas rank':>9}")
    print(header)
    print("-" * len(header))
    for case, entry in model.items():
        for r in entry["rows"]:
            print(f"{case:5} {r['method']:20} {r['strategy']:24} {r['macs'] / 1e9:11.4g} "
                  f"{r['predicted_cost'] / 1e9:9.4g} {r[TIME_KEY] * 1e3:11.1f} "
                  f"{r['gflops_per_s']:8.1f} {r['predicted_rank']:9} {r['measured_rank']:9}")
    print()
    for case, entry in model.items():
        verdict = ("; ".join(entry["flips"]) if not entry["agrees"] else
                   "one strategy timed, nothing to rank" if len({r["strategy"] for r in entry["rows"]}) < 2 else
                   "the predicted ranking agrees with the measured one")
        print(f"{case}: {verdict}")
    if fit:
        print(f"\nrefit to this run: {fit['macs_per_s'] / 1e9:.1f} G multiply-adds/s, "
              f"{fit['seconds_per_element'] * 1e9:.2f} ns per carried element = "
              f"{fit['carry_element_cost']:.0f} multiply-adds (planner.CARRY_ELEMENT_COST)")


def time_in_subprocess(args, name, method, repeat):
    """One (case, method) in its own process; its RESULT line as a dict."""
    command = ["--worker", name, method, "--device", args.device, "--dtype", args.dtype, "--repeat", repeat,
               "--min-run-time", args.min_run_time, "--loop-outputs", args.loop_outputs]
    if args.max_memory_mb is not None:
        command += ["--max-memory-mb", args.max_memory_mb]
    if args.smoke:
        command.append("--smoke")
    return run_worker(__file__, command, f"{name} {method}")


def summarize(runs):
    """One row per (case, method), its time over jacext-auto's as the median of the per-run ratios
    (common.summarise); exact methods must agree on the value they time."""
    results = summarise(runs, ("case", "method"), lambda row: {"method": "jacext-auto"}, "time_vs_jacext_auto")
    for row in results:
        if "gflops_per_s" in row:
            row["gflops_per_s"] = 2 * row["macs"] / row[TIME_KEY] / 1e9
    for name in dict.fromkeys(row["case"] for row in results):
        exact = [r for r in results if r["case"] == name and r["method"] in EXACT]
        for r in exact:
            r["sq_rel_diff_vs_first_exact"] = abs(r["sq_mean"] - exact[0]["sq_mean"]) / abs(exact[0]["sq_mean"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated names from " + ",".join(CASES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-memory-mb", type=float, default=None,
                        help="max_memory (MiB) for the jacext rows (default: jacext's default budget)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timed runs per method")
    parser.add_argument("--loop-outputs", type=int, default=16, help="outputs timed for autograd-loop")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every case's methods this many times over (each in its own process); the "
                        "table gives the median time and the median of the per-run ratios")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, short runs (CI)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/frobenius_<device>.json, "
                        "frobenius_<device>_smoke.json with --smoke)")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        print_table(saved["machine"], saved["results"][0]["dtype"], saved["results"])
        if "cost_model" in saved:
            print_cost_model(saved["cost_model"], saved.get("carry_cost_fit"))
        return

    cases = SMOKE_CASES if args.smoke else {name: CASES[name] for name in args.cases.split(",")}
    if args.smoke:
        args.min_run_time, args.loop_outputs = 0.05, 4
    if args.worker:
        widths, batch, output_activation = cases[args.worker[0]]
        worker(args.worker[0], widths, batch, output_activation, args.worker[1], args)
        return

    methods = args.methods.split(",")
    jax_methods = [method for method in methods if method.startswith("jax-")]
    if jax_methods and (missing := jax_missing(args.device)):
        print(f"skipping {', '.join(jax_methods)}: {missing}", flush=True)
        methods = [method for method in methods if method not in jax_methods]
    runs = []
    total = len(cases) * len(methods) * args.repeats
    for repeat in range(args.repeats):
        # The order rotates from run to run: a process right after a heavy one runs slow (this bench's
        # P6 jacext-auto, always after P5's jax-vmap-jacfwd, took 1.37x its same-plan jacext-reverse).
        order = methods[repeat % len(methods):] + methods[:repeat % len(methods)]
        for name in cases:
            for method in order:
                started = time.time()
                runs.append(time_in_subprocess(args, name, method, repeat))
                print(f"[{len(runs)}/{total}] {name} {method}: {runs[-1][TIME_KEY] * 1e3:.1f} ms "
                      f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    results = summarize(runs)

    machine = machine_description(args.device)
    print_table(machine, args.dtype, results)
    costs = cost_model(results)
    fit = fit_carry_cost(results)
    print_cost_model(costs, fit)
    for r in results:
        rel = r.get("sq_rel_diff_vs_first_exact")
        if rel is not None and rel > 1e-3:
            sys.exit(f"{r['case']} {r['method']}: penalty differs from the other exact methods by {rel:.2e}")

    write_results(args.out, "frobenius", args.device, args.smoke,
                  {"machine": machine, "repeats": args.repeats, "results": results, "runs": runs, "cost_model": costs,
                   "carry_cost_fit": fit})


if __name__ == "__main__":
    main()
