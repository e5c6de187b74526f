"""What every benchmark script does the same way: the machine's description, one timing (`time_step`),
each timing in its own process (a worker and its RESULT line), the summary of repeated runs
(`summarise`: the median time under the one key TIME_KEY, and the median and range of the per-run
ratios), and where the JSON goes."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

# The one key of a summarised time (seconds) in every bench JSON; bench/headline.py and
# `python -m jacext bench` read it.
TIME_KEY = "median_s"


def machine_description(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model, its cores, the torch version and its thread count."""
    import torch  # here, so that bench/headline.py can read TIME_KEY without torch

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


def time_step(step, min_run_time: float) -> dict:
    """Time step() in this process: {TIME_KEY: the median seconds of a call, "runs": how many timed
    blocks}. torch.utils.benchmark picks the calls per block and synchronizes CUDA around them."""
    import torch
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return {TIME_KEY: measurement.median, "runs": len(measurement.times)}


def torch_gemm_macs(step) -> int:
    """The multiply-adds of the GEMMs (mm, addmm, bmm, baddbmm) that one call of step() dispatches
    from Python and autograd, counted by a dispatch mode. A registered op's own GEMMs run inside its
    kernel, unseen: count jacext's ops by the planner (jacext.explain) instead."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    products = {aten.mm: 0, aten.bmm: 0, aten.addmm: 1, aten.addmm_: 1, aten.baddbmm: 1}

    class Count(TorchDispatchMode):
        macs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = products.get(func.overloadpacket)
            if first is not None:
                a, b = args[first], args[first + 1]
                Count.macs += a.numel() * b.shape[-1]
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.macs


def summarise(runs: list, by: tuple, baseline, ratio_key: str) -> list:
    """One row per distinct value of the keys `by` among `runs` (dicts with "repeat" and TIME_KEY, one
    per timing; the methods of one repeat ran one after another), in the order first seen: the first
    run's fields less "repeat", TIME_KEY the median over its runs, "run_medians_s" every run's time,
    and, where its baseline ran, `ratio_key` the median of the per-run ratios (a run's time over its
    baseline's in the same repeat, which cancels the machine's drift between repeats) and
    `ratio_key + "_range"` their [min, max]. baseline(row) gives the `by` values in which the row's
    baseline differs from the row, e.g. lambda row: {"method": "jacext-auto"}."""
    groups = {}
    for run in runs:
        groups.setdefault(tuple(run[key] for key in by), []).append(run)
    times = {name: {run["repeat"]: run[TIME_KEY] for run in own} for name, own in groups.items()}
    rows = []
    for name, own in groups.items():
        row = {key: value for key, value in own[0].items() if key != "repeat"}
        row[TIME_KEY] = statistics.median(run[TIME_KEY] for run in own)
        row["run_medians_s"] = [run[TIME_KEY] for run in own]
        base_name = {**dict(zip(by, name)), **baseline(row)}
        base = times.get(tuple(base_name[key] for key in by), {})
        ratios = [run[TIME_KEY] / base[run["repeat"]] for run in own if run["repeat"] in base]
        if ratios:
            row[ratio_key] = statistics.median(ratios)
            row[f"{ratio_key}_range"] = [min(ratios), max(ratios)]
        rows.append(row)
    return rows


def report(result: dict) -> None:
    """A worker's answer to run_worker: one RESULT line on stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script: str, worker_args: list, label: str) -> dict:
    """Run `script` with `worker_args` in its own process (a large case's heap slows the next one in
    the same process) and return what it reported; exit with its output when it fails."""
    run = subprocess.run([sys.executable, os.path.abspath(script), *map(str, worker_args)],
                         capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        sys.exit(f"{label} failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def write_results(out, name: str, device: str, smoke: bool, payload: dict) -> str:
    """Write payload (plus the command line) as JSON to `out`, by default
    bench/results/<name>_<device>[_smoke].json; returns the path."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"{name}_{device}{'_smoke' if smoke else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": " ".join(sys.argv), **payload}, f, indent=1)
    print(f"\nwrote {out}")
    return out
