"""Large-margin loss forward+backward: jacext against the ways it is written in PyTorch today.

All methods compute the same loss (use_approximation=False: the gradient norms' own gradient
flows, a double backward) and its gradient w.r.t. every parameter, in one run:

  jacext          jacext.large_margin_loss: one reverse sweep for all layers, every class row at once,
                  the norms from J J^T (q = 2) or from the k needed rows (q = inf)
  autograd-batch  one autograd.grad(create_graph=True) per class and layer over the whole batch
  seed-loop       one autograd.grad(create_graph=True) per sample, class and layer (the seed
                  code's loop, made differentiable); only --loop-samples samples are timed and
                  the time is scaled by B / that number

    python bench/bench_margin.py              # 784-512-512-10, B=128, layers (0,1,2), top_k=9
    python bench/bench_margin.py --repeats 5  # ratios as the median of 5 runs
    python bench/bench_margin.py --smoke      # tiny sizes, seconds (CI)

Each (q, method) runs in its own process.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import jacext
from jacext.reference import hidden_states, large_margin_loss_ref, margin_classes_ref

from common import TIME_KEY, machine_description, report, run_worker, summarise, time_step, write_results  # bench/common.py

CASE = dict(widths=[784, 512, 512, 10], batch=128, layers=(0, 1, 2), top_k=9)
SMOKE_CASE = dict(widths=[12, 9, 9, 5], batch=6, layers=(0, 1, 2), top_k=3)
METHODS = ["jacext", "autograd-batch", "seed-loop"]
DUAL = {1: math.inf, 2: 2, math.inf: 1}
GAMMA, ALPHA = 0.5, 2.0  # the loss's clip points do not change the work


def margin_terms(dist, gamma=GAMMA, alpha_factor=ALPHA):
    """The official loss on the distances (B, k) of one layer, worst case over the k classes."""
    worst = dist.min(1, keepdim=True).values
    return (torch.relu(gamma - torch.clamp(worst, min=gamma * (1 - alpha_factor))) - gamma).sum(1).mean()


def seed_loop_loss(model, x, target, layers, top_k, q, samples):
    """The loss by the seed's loop: one autograd.grad per sample, class and layer, for `samples`."""
    logits, hs = hidden_states(model, x.requires_grad_())
    _, diff = margin_classes_ref(torch.softmax(logits, 1), target, top_k)
    losses = []
    for layer in layers:
        norms = torch.stack([torch.stack([
            torch.autograd.grad(diff[b, i], hs[layer], create_graph=True)[0][b].norm(p=q)
            for i in range(top_k)]) for b in samples])
        losses.append(margin_terms(diff[samples] / (norms + 1e-8)))
    return torch.stack(losses).mean()


def make_step(method, model, x, target, layers, top_k, dist_norm, loop_samples):
    """The timed function (loss forward + backward to the parameters) and its time scale."""
    q = DUAL[dist_norm]
    if method == "jacext":
        def loss():
            return jacext.large_margin_loss(model, x, target, layers=layers, gamma=GAMMA, alpha_factor=ALPHA,
                                            top_k=top_k, dist_norm=dist_norm, use_approximation=False)
        scale = 1.0
    elif method == "autograd-batch":
        def loss():
            return large_margin_loss_ref(model, x.detach().clone().requires_grad_(), target, layers, GAMMA, ALPHA,
                                         top_k, dist_norm, 1e-8, use_approximation=False, worst_case_loss=True,
                                         layers_weights=None, on="probs")
        scale = 1.0
    else:
        samples = list(range(min(loop_samples, x.shape[0])))

        def loss():
            return seed_loop_loss(model, x.detach().clone(), target, layers, top_k, q, samples)
        scale = x.shape[0] / len(samples)

    params = list(model.parameters())

    def step():
        value = loss()
        torch.autograd.grad(value, params)
        return value

    return step, scale


def worker(args, case, dist_norm, method):
    """Time one (q, method) in this process; print its RESULT line."""
    torch.manual_seed(0)
    model = jacext.MLP(case["widths"], activation="tanh").to(args.device)
    x = torch.randn(case["batch"], case["widths"][0], device=args.device)
    target = torch.randint(0, case["widths"][-1], (case["batch"],), device=args.device)
    step, scale = make_step(method, model, x, target, case["layers"], case["top_k"], dist_norm, args.loop_samples)
    value = step().detach().item()  # warm-up, and the value the methods must agree on
    timing = time_step(step, args.min_run_time)
    report({"dist_norm": dist_norm, "q": str(DUAL[dist_norm]), "method": method, "repeat": args.repeat,
            TIME_KEY: timing[TIME_KEY] * scale, "runs": timing["runs"], "loss": value,
            "scaled_from_samples": args.loop_samples if method == "seed-loop" else None})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timed runs per method")
    parser.add_argument("--loop-samples", type=int, default=2, help="samples timed for seed-loop")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default 0,1,2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every method this many times over (each in its own process); the table gives "
                        "the median time and the median of the per-run ratios")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/margin_<device>[_smoke].json)")
    parser.add_argument("--worker", nargs=2, metavar=("DIST_NORM", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = dict(SMOKE_CASE if args.smoke else CASE)
    if args.layers is not None:
        case["layers"] = tuple(int(l) for l in args.layers.split(","))
    if args.smoke:
        args.min_run_time = min(args.min_run_time, 0.2)
    if args.worker:
        worker(args, case, float(args.worker[0]) if args.worker[0] == "inf" else int(args.worker[0]), args.worker[1])
        return

    methods = args.methods.split(",")
    runs = []
    for repeat in range(args.repeats):
        for dist_norm in (2, 1):  # q = 2 and q = inf
            for method in methods:
                command = ["--worker", dist_norm, method, "--device", args.device, "--min-run-time",
                           args.min_run_time, "--loop-samples", args.loop_samples, "--repeat", repeat]
                if args.layers is not None:
                    command += ["--layers", args.layers]
                if args.smoke:
                    command.append("--smoke")
                runs.append(run_worker(__file__, command, f"q={DUAL[dist_norm]} {method}"))
                print(f"[{len(runs)}/{2 * len(methods) * args.repeats}] q={DUAL[dist_norm]} {method}: "
                      f"{runs[-1][TIME_KEY] * 1e3:.1f} ms", file=sys.stderr, flush=True)

    for dist_norm in (2, 1):
        mine = [r for r in runs if r["dist_norm"] == dist_norm]
        losses = {r["method"]: r["loss"] for r in mine}
        # the batched reference computes the same loss; the loop covers only its samples
        if "jacext" in losses and "autograd-batch" in losses and \
                abs(losses["jacext"] - losses["autograd-batch"]) > 1e-4 * max(1.0, abs(losses["autograd-batch"])):
            sys.exit(f"q={DUAL[dist_norm]}: jacext's loss {losses['jacext']} differs from autograd's "
                     f"{losses['autograd-batch']}")
    results = summarise(runs, ("dist_norm", "method"), lambda row: {"method": "jacext"}, "time_vs_jacext")

    machine = machine_description(args.device)
    print(f"\n{machine}; float32; MLP {case['widths']} (tanh), B={case['batch']}, layers {case['layers']}, "
          f"top_k={case['top_k']}, use_approximation=False; loss forward+backward, median"
          + (f" over {args.repeats} runs (each method in its own process; ratio: the median of the per-run ratios)"
             if args.repeats > 1 else " (each method in its own process)") + "\n")
    header = f"{'q':4} {'method':16} {'median ms':>10} {'x jacext':>9}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        note = (f"{r['scaled_from_samples']} of {case['batch']} samples timed, time scaled"
                if r["scaled_from_samples"] else "")
        if args.repeats > 1 and r["method"] != "jacext" and "time_vs_jacext_range" in r:
            low, high = r["time_vs_jacext_range"]
            note = ", ".join(filter(None, [note, f"ratio over {args.repeats} runs {low:.3g}-{high:.3g}"]))
        ratio = f"{r['time_vs_jacext']:9.3g}" if "time_vs_jacext" in r else " " * 9
        print(f"{r['q']:4} {r['method']:16} {r[TIME_KEY] * 1e3:10.1f} {ratio}  {note}")
    write_results(args.out, "margin", args.device, args.smoke,
                  {"machine": machine, "case": case, "repeats": args.repeats, "results": results, "runs": runs})


if __name__ == "__main__":
    main()
