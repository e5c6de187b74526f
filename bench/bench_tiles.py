"""Tile size sweep: the penalty step (forward + backward) at several tile sizes, against the tile
the planner picks (jacext.planner.tile_size) and the whole batch at once (tile 0).

Each (case, tile) runs in its own process. The cases are the everyday-width cases of
bench_frobenius (P2, P5 the penultimate-layer penalty, P6 the digits classifier) and P1, where the
planner runs the whole batch (one GEMM row per sample).

    python bench/bench_tiles.py                     # the sweep, JSON in bench/results/tiles_cpu.json
    python bench/bench_tiles.py --cases P5 --tiles 0,2,4,8
    python bench/bench_tiles.py --smoke             # tiny sizes, seconds (CI)
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import TIME_KEY, machine_description, report, run_worker, time_step, write_results  # bench/common.py

# name: (widths, batch, output activation, method); tanh hidden layers, as bench_frobenius
CASES = {"P2": ([784, 256, 256, 10], 128, None, "auto"), "P5": ([64, 256, 256], 256, "tanh", "auto"),
         "P6": ([64, 256, 256, 10], 256, None, "auto"), "P1": ([784, 1024, 1000], 64, None, "auto")}
SMOKE_CASES = {"S1": ([12, 16, 16, 3], 9, None, "auto")}
TILES = "0,2,4,8,16,32,64,planner"


def worker(case, tile, args):
    import jacext
    import jacext._jacobian_ops as ops

    widths, batch, output_activation, method = case
    torch.manual_seed(0)
    model = jacext.MLP(widths, activation="tanh", output_activation=output_activation)
    x = torch.randn(batch, widths[0])
    planned = ops.tile_size
    strategy = jacext.ops.resolve_strategy(method, widths, batch=batch, output_linear=output_activation is None)
    chosen = planned(widths, batch, strategy, x.element_size())
    if tile != "planner":
        ops.tile_size = lambda *a, **k: int(tile)  # the op's tile, whatever the planner would pick

    def step():
        model.zero_grad(set_to_none=True)
        _, sq = jacext.jacobian_frobenius(model, x, method=method)
        sq.mean().backward()

    step()
    report({"tile": chosen if tile == "planner" else int(tile), "planner": tile == "planner",
            "planner_tile": chosen, **time_step(step, args.min_run_time)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--tiles", default=TILES, help="comma-separated tile sizes; 'planner' for the planner's")
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/tiles_cpu[_smoke].json)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else {name: CASES[name] for name in args.cases.split(",")}
    if args.smoke:
        args.min_run_time = 0.05
    if args.worker:
        worker(cases[args.worker[0]], args.worker[1], args)
        return

    results = []
    for name, (widths, batch, output_activation, method) in cases.items():
        for tile in args.tiles.split(","):
            if tile != "planner" and int(tile) >= batch:
                continue
            command = ["--worker", name, tile, "--min-run-time", args.min_run_time] + (["--smoke"] if args.smoke else [])
            results.append({"case": name, "widths": widths, "batch": batch,
                            **run_worker(__file__, command, f"{name} tile {tile}")})
            print(f"{name} tile {tile}: {results[-1][TIME_KEY] * 1e3:.2f} ms", file=sys.stderr, flush=True)

    machine = machine_description()
    print(f"\n{machine}; float32; penalty forward + backward, median; tile 0 = the whole batch at once\n")
    header = f"{'case':5} {'tile':>8} {'median ms':>10} {'x whole batch':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        whole = next((o for o in results if o["case"] == r["case"] and o["tile"] == 0 and not o["planner"]), None)
        r["time_vs_whole_batch"] = r[TIME_KEY] / whole[TIME_KEY] if whole else None
        label = f"{r['tile']} (planner)" if r["planner"] else str(r["tile"])
        ratio = f"{r['time_vs_whole_batch']:14.3f}" if whole else " " * 14
        print(f"{r['case']:5} {label:>8} {r[TIME_KEY] * 1e3:10.2f} {ratio}")
    write_results(args.out, "tiles", "cpu", args.smoke, {"machine": machine, "results": results})


if __name__ == "__main__":
    main()
