"""README's headline table, computed from the benchmark JSON files in bench/results/.

Each row names a case of one JSON file: jacext's median time, the exact peer of that run that
comes closest to it and its median time, and the speed-up as the JSON holds it (the median over
the runs of the per-run ratio, each run's methods timed one after another; the peer is the one
with the smallest such ratio). tests/test_readme.py checks that
README.md shows exactly this table, so every figure in it comes from a file that a named command
wrote.

    python bench/headline.py            # print the table
    python bench/headline.py --write    # put it into README.md (between the headline markers)
"""
from __future__ import annotations

import argparse
import json
import os

from common import TIME_KEY  # bench/common.py: the one key of a summarised time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.join(os.path.dirname(RESULTS), "..", "README.md")
START, END = "<!-- headline table: python bench/headline.py --write -->", "<!-- end of headline table -->"

PEER_NAMES = {
    "vmap-jacrev": "torch.func vmap(jacrev)", "vmap-jacfwd": "torch.func vmap(jacfwd)",
    "jax-vmap-jacrev": "JAX vmap(jacrev), jit", "jax-vmap-jacfwd": "JAX vmap(jacfwd), jit",
    "autograd-loop": "autograd.grad per output", "autograd-batch": "batched autograd.grad",
    "autodiff-slogdet": "autograd + slogdet", "vmap-hessian": "torch.func vmap(hessian)",
    "torch-carry": "the same carry in plain torch", "folx": "folx (JAX), jit", "torch.func": "torch.func vmap(jacrev)",
    "plain-port": "autograd.grad per top-k class", "torch-func": "torch.func jacrev + hessian",
}

# (what, command, JSON file, the rows' selector, jacext's method, the exact peers)
ROWS = [
    ("contractive autoencoder on digits, a training step (the demo)", "python -m jacext demo --json ...",
     "demo_cpu.json", {}, "jacext", ["torch.func"]),
    ("digits classifier 64-256-256-10, B = 256, penalty step", "bench_frobenius.py --cases P2,P5,P6 --repeats 5",
     "frobenius_cpu_everyday.json", {"case": "P6"}, "jacext-auto",
     ["vmap-jacrev", "vmap-jacfwd", "jax-vmap-jacrev", "jax-vmap-jacfwd", "autograd-loop"]),
    ("penalty on a 256-wide hidden layer (64-256-256, m = 256), B = 256", "bench_frobenius.py --cases P2,P5,P6 --repeats 5",
     "frobenius_cpu_everyday.json", {"case": "P5"}, "jacext-auto",
     ["vmap-jacrev", "vmap-jacfwd", "jax-vmap-jacrev", "jax-vmap-jacfwd", "autograd-loop"]),
    ("784-256-256-10, B = 128, penalty step", "bench_frobenius.py --cases P2,P5,P6 --repeats 5",
     "frobenius_cpu_everyday.json", {"case": "P2"}, "jacext-auto",
     ["vmap-jacrev", "vmap-jacfwd", "jax-vmap-jacrev", "jax-vmap-jacfwd", "autograd-loop"]),
    ("large-margin loss at the paper's settings (top_k 1, dist_norm inf, norms held), 784-512-512-10, 3 layers",
     "bench_margin.py --methods jacext,plain-port --repeats 3", "margin_cpu.json", {"case": "official"}, "jacext",
     ["plain-port"]),
    ("MLP flow D = 784, B = 10, relative-gradient step", "bench_flows.py --repeats 5",
     "flows_cpu.json", {"case": "D784-B10"}, "jacext-relative", ["autodiff-slogdet"]),
    ("Laplacian of a 3-128x4-1 tanh MLP (PINN), B = 4096", "bench_laplacian.py --repeats 5",
     "laplacian_cpu.json", {"case": "L1"}, "jacext", ["autograd-loop", "vmap-hessian", "torch-carry", "folx"]),
    ("spectral norm of J, 784-256-256-10, B = 128", "bench_spectral.py --repeats 5",
     "spectral_cpu.json", {"case": "spectral"}, "jacext-auto", ["vmap-jacrev"]),
    ("heat-equation PINN on (x, t), u_t - u_xx with wrt=[0], 2-64x3-1 tanh, B = 4096", "bench_models.py --repeats 5",
     "models_cpu.json", {"case": "H1"}, "jacext", ["autograd-loop", "torch-func"]),
]


def _ratio(row):
    """The row's time over jacext's, as its JSON stores it (the median of the per-run ratios)."""
    keys = [k for k in row if k.startswith("time_vs_") and not k.endswith("_range")]
    return row[keys[0]] if keys else None


def headline_rows(results=RESULTS):
    """[(what, jacext ms, peer name, peer ms, speed-up, source)] for the rows whose JSON exists."""
    rows = []
    for what, command, name, selector, mine, peers in ROWS:
        path = os.path.join(results, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        chosen = [r for r in data["results"] if all(r.get(k) == v for k, v in selector.items())]
        ours = next(r for r in chosen if r["method"] == mine)
        rivals = [r for r in chosen if r["method"] in peers]
        # the peer jacext beats by the least (per-run ratios), not merely the lowest median time
        best = min(rivals, key=lambda r: (_ratio(r) if _ratio(r) is not None else r[TIME_KEY] / ours[TIME_KEY]))
        where = f"`{name}`" + (f" {', '.join(str(v) for v in selector.values())}" if selector else "")
        if "runs_speedup" in data:  # a file that keeps the median of several runs of its command
            where += f" (the median of {len(data['runs_speedup'])} runs)"
        rows.append((what, 1e3 * ours[TIME_KEY], PEER_NAMES.get(best["method"], best["method"]),
                     1e3 * best[TIME_KEY], _ratio(best), f"{where}: `{data['command']}`"))
    return rows


def _ms(value):
    return f"{value:.3g} ms" if value < 100 else f"{value:.0f} ms"


def table(results=RESULTS) -> str:
    lines = ["| case (float32, CPU) | jacext | fastest exact peer | speed-up | JSON: command |",
             "| --- | --- | --- | --- | --- |"]
    for what, ours, peer, theirs, ratio, source in headline_rows(results):
        lines.append(f"| {what} | {_ms(ours)} | {peer}: {_ms(theirs)} | **{ratio:.2f}×** | {source} |")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """The table between the markers of a README text."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    generated = table()
    if not args.write:
        print(generated)
        return
    path = os.path.normpath(README)
    with open(path) as f:
        text = f.read()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{before}{START}\n{generated}\n{END}{after}")
    print(f"wrote the headline table into {path}")


if __name__ == "__main__":
    main()
