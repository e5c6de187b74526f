"""Large-margin training (Elsayed et al. 2018) on the digits: the loss as one differentiable call.

    python examples/large_margin_digits.py [--epochs 20] [--layers 0,1,2] [--gamma 2.0]
                                           [--top-k 1] [--dist-norm inf] [--exact]

By default it runs the paper's own MNIST settings (google-research/large_margin): top_k=1 (the
nearest other class), dist_norm=inf (distances in the max-norm, so the gradient norms are l1),
use_approximation=True (the gradient norms held constant: no second derivative), margins at the
input and at both hidden layers (layers 0, 1, 2). --exact lets the norms' own gradient flow (a
double backward). The usual PyTorch port of the paper loops over samples and classes with
backward(retain_graph=True) and reads x.grad.data, which cuts the graph: the margin term then trains
nothing. Here train() is a drop-in epoch loop whose criterion is jacext.LargeMarginLoss. It trains
one MLP with it and one with cross-entropy, and prints per epoch the test accuracy and the mean
input-space margin: the distance of each test sample to its nearest decision boundary,
min_j (z_y - z_j) / ||grad_x (z_y - z_j)||_2 (negative if misclassified).
"""
import argparse
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

import jacext
from jacext.data import load_digits


def train(model, optimizer, criterion, x, y, batch_size=64):
    """One epoch; criterion(model, x, y) -> scalar loss. Returns the mean loss."""
    total = 0.0
    order = torch.randperm(len(x))
    for batch in order.split(batch_size):
        loss = criterion(model, x[batch], y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(x)


def evaluate(model, x, y):
    """(test accuracy, mean input-space margin on the logits)."""
    logits, dist = jacext.margin_distances(model, x, y, layers=(0,), on="logits")
    margin = dist[:, 0].min(1).values  # the nearest boundary; inf at the sample's own class is never it
    return (logits.argmax(1) == y).float().mean().item(), margin.mean().item()


def cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--layers", default="0,1,2", help="layers where the margin is enforced")
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=1, help="classes per sample (the paper's: 1)")
    parser.add_argument("--dist-norm", default="inf", choices=["1", "2", "inf"],
                        help="the distance's norm (the paper's: inf)")
    parser.add_argument("--exact", action="store_true",
                        help="differentiate the gradient norms too (the paper holds them constant)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load_digits()
    margin_loss = jacext.LargeMarginLoss(layers=[int(l) for l in args.layers.split(",")], gamma=args.gamma,
                                         top_k=args.top_k, dist_norm=math.inf if args.dist_norm == "inf" else
                                         int(args.dist_norm), use_approximation=not args.exact)
    paper = args.top_k == 1 and args.dist_norm == "inf" and not args.exact and args.layers == "0,1,2"
    print(f"digits: {len(x_train)} train / {len(x_test)} test, MLP [64, 128, 128, 10] (tanh); {margin_loss}\n"
          f"{'the paper' if paper else 'not the paper'}'s MNIST settings: top_k=1, dist_norm=inf, "
          f"use_approximation=True, layers 0, 1, 2")
    for name, criterion in (("large margin", margin_loss), ("cross-entropy", cross_entropy)):
        torch.manual_seed(args.seed)
        model = jacext.MLP([64, 128, 128, 10], activation="tanh")
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        print(f"\n{name}:\n{'epoch':>5} {'train loss':>11} {'test acc':>9} {'mean margin':>12}")
        for epoch in tqdm(range(1, args.epochs + 1), desc=name, leave=False, disable=None):  # no bar off a TTY
            loss = train(model, optimizer, criterion, x_train, y_train)
            accuracy, margin = evaluate(model, x_test, y_test)
            tqdm.write(f"{epoch:5} {loss:11.4f} {accuracy:9.3f} {margin:12.4f}")


if __name__ == "__main__":
    main()
