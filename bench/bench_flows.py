"""MLP flow training step: the relative gradient against autodiff through torch.slogdet.

One training step (the mean negative log-likelihood of a batch, forward + backward to every
parameter) of a square MLP flow (smooth_leaky_relu, last layer linear), in one run:

  jacext-relative    flow.nll(x, relative_gradient=True, logdet_value=False): the fused op, whose
                     backward writes the relative gradient (O(B D^2), no inverse, no determinant)
  autodiff-slogdet   plain PyTorch: the nn.Sequential forward, log act' by torch ops and
                     torch.linalg.slogdet per layer, differentiated by autograd (its backward
                     forms W^-T: O(D^3))
  jacext-autodiff    flow.nll(x): the fused op with the ordinary gradient, slogdet by autograd

Cases: D = 784 at B = 10 and B = 100, and D = 1568 at B = 10 (how each step scales with D).
Then seconds per epoch at the seed's setting (60000 samples, D = 784, B = 10, Adam step
included, random data): the relative epoch is run in full, the autodiff one on --epoch-fraction
of its steps and scaled (the table says so).

    python bench/bench_flows.py               # the cases above, 2 layers, float32
    python bench/bench_flows.py --repeats 5   # ratios as the median of 5 runs
    python bench/bench_flows.py --smoke       # tiny sizes, seconds (CI)
    python bench/bench_flows.py --device cuda

Each case and method (and each epoch) runs in its own process.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from jacext.activations import SMOOTH_LEAKY_RELU, activation_derivative
from jacext.flows import MLPFlow

from common import TIME_KEY, machine_description, report, run_worker, summarise, time_step, write_results  # bench/common.py

CASES = [dict(name="D784-B10", dim=784, batch=10), dict(name="D784-B100", dim=784, batch=100),
         dict(name="D1568-B10", dim=1568, batch=10)]
SMOKE_CASES = [dict(name="D16-B4", dim=16, batch=4), dict(name="D32-B4", dim=32, batch=4)]
METHODS = ["jacext-relative", "autodiff-slogdet", "jacext-autodiff"]


def autodiff_nll(flow, x):
    """The mean NLL in plain PyTorch: what a user writes without jacext."""
    h, log_dact = x, x.new_zeros(x.shape[0])
    for module in flow.net:
        if isinstance(module, torch.nn.Linear):
            h = module(h)
        else:  # the activation after a Linear: its log-derivative at the pre-activation h
            log_dact = log_dact + activation_derivative(h, SMOOTH_LEAKY_RELU, flow.alpha, 0.0).log().sum(1)
            h = module(h)
    logdet = sum(torch.linalg.slogdet(w)[1] for w in flow.weights())
    return (0.5 * (h.square().sum(1) + flow.dim * math.log(2 * math.pi)) - log_dact).mean() - logdet


def make_loss(method, flow):
    if method == "jacext-relative":
        return lambda x: flow.nll(x, relative_gradient=True, logdet_value=False)
    if method == "jacext-autodiff":
        return lambda x: flow.nll(x)
    return lambda x: autodiff_nll(flow, x)


def time_flow_step(method, dim, batch, layers, min_run_time, device):
    torch.manual_seed(0)
    flow = MLPFlow(dim, layers).to(device)
    x = torch.randn(batch, dim).to(device)
    loss, params = make_loss(method, flow), list(flow.parameters())

    def step():
        torch.autograd.grad(loss(x), params)

    step()
    return time_step(step, min_run_time)


def time_epoch(method, dim, batch, layers, samples, fraction, device):
    """Seconds for one epoch (Adam step included) over `samples` random samples, from running
    `fraction` of its steps (scaled by 1 / fraction)."""
    torch.manual_seed(0)
    flow = MLPFlow(dim, layers).to(device)
    data = torch.randn(samples, dim).to(device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-5)
    loss = make_loss(method, flow)
    steps = max(1, int(round(samples / batch * fraction)))
    start = time.perf_counter()
    order = torch.randperm(samples)
    for i in range(steps):
        optimizer.zero_grad()
        loss(data[order[i * batch:(i + 1) * batch]]).backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * (samples / batch) / steps


def in_subprocess(args, *worker_args):
    """Run this script with --worker ... in its own process; its RESULT line as a dict."""
    command = ["--layers", args.layers, "--device", args.device, "--min-run-time", args.min_run_time,
               "--epoch-samples", args.epoch_samples, *worker_args] + (["--smoke"] if args.smoke else [])
    return run_worker(__file__, command, " ".join(worker_args))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per method and case")
    parser.add_argument("--epoch-samples", type=int, default=60000)
    parser.add_argument("--epoch-fraction", type=float, default=0.1,
                        help="fraction of the autodiff epoch actually run (the relative epoch runs in full)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every (case, method) this many times over (each in its own process); the table "
                        "gives the median time and the median of the per-run ratios")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/flows_cpu[_smoke].json)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--epoch-worker", nargs=2, metavar=("METHOD", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.min_run_time, args.epoch_samples = min(args.min_run_time, 0.1), 200
    if args.worker:
        case = next(c for c in cases if c["name"] == args.worker[0])
        report(time_flow_step(args.worker[1], case["dim"], case["batch"], args.layers, args.min_run_time, args.device))
        return
    if args.epoch_worker:
        seconds = time_epoch(args.epoch_worker[0], cases[0]["dim"], cases[0]["batch"], args.layers,
                             args.epoch_samples, float(args.epoch_worker[1]), args.device)
        report({"epoch_s": seconds})
        return

    runs = []
    for repeat in range(args.repeats):
        for case in cases:
            for method in METHODS:
                median = in_subprocess(args, "--worker", case["name"], method)[TIME_KEY]
                runs.append({"case": case["name"], "dim": case["dim"], "batch": case["batch"], "method": method,
                             "repeat": repeat, TIME_KEY: median})
                print(f"{case['name']} {method}: {median * 1e3:.3f} ms", flush=True)
    results = summarise(runs, ("case", "method"), lambda row: {"method": "jacext-relative"}, "time_vs_relative")

    epoch_dim, epoch_batch = cases[0]["dim"], cases[0]["batch"]
    epochs = []
    for method, fraction in (("jacext-relative", 1.0), ("autodiff-slogdet", args.epoch_fraction)):
        seconds = in_subprocess(args, "--epoch-worker", method, str(fraction))["epoch_s"]
        epochs.append({"method": method, "epoch_s": seconds, "fraction_run": fraction})
        print(f"epoch {method}: {seconds:.1f} s", flush=True)

    machine = machine_description(args.device)
    print(f"\n{machine}; float32; MLP flow, {args.layers} layers; one training step (mean NLL, forward + "
          f"backward), median" + (f" over {args.repeats} runs (ratio: the median of the per-run ratios)"
                                  if args.repeats > 1 else "") + "; each case and method in its own process\n")
    header = f"{'case':10} {'method':17} {'median ms':>10} {'x relative':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['case']:10} {r['method']:17} {r[TIME_KEY] * 1e3:10.3f} {r['time_vs_relative']:11.3g}")

    def ratio(case, method="autodiff-slogdet"):
        return next(r["time_vs_relative"] for r in results if r["case"] == case and r["method"] == method)

    def growth(method):
        small, large = (next(r[TIME_KEY] for r in results if r["case"] == c["name"] and r["method"] == method)
                        for c in (cases[0], cases[-1]))
        return large / small

    summary = {"autodiff_over_relative": {c["name"]: ratio(c["name"]) for c in cases},
               "time_growth_with_D": {m: growth(m) for m in ("jacext-relative", "autodiff-slogdet")}}
    print("\nautodiff-slogdet / jacext-relative: "
          + ", ".join(f"{k} {v:.1f}x" for k, v in summary["autodiff_over_relative"].items()))
    print(f"step time from {cases[0]['name']} to {cases[-1]['name']}: "
          + ", ".join(f"{m} x{g:.2f}" for m, g in summary["time_growth_with_D"].items()))
    print(f"\nepoch of {args.epoch_samples} samples (D = {epoch_dim}, B = {epoch_batch}, Adam, random data):")
    for e in epochs:
        note = "" if e["fraction_run"] == 1 else f" ({e['fraction_run']:.0%} of the steps run, time scaled)"
        print(f"  {e['method']:17} {e['epoch_s']:8.1f} s{note}")

    write_results(args.out, "flows", args.device, args.smoke, {"machine": machine, "layers": args.layers,
                                                         "repeats": args.repeats, "results": results, "runs": runs,
                                                         "summary": summary, "epochs": epochs})


if __name__ == "__main__":
    main()
