"""The penalty step of an MLP with Dropout in train(), on the fused engine (the masks a diagonal factor
of each masked layer), against the same net without Dropout, and against the generic path.

  D1   784-256-256-10, tanh, Dropout(0.2) after each hidden activation, B = 128 (float32): one step =
       jacext.jacobian_frobenius(model, x), loss = the penalty's batch mean, backward to every
       parameter
         dropout        the net in train() with its two Dropout modules: the engine, masks drawn per call
         no-dropout     the same net without them: the engine (the baseline)
         generic        the net with Dropout on the generic path (method="autograd")

    python bench/bench_dropout.py --repeats 5   # ratios as the median of 5 runs
    python bench/bench_dropout.py --smoke       # tiny sizes, seconds (CI)
    python bench/bench_dropout.py --device cuda

Each method runs in its own process; the table gives the median time per step and each method's
time over no-dropout's (the median of the per-run ratios with --repeats).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import jacext

from common import TIME_KEY, machine_description, report, run_worker, summarise, time_step, write_results  # bench/common.py

CASES = {"D1": ([784, 256, 256, 10], 128)}
SMOKE_CASES = {"D1": ([20, 16, 16, 3], 8)}
METHODS = ["dropout", "no-dropout", "generic"]


def make_model(widths, dropout, device):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
            if dropout:
                layers.append(nn.Dropout(0.2))
    torch.manual_seed(0)  # the same weights with and without Dropout (it has no parameters)
    return nn.Sequential(*layers).to(device).train()


def worker(case, method, device, min_run_time, smoke):
    widths, batch = (SMOKE_CASES if smoke else CASES)[case]
    model = make_model(widths, method != "no-dropout", device)
    x = torch.randn(batch, widths[0], device=device)
    options = {"method": "autograd"} if method == "generic" else {}

    def step():
        _, sq = jacext.jacobian_frobenius(model, x, **options)
        sq.mean().backward()

    step()  # warm: the plan, the workspace
    report({"case": case, "method": method, **time_step(step, min_run_time)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per method")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and times (CI)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    min_run_time = 0.05 if args.smoke else args.min_run_time
    if args.worker:
        return worker(*args.worker, args.device, min_run_time, args.smoke)
    runs = []
    for repeat in range(args.repeats):
        for case in CASES:
            for method in METHODS:
                worker_args = ["--worker", case, method, "--device", args.device, "--min-run-time", min_run_time]
                result = run_worker(__file__, worker_args + (["--smoke"] if args.smoke else []), f"{case} {method}")
                runs.append({**result, "repeat": repeat})
    rows = summarise(runs, ("case", "method"), lambda row: {"method": "no-dropout"}, "ratio")
    print(machine_description(args.device))
    print(f"{'case':6}{'method':14}{'median step':>14}{'/ no-dropout':>14}")
    for row in rows:
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
        print(f"{row['case']:6}{row['method']:14}{row[TIME_KEY] * 1e3:>11.3f} ms{ratio:>14}")
    write_results(args.out, "bench_dropout", args.device, args.smoke, {"rows": rows})


if __name__ == "__main__":
    main()
