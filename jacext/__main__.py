"""Command line.

    python -m jacext demo      train on the bundled digits with a Jacobian penalty twice, with jacext
                               and with torch.func (default: a contractive autoencoder; --task
                               classifier, reconstruction); print both runs' curves and the time
                               per step, and write a PNG of them
    python -m jacext bench     run every benchmark script in bench/ (source tree), print their
                               tables, write their JSON and a PNG bar chart
    python -m jacext explain --sizes 784,1024,1000 --batch 64
                               the strategy jacext runs and each candidate's cost
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import MLP, explain, jacobian_frobenius
from .data import load_digits, load_mnist

WARMUP_STEPS = 3


def _progress(iterable, description, total):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, total=total, leave=False, file=sys.stderr)


class Task:
    """What the demo trains, and where the penalty sits. `penalized` is the nn.Sequential whose input
    Jacobian is penalized (jacext's op, or torch.func's vmap(jacrev) for the comparison)."""

    def __init__(self, name, description, metric, build, loss):
        self.name, self.description, self.metric = name, description, metric
        self.build, self.loss = build, loss


def _autoencoder(args, n_in):
    """(model, penalized): encoder n_in -> hidden -> code (linear code), decoder back (sigmoid)."""
    hidden = args.hidden or [256]
    encoder = MLP([n_in, *hidden, args.code], activation=args.activation)
    decoder = MLP([args.code, *reversed(hidden), n_in], activation=args.activation, output_activation="sigmoid")
    return torch.nn.Sequential(encoder, decoder), encoder


def _classifier(args, n_in):
    model = MLP([n_in, *(args.hidden or [256, 256]), 10], activation=args.activation)
    return model, model


def _contractive_loss(model, out, sq, x, y, lam):  # out: the code
    return F.mse_loss(model[1](out), x) + lam * sq.mean()


def _reconstruction_loss(model, out, sq, x, y, lam):  # out: the reconstruction
    return F.mse_loss(out, x) + lam * sq.mean()


def _classifier_loss(model, out, sq, x, y, lam):  # out: the logits
    return F.cross_entropy(out, y) + lam * sq.mean()


TASKS = {
    "contractive": Task("contractive", "contractive autoencoder: reconstruction MSE + lam * ||d code / d x||_F^2 "
                        "(the encoder's Jacobian)", "test MSE",
                        lambda args, n: _autoencoder(args, n), _contractive_loss),
    "reconstruction": Task("reconstruction", "autoencoder: reconstruction MSE + lam * ||d x_hat / d x||_F^2 (the whole "
                           "network's Jacobian)", "test MSE",
                           lambda args, n: (lambda m: (m, m))(_autoencoder(args, n)[0]), _reconstruction_loss),
    "classifier": Task("classifier", "classifier: cross-entropy + lam * ||d logits / d x||_F^2", "test acc",
                       _classifier, _classifier_loss),
}


def train_once(name, method, task, args, data):
    """Train one model; per-epoch test metric, loss and mean ||J||^2, and the mean time per step."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model, penalized = task.build(args, x_train.shape[1])
    model.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    steps, step_time, total_steps = 0, 0.0, 0
    curves = {"metric": [], "loss": [], "penalty": []}

    def evaluate():
        with torch.no_grad():
            out, sq = jacobian_frobenius(penalized, x_test)
            loss = task.loss(model, out, sq, x_test, y_test, args.lam)
            if task.name == "classifier":
                metric = (out.argmax(1) == y_test).float().mean()
            else:
                metric = F.mse_loss(model(x_test), x_test)
        curves["metric"].append(metric.item())
        curves["loss"].append(loss.item())
        curves["penalty"].append(sq.mean().item())

    evaluate()
    for _ in _progress(range(args.epochs), f"{name:>10}", args.epochs):
        perm = torch.randperm(len(x_train), generator=order).to(args.device)
        for start in range(0, len(x_train), args.batch):
            batch = perm[start:start + args.batch]
            started = time.perf_counter()
            out, sq = jacobian_frobenius(penalized, x_train[batch], method=method)
            loss = task.loss(model, out, sq, x_train[batch], y_train[batch], args.lam)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if total_steps >= WARMUP_STEPS:  # the first steps pay one-time costs: not timed
                step_time += time.perf_counter() - started
                steps += 1
            total_steps += 1
        evaluate()
    return {"metric": curves["metric"][-1], "loss": curves["loss"][-1], "penalty": curves["penalty"][-1],
            "ms_per_step": 1e3 * step_time / max(steps, 1), "curves": curves}


def load_data(args):
    """(x_train, y_train, x_test, y_test, name): the bundled digits, or MNIST from --data."""
    if args.data is None:
        return (*load_digits(seed=args.seed, device=args.device), "digits")
    x_train, y_train, x_test, y_test = load_mnist(args.data)
    if args.train_samples:
        x_train, y_train = x_train[:args.train_samples], y_train[:args.train_samples]
    def scale(images):
        return (images.float() / 255).to(args.device)
    return scale(x_train), y_train.to(args.device), scale(x_test), y_test.to(args.device), "MNIST"


def _pyplot(what):
    """matplotlib.pyplot on a file-only backend, or None (said) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no {what} written; pip install matplotlib)")
        return None
    return plt


def plot_demo(rows, task, args, path):
    """The task's test metric and mean ||J||^2 per epoch for both runs, and the time per step."""
    plt = _pyplot("plot")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in rows.items():
        epochs = range(len(r["curves"]["metric"]))
        style = "o-" if name == "jacext" else "x--"
        axes[0].plot(epochs, r["curves"]["metric"], style, label=name)
        axes[1].plot(epochs, r["curves"]["penalty"], style, label=name)
    axes[0].set(xlabel="epoch", ylabel=task.metric, title=task.metric,
                yscale="linear" if task.name == "classifier" else "log")
    axes[1].set(xlabel="epoch", ylabel="mean ||J||_F^2 (test)", title="Jacobian penalty", yscale="log")
    names = list(rows)
    bars = axes[2].bar(names, [rows[n]["ms_per_step"] for n in names], color=["tab:blue", "tab:orange"])
    axes[2].bar_label(bars, fmt="%.2f ms")
    axes[2].set_ylim(top=1.15 * max(rows[n]["ms_per_step"] for n in names))  # room for the labels
    speedup = rows["torch.func"]["ms_per_step"] / rows["jacext"]["ms_per_step"]
    axes[2].set(ylabel="ms per training step", title=f"time per step: jacext {speedup:.1f}x faster")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(f"{task.description}\n{args.widths}, batch {args.batch}, lam {args.lam}, {args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def _widths(seq):
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def _describe(model, task):
    if task.name == "classifier":
        return f"MLP {_widths(model)}"
    return f"encoder {_widths(model[0])} + decoder {_widths(model[1])}"


def demo(args):
    *data, name = load_data(args)
    task = TASKS[args.task]
    model, penalized = task.build(args, data[0].shape[1])
    args.widths = _describe(model, task)
    print(f"{name}: {len(data[0])} train / {len(data[2])} test; {task.description}; {args.widths} "
          f"({args.activation}), lam = {args.lam}, {args.epochs} epochs of batch {args.batch} on {args.device}")
    rows = {"jacext": train_once("jacext", args.method, task, args, data),
            "torch.func": train_once("torch.func", "autograd", task, args, data)}
    print(f"\n{'':12}{task.metric:>10}{'loss':>12}{'mean ||J||^2':>14}{'ms/step':>10}")
    for name, r in rows.items():
        print(f"{name:12}{r['metric']:10.4g}{r['loss']:12.6g}{r['penalty']:14.6g}{r['ms_per_step']:10.2f}")
    ratio = rows["torch.func"]["ms_per_step"] / rows["jacext"]["ms_per_step"]
    if ratio >= 1.05:
        verdict = f"{ratio:.2f}x faster than"
    elif ratio <= 1 / 1.05:
        verdict = f"{1 / ratio:.2f}x slower than"
    else:
        verdict = f"on par ({ratio:.2f}x) with"
    agree = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(rows["jacext"]["curves"]["loss"],
                                                                   rows["torch.func"]["curves"]["loss"]))
    print(f"\njacext ({args.method}) per training step, measured in this run: {verdict} torch.func vmap(jacrev). "
          f"Both compute the same exact penalty: the two loss curves agree to {agree:.1e} (relative, largest over "
          f"the epochs).")
    if args.plot:
        plot_demo(rows, task, args, args.plot)
    if args.json:
        write_demo_json(rows, task, args, ratio)
    return rows


def write_demo_json(rows, task, args, ratio):
    """The run's times and curves as bench JSON (bench/headline.py reads README's demo row from it)."""
    import platform

    payload = {"command": args.command_line, "task": task.name, "description": task.description, "widths": args.widths,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__} ({torch.get_num_threads()} threads), {args.device}",
               "results": [{"method": name, "median_s": r["ms_per_step"] / 1e3,
                            "time_vs_jacext": r["ms_per_step"] / rows["jacext"]["ms_per_step"],
                            "metric": r["metric"], "curves": r["curves"]} for name, r in rows.items()],
               "speedup": ratio}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {args.json}")


BENCH_SCRIPTS = ("frobenius", "margin", "flows", "targetprop", "spectral", "laplacian")
EXPLAIN_QUANTITIES = ("frobenius", "spectral_norm", "margin", "laplacian", "divergence", "jacobian_diagonal")


def bench_folder():
    """bench/ beside the package: the scripts live in the source tree, not in the wheel."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if not os.path.isdir(folder):
        sys.exit("python -m jacext bench runs the scripts in the source tree's bench/ folder, which this "
                 f"installation lacks ({folder}); install from a source checkout (pip install -e .)")
    return folder


def plot_bench(outputs, path):
    """One panel per script: median time per method (log scale), grouped by case."""
    plt = _pyplot("bar chart")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(outputs), figsize=(6 * len(outputs), 4.5), squeeze=False)
    for ax, (name, results) in zip(axes[0], outputs.items()):
        groups = list(dict.fromkeys(str(r.get("case", r.get("q", ""))) for r in results))
        methods = list(dict.fromkeys(r["method"] for r in results))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            times = [next((r["median_s"] * 1e3 for r in results if r["method"] == method
                           and str(r.get("case", r.get("q", ""))) == g), float("nan")) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], times, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups,
                      rotation=30 if max(map(len, groups)) > 6 else 0, ha="right" if max(map(len, groups)) > 6 else "center")
        lowest = min(r["median_s"] * 1e3 for r in results)
        ax.set(yscale="log", ylabel="median ms (log)", title=name)
        ax.set_ylim(bottom=lowest / 3)  # every bar visibly rises from the axis
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def bench(args):
    folder = bench_folder()
    out_dir = args.out_dir or os.path.join(folder, "results")
    os.makedirs(out_dir, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    outputs = {}
    for name in args.only:
        out = os.path.join(out_dir, f"{name}_cpu{suffix}.json")
        if not args.plot_only:
            command = [sys.executable, os.path.join(folder, f"bench_{name}.py"), "--out", out]
            print(f"\n=== {' '.join(command[1:])}{' --smoke' if args.smoke else ''}", flush=True)
            subprocess.run(command + (["--smoke"] if args.smoke else []), check=True)
        elif not os.path.exists(out):
            # the everyday-widths run (bench_frobenius.py --cases P2,P5,P6 --repeats 5) stands in
            # for the full one, under its own name
            everyday = os.path.join(out_dir, "frobenius_cpu_everyday.json")
            if name == "frobenius" and not args.smoke and os.path.exists(everyday):
                out, name = everyday, "frobenius (P2, P5, P6)"
            else:
                print(f"--plot-only: no {out}, so no {name} panel (run the benchmark for one)")
                continue
        with open(out) as f:
            outputs[name] = json.load(f)["results"]
    if not outputs:
        sys.exit(f"--plot-only: none of the benchmarks' JSON files is in {out_dir}; run the benchmarks first")
    plot_bench(outputs, os.path.join(out_dir, f"bench{suffix}.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jacext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="train on digits with a Jacobian penalty: jacext vs torch.func",
                            description="Train twice on the bundled digits, with the penalty by jacext and by "
                            "torch.func vmap(jacrev); print both runs' curves and the time per step. Tasks: "
                            + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    p.add_argument("--task", default="contractive", choices=list(TASKS),
                   help="contractive (default): a contractive autoencoder; reconstruction: the whole "
                   "autoencoder's Jacobian; classifier: the classifier's input Jacobian")
    p.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="hidden widths, comma-separated (default 256 for the autoencoders' encoder and decoder, "
                   "256,256 for the classifier)")
    p.add_argument("--code", type=int, default=32, help="code width of the autoencoders (default 32)")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--lam", type=float, default=None, help="penalty weight (default 0.01; 0.05 for the contractive "
                   "autoencoder)")
    p.add_argument("--method", default="auto", choices=["auto", "reverse", "forward", "gram"])
    p.add_argument("--epochs", type=int, default=None, help="default 40 (the autoencoders), 5 (the classifier)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default 3e-3; 1e-2 for the classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="your MNIST (a folder of the IDX files or an .npz) instead of digits")
    p.add_argument("--train-samples", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--plot", default="jacext_demo.png", help="PNG path for the curves ('' for none)")
    p.add_argument("--json", default=None, help="also write the times and curves to this JSON path")
    b = commands.add_parser("bench", help="run every benchmark script; tables, JSON and a PNG bar chart")
    b.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    b.add_argument("--only", type=lambda s: s.split(","), default=list(BENCH_SCRIPTS),
                   help=f"comma-separated subset of {','.join(BENCH_SCRIPTS)}")
    b.add_argument("--out-dir", default=None, help="where the JSON and PNG go (default bench/results)")
    b.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON already there")
    e = commands.add_parser("explain", help="print the strategy jacext runs for an MLP and each candidate's cost")
    e.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], required=True,
                   help="layer widths, comma-separated, e.g. 784,1024,1000")
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--quantity", default="frobenius", choices=list(EXPLAIN_QUANTITIES),
                   help="whose plan: jacobian_frobenius (default), jacobian_spectral_norm, large_margin_loss "
                        "(margin: at the input, top_k=1, dist_norm=2, norms held constant), laplacian, "
                        "divergence or jacobian_diagonal")
    e.add_argument("--method", default="auto",
                   help="the method to explain (default auto; the choices depend on --quantity)")
    e.add_argument("--max-memory-mb", type=float, default=None,
                   help="memory budget of the op in MiB (default: a quarter of the device's memory)")
    args = parser.parse_args(argv)
    args.command_line = "python -m jacext " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        unknown = [name for name in args.only if name not in BENCH_SCRIPTS]
        if unknown:
            parser.error(f"--only: unknown {unknown}; choose from {','.join(BENCH_SCRIPTS)}")
        bench(args)
        return
    if args.command == "explain":
        if len(args.sizes) < 2 or min(args.sizes) < 1 or args.batch < 1:
            parser.error("--sizes needs at least two positive widths and --batch a positive size")
        model = MLP(args.sizes)
        budget = None if args.max_memory_mb is None else int(args.max_memory_mb * 2**20)
        try:
            print(explain(model, torch.empty(args.batch, args.sizes[0]), method=args.method, max_memory=budget,
                          quantity=args.quantity))
        except (ValueError, TypeError) as error:
            parser.error(str(error))
        return
    classifier = args.task == "classifier"
    args.lam = (0.01 if args.task != "contractive" else 0.05) if args.lam is None else args.lam
    args.epochs = (5 if classifier else 40) if args.epochs is None else args.epochs
    args.lr = (1e-2 if classifier else 3e-3) if args.lr is None else args.lr
    if args.epochs < 1 or args.batch < 1 or args.code < 1:
        parser.error("--epochs, --batch and --code must be positive")
    if args.data is None and args.epochs * -(-1348 // args.batch) <= WARMUP_STEPS:
        parser.error(f"train for more than {WARMUP_STEPS} steps: the first {WARMUP_STEPS} are not timed")
    return demo(args)


if __name__ == "__main__":
    main()
