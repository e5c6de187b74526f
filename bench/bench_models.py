"""Users' own models: jacext against what a user would write, a training step each (float32).

  H1   heat-equation PINN, 2-64-64-64-1 tanh on (x, t), B = 4096: loss = mean (u_t - u_xx)^2,
       backward to every parameter
         jacext         jacext.laplacian(model, xt, wrt=[0], return_gradient=True): u_xx from the
                        fused Laplacian over the chosen feature, u_t from its gradient
         autograd-loop  u = model(xt); one autograd.grad(create_graph=True) for the gradient, one
                        more for u_xx (the usual PINN code)
         torch-func     vmap(jacrev(model)) for u_t and vmap(hessian(model)) for u_xx
  R1   a residual PINN (2 -> 64 tanh, three blocks h + tanh(W h + b) of width 64, -> 1; the user's own
       modules), B = 4096: loss = mean (Delta u)^2, backward to every parameter
         jacext         jacext.laplacian(model, x): the skips on the fused forward Laplacian
         autograd-loop  u = model(x); one autograd.grad(create_graph=True) for the gradient, one
                        more per input dimension for the second derivatives
         torch-func     vmap(hessian(model)) and its trace
  C1   the official PyTorch MNIST CNN (conv 32, conv 64, max-pool, dropout, fc 128, fc 10; eval()),
       B = 32, 28 x 28 inputs: the Jacobian penalty's step, loss = mean ||dy/dx||_F^2
         jacext         jacext.jacobian_frobenius(model, x, method="autograd"): the generic path
         vmap-jacrev    torch.func: vmap(jacrev(model)) and the squared norm
         grad-loop      one autograd.grad(create_graph=True) per output
  N1   an FFJORD-style field f(x, t) = MLP(cat([x, t])), 17-64-64-16 tanh, t a conditioning input,
       B = 512: loss = mean(|f|^2 + div_x f), backward to every parameter (a CNF step's shape)
         jacext         jacext.divergence(field, x, cond=t): exact, on the engine over x's columns
         autograd-trace one autograd.grad(create_graph=True) per dimension of x (FFJORD's exact trace)
  N2   the same field and loss with the divergence estimated from one Rademacher projection
         jacext         jacext.divergence(field, x, cond=t, method="hutchinson", n_proj=1)
         ffjord-vjp     FFJORD's estimator: e^T (e^T df/dx) from one vjp
  F1   the front-end's cost per call on a lowered MLP (784-256-256-10): jacext.frontend.lower on a
       model it has traced (the plan is cached per module and structure), not a training step

    python bench/bench_models.py --repeats 5   # ratios as the median of 5 runs
    python bench/bench_models.py --smoke       # tiny sizes, seconds (CI)
    python bench/bench_models.py --device cuda # on a GPU (bench/gpu_check.sh)

Each case and method runs in its own process; the table gives the median time per step and each
method's time over jacext's (the median of the per-run ratios with --repeats).
"""
from __future__ import annotations

import argparse
import timeit

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext

from common import (TIME_KEY, machine_description, report, run_worker, summarise, time_step,  # bench/common.py
                    torch_gemm_macs, write_results)

CASES = [dict(name="H1", kind="heat", widths=[2, 64, 64, 64, 1], batch=4096),
         dict(name="R1", kind="residual", width=64, blocks=3, batch=4096),
         dict(name="C1", kind="cnn", side=28, batch=32),
         dict(name="N1", kind="cnf", widths=[16, 64, 64, 16], batch=512),
         dict(name="N2", kind="cnf-estimate", widths=[16, 64, 64, 16], batch=512)]
SMOKE_CASES = [dict(name="H1", kind="heat", widths=[2, 8, 8, 1], batch=16),
               dict(name="R1", kind="residual", width=8, blocks=2, batch=16),
               dict(name="C1", kind="cnn", side=12, batch=2),
               dict(name="N1", kind="cnf", widths=[3, 8, 3], batch=8),
               dict(name="N2", kind="cnf-estimate", widths=[3, 8, 3], batch=8)]
METHODS = {"heat": ["jacext", "autograd-loop", "torch-func"], "residual": ["jacext", "autograd-loop", "torch-func"], "cnn": ["jacext", "vmap-jacrev", "grad-loop"],
           "cnf": ["jacext", "autograd-trace"], "cnf-estimate": ["jacext", "ffjord-vjp"]}
PEERS = {"heat": ["autograd-loop", "torch-func"], "residual": ["autograd-loop", "torch-func"], "cnn": ["vmap-jacrev", "grad-loop"], "cnf": ["autograd-trace"],
         "cnf-estimate": ["ffjord-vjp"]}
# issues 29 and 31's targets: jacext's speed-up over each peer (the CNN: not slower than the faster one)
TARGETS = {"H1": {"autograd-loop": 2.5, "torch-func": 1.5}, "R1": {"autograd-loop": 2.0, "torch-func": 1.5}, "C1": {"best": 1.0}, "N1": {"autograd-trace": 4.0},
           "N2": {"ffjord-vjp": 1.0}}


class MnistNet(nn.Module):
    """pytorch/examples' mnist/main.py Net (log_softmax left out: the penalty is on the logits)."""

    def __init__(self, side=28):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((side - 4) // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


def heat_model(widths):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def heat_residual(model, xt, method):
    if method == "jacext":
        _, grad, lap = jacext.laplacian(model, xt, return_gradient=True, wrt=[0])
        return grad[:, 0, 1] - lap[:, 0]
    if method == "autograd-loop":
        xt = xt.detach().requires_grad_()
        u = model(xt)
        (grad,) = torch.autograd.grad(u.sum(), xt, create_graph=True)
        (second,) = torch.autograd.grad(grad[:, 0].sum(), xt, create_graph=True)
        return grad[:, 1] - second[:, 0]
    one = lambda p: model(p.unsqueeze(0))[0, 0]  # noqa: E731
    u_t = vmap(jacrev(one))(xt)[:, 1]
    u_xx = vmap(hessian(one))(xt)[:, 0, 0]
    return u_t - u_xx


def penalty(model, x, method):
    if method == "jacext":
        return jacext.jacobian_frobenius(model, x, method="autograd")[1]
    if method == "vmap-jacrev":
        jac = vmap(jacrev(lambda p: model(p.unsqueeze(0))[0]))(x)
        return jac.flatten(1).square().sum(1)
    x = x.detach().requires_grad_()
    y = model(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0] for i in range(y.shape[1])]
    return sum(r.flatten(1).square().sum(1) for r in rows)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


def residual_pinn(width, blocks):
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), *[Block(width) for _ in range(blocks)], nn.Linear(width, 1))


def laplacian_of(model, x, method):
    if method == "jacext":
        return jacext.laplacian(model, x)[1][:, 0]
    if method == "autograd-loop":
        x = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return sum(torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    one = lambda p: model(p.unsqueeze(0))[0, 0]  # noqa: E731
    return vmap(hessian(one))(x).diagonal(dim1=1, dim2=2).sum(1)


class Field(nn.Module):
    """FFJORD's field f(x, t): an MLP on cat([x, t]) (t: one time per sample, (B, 1))."""

    def __init__(self, widths):
        super().__init__()
        self.net = heat_model([widths[0] + 1] + widths[1:])

    def forward(self, x, t):
        return self.net(torch.cat([x, t], 1))


def cnf_divergence(field, x, t, method):
    """(f, div_x f) as each method computes it."""
    if method == "jacext":
        return jacext.divergence(field, x, cond=t)
    if method == "jacext-hutchinson":
        return jacext.divergence(field, x, cond=t, method="hutchinson", n_proj=1)
    x = x.detach().requires_grad_()
    f = field(x, t)
    if method == "autograd-trace":
        div = sum(torch.autograd.grad(f[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
        return f, div
    e = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1  # ffjord-vjp: Rademacher
    (e_jac,) = torch.autograd.grad(f, x, e, create_graph=True)
    return f, (e_jac * e).sum(1)


def time_case(case, method, min_run_time, device="cpu"):
    torch.manual_seed(0)
    if case["kind"] in ("cnf", "cnf-estimate"):
        field = Field(case["widths"]).to(device)
        x = torch.randn(case["batch"], case["widths"][0], device=device)
        t = torch.rand(case["batch"], 1, device=device)
        if case["kind"] == "cnf-estimate" and method == "jacext":
            method = "jacext-hutchinson"

        def step():
            field.zero_grad(set_to_none=True)
            f, div = cnf_divergence(field, x, t, method)
            (f.square().sum(1) + div).mean().backward()
    elif case["kind"] == "residual":
        model = residual_pinn(case["width"], case["blocks"]).to(device)
        xy = torch.rand(case["batch"], 2, device=device)

        def step():
            model.zero_grad(set_to_none=True)
            laplacian_of(model, xy, method).square().mean().backward()
    elif case["kind"] == "heat":
        model = heat_model(case["widths"]).to(device)
        xt = torch.rand(case["batch"], 2, device=device)

        def step():
            model.zero_grad(set_to_none=True)
            heat_residual(model, xt, method).square().mean().backward()
    else:
        model = MnistNet(case["side"]).eval().to(device)
        x = torch.randn(case["batch"], 1, case["side"], case["side"], device=device)

        def step():
            model.zero_grad(set_to_none=True)
            penalty(model, x, method).mean().backward()

    for _ in range(2):  # warm-up: the front-end's trace, the workspace, lazy initialization
        step()
    macs = None
    if case["kind"] in ("heat", "residual"):  # the GEMM work of a step: jacext's by its planner, the others
        # counted
        if method != "jacext":
            macs = torch_gemm_macs(step)
        elif case["kind"] == "heat":
            macs = next(iter(jacext.explain(model, xt, quantity="laplacian", return_gradient=True,
                                            wrt=[0]).candidates.values()))[0]
        else:
            macs = next(iter(jacext.explain(model, xy, quantity="laplacian").candidates.values()))[0]
    return {TIME_KEY: time_step(step, min_run_time)[TIME_KEY], "gemm_macs": macs}


def frontend_cost(smoke):  # pure Python: the same on every device
    """Seconds per jacext.frontend.lower call on a model it has traced (the median of 5 blocks)."""
    model = jacext.MLP([784, 256, 256, 10] if not smoke else [8, 8, 2])
    jacext.frontend.lower(model)
    calls = 2000 if not smoke else 20
    return sorted(timeit.repeat(lambda: jacext.frontend.lower(model), number=calls, repeat=5))[2] / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per method and case")
    parser.add_argument("--repeats", type=int, default=1, help="time every (case, method) this many times over")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/models_<device>[_smoke].json)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.min_run_time = min(args.min_run_time, 0.1)
    if args.worker:
        if args.worker[0] == "F1":
            report({TIME_KEY: frontend_cost(args.smoke)})
            return
        case = next(c for c in cases if c["name"] == args.worker[0])
        report(time_case(case, args.worker[1], args.min_run_time, args.device))
        return

    def worker(case, method):
        command = ["--min-run-time", args.min_run_time, "--device", args.device, "--worker", case, method] + (
            ["--smoke"] if args.smoke else [])
        return run_worker(__file__, command, f"{case} {method}")

    runs = []
    for repeat in range(args.repeats):
        for case in cases:
            for method in METHODS[case["kind"]]:
                result = worker(case["name"], method)
                seconds = result[TIME_KEY]
                runs.append({"case": case["name"], "method": method, "batch": case["batch"], "repeat": repeat,
                             TIME_KEY: seconds, "gemm_macs": result.get("gemm_macs")})
                print(f"{case['name']} {method}: {seconds * 1e3:.2f} ms", flush=True)
    results = summarise(runs, ("case", "method"), lambda row: {"method": "jacext"}, "time_vs_jacext")
    frontend = worker("F1", "lower")[TIME_KEY]
    machine = machine_description(args.device)
    print(f"\n{machine}; float32; one training step, median"
          + (f" over {args.repeats} runs (ratio: the median of the per-run ratios)" if args.repeats > 1 else "")
          + "; each case and method in its own process\n")
    header = f"{'case':5} {'B':>5}  {'method':14} {'median ms':>10} {'x jacext':>9} {'GEMM G mult-adds':>17}"
    print(header)
    print("-" * len(header))
    for r in results:
        m = r["gemm_macs"]
        print(f"{r['case']:5} {r['batch']:5d}  {r['method']:14} {r[TIME_KEY] * 1e3:10.2f} {r['time_vs_jacext']:9.2f}"
              f" {'' if m is None else f'{m / 1e9:17.3f}'}")
    summary = {}
    for case in cases:
        rows = {r["method"]: r for r in results if r["case"] == case["name"]}
        targets = TARGETS[case["name"]]
        if "best" in targets:
            best = min(PEERS[case["kind"]], key=lambda m: rows[m][TIME_KEY])
            checks = {f"best peer ({best})": (rows[best]["time_vs_jacext"], targets["best"])}
        else:
            checks = {peer: (rows[peer]["time_vs_jacext"], target) for peer, target in targets.items()}
        summary[case["name"]] = {name: {"speedup": value, "target": target, "met": value >= target}
                                 for name, (value, target) in checks.items()}
    print()
    for name, checks in summary.items():
        for peer, s in checks.items():
            print(f"{name}: jacext {s['speedup']:.2f}x the speed of {peer}; target {s['target']:g}x: "
                  f"{'met' if s['met'] else 'NOT met'}")
    print(f"F1: jacext.frontend.lower on a traced 784-256-256-10 MLP: {frontend * 1e6:.1f} us per call")
    write_results(args.out, "models", args.device, args.smoke, {"machine": machine, "repeats": args.repeats,
                                                          "results": results, "runs": runs, "summary": summary,
                                                          "frontend_lower_s": frontend})


if __name__ == "__main__":
    main()
