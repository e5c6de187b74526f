"""Command line.

    python -m jacext demo      train a digits MLP with a Jacobian penalty twice, with jacext and
                               with torch.func; print accuracy, penalty and time per step
    python -m jacext explain --sizes 784,1024,1000 --batch 64
                               the strategy jacext runs and each candidate's cost
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import MLP, explain, jacobian_frobenius
from .data import load_digits

WARMUP_STEPS = 3


def _progress(iterable, description, total):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, total=total, leave=False, file=sys.stderr)


def train_once(name, method, args, data):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = MLP([x_train.shape[1], *args.hidden, 10], activation=args.activation).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    steps, step_time, total_steps = 0, 0.0, 0
    n_batches = (len(x_train) + args.batch - 1) // args.batch
    for _ in _progress(range(args.epochs), f"{name:>10}", args.epochs):
        perm = torch.randperm(len(x_train), generator=order).to(args.device)
        for start in range(0, len(x_train), args.batch):
            batch = perm[start:start + args.batch]
            started = time.perf_counter()
            logits, sq = jacobian_frobenius(model, x_train[batch], method=method)
            loss = F.cross_entropy(logits, y_train[batch]) + args.lam * sq.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if total_steps >= WARMUP_STEPS:  # the first steps pay one-time costs: not timed
                step_time += time.perf_counter() - started
                steps += 1
            total_steps += 1
    assert total_steps == args.epochs * n_batches
    with torch.no_grad():
        logits, sq = jacobian_frobenius(model, x_test)
    accuracy = (logits.argmax(1) == y_test).float().mean().item()
    return {"accuracy": accuracy, "penalty": sq.mean().item(), "ms_per_step": 1e3 * step_time / max(steps, 1)}


def demo(args):
    data = load_digits(seed=args.seed, device=args.device)
    print(f"digits: {len(data[0])} train / {len(data[2])} test, MLP {[64, *args.hidden, 10]} "
          f"({args.activation}), loss = cross-entropy + {args.lam} * mean ||J||_F^2, "
          f"{args.epochs} epochs of batch {args.batch} on {args.device}")
    rows = {"jacext": train_once("jacext", args.method, args, data),
            "torch.func": train_once("torch.func", "autograd", args, data)}
    print(f"\n{'':12}{'test acc':>10}{'mean ||J||^2':>14}{'ms/step':>10}")
    for name, r in rows.items():
        print(f"{name:12}{r['accuracy']:10.3f}{r['penalty']:14.4f}{r['ms_per_step']:10.2f}")
    ratio = rows["torch.func"]["ms_per_step"] / rows["jacext"]["ms_per_step"]
    if ratio >= 1.05:
        verdict = f"{ratio:.2f}x faster than"
    elif ratio <= 1 / 1.05:
        verdict = f"{1 / ratio:.2f}x slower than"
    else:
        verdict = f"on par ({ratio:.2f}x) with"
    print(f"\njacext ({args.method}) per training step: {verdict} torch.func vmap(jacrev) here. Both "
          f"compute the same exact penalty (the accuracy and penalty columns agree).")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jacext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="train on digits with the penalty: jacext vs torch.func")
    p.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")], default=[256, 256],
                   help="hidden widths, comma-separated (default 256,256)")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--lam", type=float, default=0.01, help="penalty weight")
    p.add_argument("--method", default="auto", choices=["auto", "reverse", "forward"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = commands.add_parser("explain", help="print the strategy jacext runs for an MLP and each candidate's cost")
    e.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], required=True,
                   help="layer widths, comma-separated, e.g. 784,1024,1000")
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--method", default="auto", choices=["auto", "reverse", "forward", "gram"])
    e.add_argument("--max-memory-mb", type=float, default=None,
                   help="memory budget of the op in MiB (default: a quarter of the device's memory)")
    args = parser.parse_args(argv)
    if args.command == "explain":
        if len(args.sizes) < 2 or min(args.sizes) < 1 or args.batch < 1:
            parser.error("--sizes needs at least two positive widths and --batch a positive size")
        model = MLP(args.sizes)
        budget = None if args.max_memory_mb is None else int(args.max_memory_mb * 2**20)
        print(explain(model, torch.empty(args.batch, args.sizes[0]), method=args.method, max_memory=budget))
        return
    if args.epochs < 1 or args.batch < 1:
        parser.error("--epochs and --batch must be positive")
    if args.epochs * -(-1348 // args.batch) <= WARMUP_STEPS:
        parser.error(f"train for more than {WARMUP_STEPS} steps: the first {WARMUP_STEPS} are not timed")
    demo(args)


if __name__ == "__main__":
    main()
