"""Before/after check of jacext's penalty step between two checkouts (is a change a regression?).

Runs one case's step (jacobian_frobenius, method "auto", forward + backward, tanh, float32; the
loss is the penalty's mean, as in bench_frobenius, or with --with-output the output's too) in a
fresh process of each checkout's Python, alternately before/after, `--pairs` times, and prints
every run's median step time and the ratio of the medians. Alternating cancels the drift of a
noisy machine that separate bench runs suffer from.

    python bench/ab_step.py --before-python /path/to/old/.venv/bin/python --before-dir /path/to/old \
        --cases P1,P1b,P4 --pairs 3 --out bench/results/ab_step.json

Each checkout must have jacext installed editable in that Python (the worker imports jacext from
its own tree: it runs with that tree as the working folder).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_frobenius import CASES  # name: (widths, batch, output activation)

WORKER = """
import statistics, sys, time, torch, jacext
widths, batch, output_activation, steps, with_output = {widths}, {batch}, {output!r}, {steps}, {with_output}
torch.manual_seed(0)
model = jacext.MLP(widths, activation="tanh", output_activation=output_activation)
x = torch.randn(batch, widths[0])
def step():
    model.zero_grad(set_to_none=True)
    y, sq = jacext.jacobian_frobenius(model, x)
    (y.square().mean() + sq.mean() if with_output else sq.mean()).backward()
for _ in range(5):
    step()
times = []
for _ in range(steps):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(jacext.__file__, statistics.median(times))
"""


def run(python, folder, case, steps, with_output):
    widths, batch, output = CASES[case]
    code = WORKER.format(widths=widths, batch=batch, output=output, steps=steps, with_output=with_output)
    out = subprocess.run([python, "-c", code], cwd=folder,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[-2], float(out[-1])


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-python", required=True)
    parser.add_argument("--before-dir", required=True)
    parser.add_argument("--after-python", default=sys.executable)
    parser.add_argument("--after-dir", default=here)
    parser.add_argument("--cases", default="P1,P1b,P4")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after 5 untimed)")
    parser.add_argument("--with-output", action="store_true", help="loss: mean(y^2) + the penalty's mean")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for case in args.cases.split(","):
        times = {"before": [], "after": []}
        for _ in range(args.pairs):
            for side in ("before", "after"):
                python, folder = (args.before_python, args.before_dir) if side == "before" else (args.after_python,
                                                                                                 args.after_dir)
                where, seconds = run(python, folder, case, args.steps, args.with_output)
                times[side].append(seconds)
                print(f"{case} {side:6} {seconds * 1e3:8.1f} ms  ({where})", flush=True)
        ratio = statistics.median(times["after"]) / statistics.median(times["before"])
        results.append({"case": case, "before_s": times["before"], "after_s": times["after"], "after_over_before": ratio})
    print(f"\n{'case':5} {'before ms (runs)':30} {'after ms (runs)':30} after/before")
    for r in results:
        fmt = lambda ts: ", ".join(f"{t * 1e3:.1f}" for t in ts)
        print(f"{r['case']:5} {fmt(r['before_s']):30} {fmt(r['after_s']):30} {r['after_over_before']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "bench/ab_step.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                       "results": results}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
