"""Large-margin loss forward+backward: jacext against the ways it is written in PyTorch today.

Every method computes the same loss and its gradient w.r.t. every parameter (a training step),
at the case's settings (top_k, dist_norm, use_approximation: with it the gradient norms are held
constant; without it their own gradient flows, a double backward):

  jacext          jacext.large_margin_loss (on the MLP the planner's engine path: the top_k direction
                  rows alone, or all m rows; on the CNN the generic path at named layers)
  jacext-rows,    the engine's two paths forced (method="rows" / "jacobian"; MLP only, not run by
  jacext-jacobian default): what the planner's cost model (jacext.explain(..., quantity="margin"))
                  is checked against
  plain-port      the plain autograd port: one autograd.grad per top-k class, at every chosen layer
                  at once (create_graph only without use_approximation)
  autograd-batch  one autograd.grad(create_graph=True) per class and layer over the whole batch
  seed-loop       one autograd.grad per sample, class and layer (the seed code's loop, made
                  differentiable; MLP only); only --loop-samples samples are timed and the time is
                  scaled by B / that number

Cases (float32; the MLP 784-512-512-10 (tanh) and the paper's MNIST CNN, B=128): "official" is
the official MNIST settings (top_k=1, dist_norm=inf, use_approximation=True, layers 0, 1, 2);
the others the exact gradient at top_k 1, 3 and 9 (q = the gradient norm, the dual of dist_norm);
"cnn-official" the official settings on the CNN, margins at the input and after each conv block.
--grid runs every top_k in {1, 3, 9}, dist_norm in {1, 2, inf}, approximation on and off on the MLP.

    python bench/bench_margin.py              # the cases below, each method in its own process
    python bench/bench_margin.py --repeats 5  # ratios as the median of 5 runs
    python bench/bench_margin.py --grid       # the 18 settings on the MLP
    python bench/bench_margin.py --smoke      # tiny sizes, three of the cases, seconds (CI)
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch
from torch import nn

import jacext
from jacext.reference import hidden_states, large_margin_loss_ref, margin_classes_ref, representations

from common import (TIME_KEY, machine_description, report, run_worker, summarise, time_step,  # bench/common.py
                    torch_gemm_macs, write_results)

MLP = dict(widths=[784, 512, 512, 10], batch=128, layers=(0, 1, 2))
CNN = dict(image=28, channels=(32, 64), dense=512, batch=128, layers=(0, "0", "1"))
SMOKE_MLP = dict(widths=[12, 9, 9, 10], batch=6, layers=(0, 1, 2))
SMOKE_CNN = dict(image=8, channels=(2, 3), dense=8, batch=4, layers=(0, "0", "1"))
# --smoke's cases: the norms held and their gradient flowing, the MLP and the CNN
SMOKE_CASES = ["official", "top3-qinf-exact", "cnn-official"]
# name: (model, top_k, dist_norm, use_approximation)
CASES = {
    "official": ("mlp", 1, math.inf, True),
    "top1-exact": ("mlp", 1, math.inf, False),
    "top3-qinf-exact": ("mlp", 3, 1, False),
    "top9-q2-exact": ("mlp", 9, 2, False),
    "top9-qinf-exact": ("mlp", 9, 1, False),
    "cnn-official": ("cnn", 1, math.inf, True),
}
GRID = {f"top{k}-d{d}-{'approx' if a else 'exact'}": ("mlp", k, d, a)
        for k, d, a in itertools.product((1, 3, 9), (1, 2, math.inf), (True, False))}
METHODS = ["jacext", "plain-port", "autograd-batch", "seed-loop"]
ENGINE_PATHS = {"jacext-rows": "rows", "jacext-jacobian": "jacobian"}  # forced paths, by --methods
DUAL = {1: math.inf, 2: 2, math.inf: 1}
GAMMA, ALPHA, EPSILON = 0.5, 2.0, 1e-8  # the loss's clip points do not change the work


def paper_cnn(image, channels, dense):
    """The MNIST CNN of Elsayed et al.: two blocks of a 5x5 convolution, batch norm, ReLU and 2x2
    max pooling, a dense ReLU layer and the 10 logits; in eval (per-sample Jacobians)."""
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

    side = image // 4
    return nn.Sequential(block(1, channels[0]), block(channels[0], channels[1]), nn.Flatten(),
                         nn.Linear(channels[1] * side * side, dense), nn.ReLU(), nn.Linear(dense, 10)).eval()


def margin_terms(dist, gamma=GAMMA, alpha_factor=ALPHA):
    """The official loss on the distances (B, k) of one layer, worst case over the k classes."""
    worst = dist.min(1, keepdim=True).values
    return (torch.relu(gamma - torch.clamp(worst, min=gamma * (1 - alpha_factor))) - gamma).sum(1).mean()


def plain_port_loss(model, x, target, layers, top_k, dist_norm, use_approximation):
    """The loss as a user ports it: one autograd.grad per top-k class, returning the gradient at
    every chosen layer at once; the graph of the gradients is built only when the norms are
    differentiated (x must require grad)."""
    logits, hs = representations(model, x, layers)
    _, diff = margin_classes_ref(torch.softmax(logits, 1), target, top_k)
    per_layer = [[] for _ in layers]
    for i in range(top_k):
        grads = torch.autograd.grad(diff[:, i].sum(), hs, retain_graph=True, create_graph=not use_approximation)
        for norms, grad in zip(per_layer, grads):
            norms.append(grad.flatten(1).norm(p=DUAL[dist_norm], dim=1))
    return torch.stack([margin_terms(diff / (torch.stack(norms, 1) + EPSILON)) for norms in per_layer]).mean()


def seed_loop_loss(model, x, target, layers, top_k, q, samples, create_graph):
    """The loss by the seed's loop: one autograd.grad per sample, class and layer, for `samples`."""
    logits, hs = hidden_states(model, x.requires_grad_())
    _, diff = margin_classes_ref(torch.softmax(logits, 1), target, top_k)
    losses = []
    for layer in layers:
        norms = torch.stack([torch.stack([
            torch.autograd.grad(diff[b, i], hs[layer], retain_graph=True, create_graph=create_graph)[0][b].norm(p=q)
            for i in range(top_k)]) for b in samples])
        losses.append(margin_terms(diff[samples] / (norms + EPSILON)))
    return torch.stack(losses).mean()


def make_step(method, model, x, target, layers, top_k, dist_norm, use_approximation, loop_samples):
    """The timed function (loss forward + backward to the parameters) and its time scale."""
    scale = 1.0
    if method == "jacext" or method in ENGINE_PATHS:
        def loss():
            return jacext.large_margin_loss(model, x, target, layers=layers, gamma=GAMMA, alpha_factor=ALPHA,
                                            top_k=top_k, dist_norm=dist_norm, epsilon=EPSILON,
                                            use_approximation=use_approximation,
                                            method=ENGINE_PATHS.get(method, "auto"))
    elif method == "plain-port":
        def loss():
            return plain_port_loss(model, x.detach().clone().requires_grad_(), target, layers, top_k, dist_norm,
                                   use_approximation)
    elif method == "autograd-batch":
        def loss():
            return large_margin_loss_ref(model, x.detach().clone().requires_grad_(), target, layers, GAMMA, ALPHA,
                                         top_k, dist_norm, EPSILON, use_approximation=use_approximation,
                                         worst_case_loss=True, layers_weights=None, on="probs")
    else:
        samples = list(range(min(loop_samples, x.shape[0])))

        def loss():
            return seed_loop_loss(model, x.detach().clone(), target, layers, top_k, DUAL[dist_norm], samples,
                                  not use_approximation)
        scale = x.shape[0] / len(samples)

    params = list(model.parameters())

    def step():
        value = loss()
        torch.autograd.grad(value, params)
        return value

    return step, scale


def worker(args, name, method):
    """Time one (case, method) in this process; print its RESULT line."""
    kind, top_k, dist_norm, use_approximation = (GRID if args.grid else CASES)[name]
    torch.manual_seed(0)
    if kind == "mlp":
        shape = SMOKE_MLP if args.smoke else MLP
        model = jacext.MLP(shape["widths"], activation="tanh").to(args.device)
        x = torch.randn(shape["batch"], shape["widths"][0], device=args.device)
    else:
        shape = SMOKE_CNN if args.smoke else CNN
        model = paper_cnn(shape["image"], shape["channels"], shape["dense"]).to(args.device)
        x = torch.randn(shape["batch"], 1, shape["image"], shape["image"], device=args.device)
    target = torch.randint(0, 10, (x.shape[0],), device=args.device)
    step, scale = make_step(method, model, x, target, shape["layers"], top_k, dist_norm, use_approximation,
                            args.loop_samples)
    value = step().detach().item()  # warm-up, and the value the methods must agree on
    # the GEMM work of a step: the plain port's counted, jacext's MLP paths by its planner
    macs = None
    if method == "plain-port":
        macs = torch_gemm_macs(step)
    elif method == "jacext" and kind == "mlp":
        plan = jacext.explain(model, x, quantity="margin", target=target, layers=shape["layers"], top_k=top_k,
                              dist_norm=dist_norm, use_approximation=use_approximation)
        macs = plan.costs[plan.choice][0]
    timing = time_step(step, args.min_run_time)
    report({"case": name, "model": kind, "top_k": top_k, "dist_norm": str(dist_norm), "q": str(DUAL[dist_norm]),
            "use_approximation": use_approximation, "method": method, "repeat": args.repeat,
            TIME_KEY: timing[TIME_KEY] * scale, "runs": timing["runs"], "loss": value,
            "scaled_from_samples": args.loop_samples if method == "seed-loop" else None, "gemm_macs": macs})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--grid", action="store_true", help="every top_k, dist_norm and approximation on the MLP")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timed runs per method")
    parser.add_argument("--loop-samples", type=int, default=2, help="samples timed for seed-loop")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {METHODS + list(ENGINE_PATHS)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every method this many times over (each in its own process); the table gives "
                        "the median time and the median of the per-run ratios")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/margin_<device>[_smoke].json)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.min_run_time = min(args.min_run_time, 0.2)
    if args.worker:
        worker(args, *args.worker)
        return

    cases = GRID if args.grid else CASES
    default = SMOKE_CASES if args.smoke and not args.grid else list(cases)
    names = default if args.cases is None else args.cases.split(",")
    unknown = [name for name in names if name not in cases]
    if unknown:
        sys.exit(f"unknown cases {unknown}; expected some of {list(cases)}")
    methods = args.methods.split(",")
    if any(method not in METHODS and method not in ENGINE_PATHS for method in methods):
        sys.exit(f"unknown methods in {methods}; expected some of {METHODS + list(ENGINE_PATHS)}")
    # the loop indexes an MLP's layers; the CNN runs the generic path, not the engine's
    plan = [(name, method) for name in names for method in methods
            if not (method in ("seed-loop", *ENGINE_PATHS) and cases[name][0] == "cnn")]
    runs = []
    for repeat in range(args.repeats):
        for name, method in plan:
            command = ["--worker", name, method, "--device", args.device, "--min-run-time", args.min_run_time,
                       "--loop-samples", args.loop_samples, "--repeat", repeat]
            command += ["--smoke"] if args.smoke else []
            command += ["--grid"] if args.grid else []
            runs.append(run_worker(__file__, command, f"{name} {method}"))
            print(f"[{len(runs)}/{len(plan) * args.repeats}] {name} {method}: {runs[-1][TIME_KEY] * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)

    for name in names:
        # every method but the loop (which covers only its samples) computes the same loss
        losses = {r["method"]: r["loss"] for r in runs if r["case"] == name and r["method"] != "seed-loop"}
        for method, value in losses.items():
            if "jacext" in losses and abs(value - losses["jacext"]) > 1e-4 * max(1.0, abs(value)):
                sys.exit(f"{name}: {method}'s loss {value} differs from jacext's {losses['jacext']}")
    results = summarise(runs, ("case", "method"), lambda row: {"method": "jacext"}, "time_vs_jacext")

    machine = machine_description(args.device)
    mlp, cnn = (SMOKE_MLP, SMOKE_CNN) if args.smoke else (MLP, CNN)
    print(f"\n{machine}; float32; MLP {mlp['widths']} (tanh), B={mlp['batch']}, layers {mlp['layers']}; CNN "
          f"{cnn['image']}x{cnn['image']}, conv {cnn['channels']}, dense {cnn['dense']}, B={cnn['batch']}, layers "
          f"{cnn['layers']}; loss forward+backward, median"
          + (f" over {args.repeats} runs (each method in its own process; ratio: the median of the per-run ratios)"
             if args.repeats > 1 else " (each method in its own process)") + "\n")
    header = f"{'case':22} {'k':>2} {'q':>4} {'approx':>6} {'method':16} {'median ms':>10} {'x jacext':>9}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        note = (f"{r['scaled_from_samples']} of {mlp['batch']} samples timed, time scaled"
                if r["scaled_from_samples"] else "")
        if args.repeats > 1 and r["method"] != "jacext" and "time_vs_jacext_range" in r:
            low, high = r["time_vs_jacext_range"]
            note = ", ".join(filter(None, [note, f"ratio over {args.repeats} runs {low:.3g}-{high:.3g}"]))
        if r.get("gemm_macs"):
            note = ", ".join(filter(None, [note, f"{r['gemm_macs'] / 1e9:.3f} G GEMM mult-adds"]))
        ratio = f"{r['time_vs_jacext']:9.3g}" if "time_vs_jacext" in r else " " * 9
        print(f"{r['case']:22} {r['top_k']:>2} {r['q']:>4} {str(r['use_approximation']):>6} {r['method']:16} "
              f"{r[TIME_KEY] * 1e3:10.1f} {ratio}  {note}")
    write_results(args.out, "margin", args.device, args.smoke,
                  {"machine": machine, "mlp": mlp, "cnn": cnn, "cases": {n: cases[n] for n in names},
                   "repeats": args.repeats, "results": results, "runs": runs})


if __name__ == "__main__":
    main()
