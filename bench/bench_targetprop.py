"""Target propagation training step against backprop, in one run.

  backprop       cross-entropy, loss.backward(), Adam step
  dtp            jacext.targetprop.TargetPropTrainer("dtp", learned inverses): one reconstruction
                 step for the inverses, the targets, the local losses, Adam steps
  gn             TargetPropTrainer("gn"): Gauss-Newton targets from all layers' Jacobians in one
                 jacext reverse sweep, damped pseudo-inverses (an m x m solve per sample)
  gn-torchfunc   the same Gauss-Newton step with the layer Jacobians from torch.func
                 (vmap(jacrev) of the layers above, once per layer) instead of jacext

    python bench/bench_targetprop.py            # 784-256-256-10, B=128, tanh
    python bench/bench_targetprop.py --smoke    # tiny sizes, seconds (CI)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

import jacext
import jacext.targetprop as tp

from common import TIME_KEY, machine_description, summarise, time_step, write_results  # bench/common.py

CASE = dict(widths=[784, 256, 256, 10], batch=128)
SMOKE_CASE = dict(widths=[12, 9, 9, 5], batch=6)
METHODS = ["backprop", "dtp", "gn", "gn-torchfunc"]


def torchfunc_gn_targets(model, x, output_target, method="gn", inverses=None, damping=0.0, hs=None):
    """layer_targets(method="gn") with the Jacobians from torch.func (the anchor)."""
    with torch.no_grad():
        hs = tp.layer_outputs(model, x) if hs is None else hs
        delta = output_target - hs[-1]
        targets = []
        for l in range(1, len(hs) - 1):
            jac = vmap(jacrev(model[2 * l:]))(hs[l])
            targets.append(hs[l] + tp._damped_pinv_apply(jac, delta, damping))
        return targets + [output_target]


def make_step(method, model, x, y):
    if method == "backprop":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return step
    trainer = tp.TargetPropTrainer(model, "dtp" if method == "dtp" else "gn")
    if method == "gn-torchfunc":
        def step():
            original = tp.layer_targets
            tp.layer_targets = torchfunc_gn_targets
            try:
                trainer.step(x, y)
            finally:
                tp.layer_targets = original
        return step
    return lambda: trainer.step(x, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/targetprop_cpu[_smoke].json)")
    args = parser.parse_args()
    case = SMOKE_CASE if args.smoke else CASE
    if args.smoke:
        args.min_run_time = 0.2

    runs = []
    for method in METHODS:
        torch.manual_seed(0)
        model = jacext.MLP(case["widths"], activation="tanh").to(args.device)
        x = torch.randn(case["batch"], case["widths"][0]).to(args.device)
        y = torch.randint(0, case["widths"][-1], (case["batch"],)).to(args.device)
        step = make_step(method, model, x, y)
        step()
        runs.append({"method": method, "repeat": 0, TIME_KEY: time_step(step, args.min_run_time)[TIME_KEY]})
        print(f"{method}: {runs[-1][TIME_KEY] * 1e3:.2f} ms", flush=True)
    results = summarise(runs, ("method",), lambda row: {"method": "backprop"}, "time_vs_backprop")

    machine = machine_description(args.device)
    print(f"\n{machine}; float32; MLP {case['widths']} (tanh), B={case['batch']}; one training step "
          f"(optimizer steps included), median\n")
    header = f"{'method':14} {'median ms':>10} {'x backprop':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['method']:14} {r[TIME_KEY] * 1e3:10.2f} {r['time_vs_backprop']:11.3g}")
    write_results(args.out, "targetprop", args.device, args.smoke, {"machine": machine, "case": case, "results": results})


if __name__ == "__main__":
    main()
