"""The exact Laplacian and divergence of an MLP, forward + backward: jacext against its peers.

Laplacian cases (a physics-informed net's step: loss = mean (Delta u)^2 over the batch, the
gradient w.r.t. every parameter), float32:

  L1   n_0 = 3, 4 x 128 tanh -> 1, B = 4096
  L2   n_0 = 10, 4 x 256 tanh -> 1, B = 1024

  jacext          jacext.laplacian: the fused forward Laplacian op and its compiled backward
  autograd-loop   u = model(x), then one autograd.grad(create_graph=True) for the gradient and one
                  per input dimension for the diagonal of the Hessian (DeepXDE-style PINN code)
  vmap-hessian    torch.func: vmap(hessian(model)) and the trace of each Hessian
  torch-carry     the forward Laplacian in plain torch: the same carry (h, dh/dx, Delta h) through
                  the layers, torch ops and autograd, without fusion
  folx            JAX's forward Laplacian (folx.forward_laplacian, vmapped) under jax.jit, with
                  jax.grad (optional: pip install folx; skipped with the reason when absent)
  gemm-floor      not a peer: the GEMMs of jacext's plan alone (the same calls on the same shapes,
                  the tiles shared by the threads, nothing else): what jacext's step cannot get
                  below without faster GEMMs

Divergence case (a continuous normalizing flow's exact trace; loss = mean tr(dy/dx)):

  D1   64 -> 256 -> 256 -> 64 tanh (linear output), B = 256

  jacext          jacext.divergence, method="auto" (jacext.explain(..., quantity="divergence"))
  jacext-forward  jacext.divergence, method="forward": the input columns carried forward
  vmap-jacfwd     torch.func: vmap(jacfwd(model)) and the trace of each Jacobian
  vmap-jacrev     torch.func: vmap(jacrev(model)) and the trace

    python bench/bench_laplacian.py               # the cases above
    python bench/bench_laplacian.py --repeats 5   # ratios as the median of 5 runs
    python bench/bench_laplacian.py --threads 1   # every method on one thread
    python bench/bench_laplacian.py --smoke       # tiny sizes, seconds (CI)
    python bench/bench_laplacian.py --device cuda # on a GPU (gemm-floor and folx are CPU rows: skipped)

Each case and method runs in its own process; the table gives the median time per step and each
method's time over jacext's (the median of the per-run ratios with --repeats).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.func import hessian, jacfwd, jacrev, vmap

import jacext

from common import TIME_KEY, machine_description, report, run_worker, summarise, time_step, write_results  # bench/common.py

CASES = [dict(name="L1", kind="laplacian", widths=[3] + [128] * 4 + [1], batch=4096),
         dict(name="L2", kind="laplacian", widths=[10] + [256] * 4 + [1], batch=1024),
         dict(name="D1", kind="divergence", widths=[64, 256, 256, 64], batch=256)]
SMOKE_CASES = [dict(name="L1", kind="laplacian", widths=[3, 16, 16, 1], batch=32),
               dict(name="L2", kind="laplacian", widths=[4, 16, 16, 1], batch=16),
               dict(name="D1", kind="divergence", widths=[6, 16, 16, 6], batch=16)]
METHODS = {"laplacian": ["jacext", "gemm-floor", "autograd-loop", "vmap-hessian", "torch-carry", "folx"],
           "divergence": ["jacext", "jacext-forward", "vmap-jacfwd", "vmap-jacrev"]}
# the targets: jacext's speed-up over the best peer
TARGETS = {"L1": 3.0, "L2": 3.0, "D1": 5.0}
PEERS = {"laplacian": ["autograd-loop", "vmap-hessian", "torch-carry", "folx"], "divergence": ["vmap-jacfwd", "vmap-jacrev"]}


def one_sample(model):
    return lambda xi: model(xi.unsqueeze(0)).squeeze(0)


def laplacian_autograd_loop(model, x):
    x = x.requires_grad_()
    u = model(x)
    (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return sum(torch.autograd.grad(grad[:, j].sum(), x, create_graph=True)[0][:, j] for j in range(x.shape[1]))


def laplacian_torch_carry(model, x):
    """The forward Laplacian in plain torch (tanh hidden layers, linear output)."""
    h, lap = x, torch.zeros_like(x)
    jac = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)  # (B, n_0, n): rows dh/dx_j
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for i, linear in enumerate(linears):
        z, p, q = linear(h), jac @ linear.weight.t(), lap @ linear.weight.t()
        if i + 1 == len(linears):
            return q[:, 0]
        t = torch.tanh(z)
        d1 = 1 - t * t
        h, jac, lap = t, d1.unsqueeze(1) * p, d1 * q - 2 * t * d1 * p.square().sum(1)


def time_gemm_floor(case, min_run_time):
    """The GEMM calls of jacext's Laplacian plan for this case, per tile (planner.carry_tile_size),
    on torch.get_num_threads() Python threads that share the tiles, each GEMM on one thread (as in
    the op); the elementwise passes are left out: the part of a step that only faster GEMMs cut."""
    from concurrent.futures import ThreadPoolExecutor

    from jacext.activations import IDENTITY, TANH
    from jacext.planner import carry_tile_size, laplacian_layout

    widths, batch, threads = case["widths"], case["batch"], torch.get_num_threads()
    layout = laplacian_layout(widths, [TANH] * (len(widths) - 2) + [IDENTITY], False)
    tile = carry_tile_size(widths, batch, layout, 4, "cpu") or batch
    rows, top = layout.rows, layout.carried
    tiles = [min(tile, batch - start) for start in range(0, batch, tile)]
    weights = [torch.randn(n_out, n_in) for n_in, n_out in zip(widths[:-1], widths[1:])]

    def worker_buffers():  # each thread's carries, adjoints, output gradient and weight gradients
        carries = [torch.randn(tile * rows, widths[i]) for i in range(top + 1)]
        adjoints = [torch.randn(tile * rows, widths[i + 1]) for i in range(top)]
        return carries, adjoints, torch.randn(tile, widths[-1]), [torch.zeros_like(w) for w in weights]

    buffers = [worker_buffers() for _ in range(threads)]

    def run(worker):
        carries, adjoints, grad_out, grads = buffers[worker]
        for n in tiles[worker::threads]:
            c, a, g = [t[:n * rows] for t in carries], [t[:n * rows] for t in adjoints], grad_out[:n]
            for i in range(top):  # forward: one GEMM over the stacked rows per carried layer
                torch.mm(c[i], weights[i].t(), out=c[i + 1])
            for row in (0, rows - 1):  # the thin last layer maps h and Delta: forward and backward
                torch.mm(c[top][row::rows], weights[top].t())
                grads[top].addmm_(g.t(), c[top][row::rows])
                torch.mm(g, weights[top])
            for i in reversed(range(top)):  # backward: the weight gradient, then the adjoint below
                grads[i].addmm_(a[i].t(), c[i])
                torch.mm(a[i], weights[i], out=c[i]) if i > 0 else torch.mm(a[i][::rows], weights[i])

    torch.set_num_threads(1)
    with ThreadPoolExecutor(threads) as pool:
        def step():
            list(pool.map(run, range(threads)))

        warm_up(step, min_run_time)
        return time_step(step, min_run_time)[TIME_KEY]


def laplacian_loss(method, model, x):
    """The Laplacian case's loss of one step, by `method` (the torch ones)."""
    if method == "jacext":
        return lambda: jacext.laplacian(model, x)[1].square().mean()
    if method == "autograd-loop":
        return lambda: laplacian_autograd_loop(model, x.clone()).square().mean()
    if method == "vmap-hessian":
        return lambda: vmap(hessian(one_sample(model)))(x).diagonal(dim1=2, dim2=3).sum(-1).square().mean()
    if method == "torch-carry":
        return lambda: laplacian_torch_carry(model, x).square().mean()
    raise ValueError(method)


def divergence_loss(method, model, x):
    """The divergence case's loss of one step, by `method`."""
    if method in ("jacext", "jacext-forward"):
        how = "auto" if method == "jacext" else "forward"
        return lambda: jacext.divergence(model, x, method=how)[1].mean()
    transform = {"vmap-jacfwd": jacfwd, "vmap-jacrev": jacrev}[method]
    return lambda: vmap(transform(one_sample(model)))(x).diagonal(dim1=1, dim2=2).sum(1).mean()


def make_case(case, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = jacext.MLP(case["widths"], activation="tanh").to(device)
    x = torch.rand(case["batch"], case["widths"][0]).to(device)
    return model, x


def time_torch(case, method, min_run_time, device="cpu"):
    """The median step time (torch.utils.benchmark synchronizes CUDA around its timings)."""
    model, x = make_case(case, device=device)
    loss = (laplacian_loss if case["kind"] == "laplacian" else divergence_loss)(method, model, x)
    params = list(model.parameters())

    def step():
        torch.autograd.grad(loss(), params, allow_unused=True)

    warm_up(step, min_run_time)
    return time_step(step, min_run_time)[TIME_KEY]


def warm_up(step, min_run_time):
    """A few untimed steps (a quarter of the timed time, at least 3): the thread pools start, the
    workspace and jit caches fill."""
    started, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - started < min_run_time / 4:
        step()
        calls += 1


def time_folx(case, min_run_time):
    """folx's forward Laplacian of the same MLP under jax.jit, with jax.grad; None (and the reason)
    when jax or folx is not installed."""
    try:
        import jax
        import jax.numpy as jnp
        import folx
    except ImportError as error:
        return None, f"not installed ({error.name}): pip install folx"
    model, x = make_case(case)
    params = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
              for m in model if isinstance(m, torch.nn.Linear)]
    params = jax.tree_util.tree_map(jnp.asarray, params)
    xs = jnp.asarray(x.numpy())

    def mlp(params, xi):
        h = xi
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i + 1 < len(params):
                h = jnp.tanh(h)
        return h[0]

    def loss(params, xs):
        lap = jax.vmap(lambda xi: folx.forward_laplacian(lambda v: mlp(params, v))(xi).laplacian)(xs)
        return jnp.mean(lap ** 2)

    jitted = jax.jit(jax.grad(loss))

    def step():
        jax.block_until_ready(jitted(params, xs))

    warm_up(step, min_run_time)
    return time_step(step, min_run_time)[TIME_KEY], f"jax {jax.__version__}, folx"


def in_subprocess(args, case, method):
    """Run this script with --worker CASE METHOD in its own process; its RESULT line as a dict."""
    command = ["--min-run-time", args.min_run_time, "--device", args.device, "--worker", case, method] + (
               ["--smoke"] if args.smoke else []) + (["--threads", args.threads] if args.threads else [])
    return run_worker(__file__, command, f"{case} {method}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per method and case")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every (case, method) this many times over (each in its own process); the table "
                        "gives the median time and the median of the per-run ratios")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every method (default: torch's); 1 also runs XLA on one thread")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/laplacian_<device>[_smoke].json)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.min_run_time = min(args.min_run_time, 0.1)
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
            if args.threads == 1:  # read by XLA when jax starts
                os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        case = next(c for c in cases if c["name"] == args.worker[0])
        if args.worker[1] in ("folx", "gemm-floor") and args.device != "cpu":
            median, note = None, f"a CPU row (the {args.worker[1]} timing runs on the CPU only)"
        elif args.worker[1] == "folx":
            median, note = time_folx(case, args.min_run_time)
        elif args.worker[1] == "gemm-floor":
            median, note = time_gemm_floor(case, args.min_run_time), None
        else:
            median, note = time_torch(case, args.worker[1], args.min_run_time, args.device), None
        report({TIME_KEY: median, "note": note})
        return

    runs, skipped = [], {}
    for repeat in range(args.repeats):
        for case in cases:
            for method in METHODS[case["kind"]]:
                if method in skipped:
                    continue
                result = in_subprocess(args, case["name"], method)
                if result[TIME_KEY] is None:
                    skipped[method] = result["note"]
                    print(f"{method}: skipped, {result['note']}", flush=True)
                    continue
                runs.append({"case": case["name"], "widths": case["widths"], "batch": case["batch"], "method": method,
                             "repeat": repeat, TIME_KEY: result[TIME_KEY]})
                print(f"{case['name']} {method}: {result[TIME_KEY] * 1e3:.2f} ms", flush=True)

    results = summarise(runs, ("case", "method"), lambda row: {"method": "jacext"}, "time_vs_jacext")

    machine = machine_description(args.device) + (f"; {args.threads} thread(s) per method" if args.threads else "")
    print(f"\n{machine}; float32; one training step (forward + backward to every parameter), median"
          + (f" over {args.repeats} runs (ratio: the median of the per-run ratios)" if args.repeats > 1 else "")
          + "; each case and method in its own process\n")
    header = f"{'case':5} {'widths':26} {'B':>5}  {'method':15} {'median ms':>10} {'x jacext':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['case']:5} {str(r['widths']):26} {r['batch']:5d}  {r['method']:15} {r[TIME_KEY] * 1e3:10.2f} "
              f"{r['time_vs_jacext']:9.2f}")
    summary = {}
    for case in cases:
        peers = [r for r in results if r["case"] == case["name"] and r["method"] in PEERS[case["kind"]]]
        if not peers:
            continue
        best = min(peers, key=lambda r: r[TIME_KEY])
        summary[case["name"]] = {"best_peer": best["method"], "speedup_over_best_peer": best["time_vs_jacext"],
                                 "target": TARGETS[case["name"]], "met": best["time_vs_jacext"] >= TARGETS[case["name"]]}
    print()
    for name, s in summary.items():
        print(f"{name}: jacext {s['speedup_over_best_peer']:.2f}x faster than the best peer ({s['best_peer']}); "
              f"target {s['target']:g}x: {'met' if s['met'] else 'NOT met'}")
    for method, note in skipped.items():
        print(f"({method} skipped: {note})")
    write_results(args.out, "laplacian", args.device, args.smoke, {"machine": machine, "repeats": args.repeats,
                                                             "threads": args.threads or torch.get_num_threads(),
                                                             "results": results, "runs": runs, "summary": summary,
                                                             "skipped": skipped})


if __name__ == "__main__":
    main()
