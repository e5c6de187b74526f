"""Per-sample Lipschitz penalty on the digits classifier: cross-entropy + lambda * mean_b ||J_b||_2,
with J_b = d logits / d x at sample b (its largest singular value: the local Lipschitz constant).

    python examples/lipschitz_digits.py [--epochs 20] [--lam 0.05] [--method auto]
    python examples/lipschitz_digits.py --quick      # tiny sizes, seconds (a test runs this)

Trains the same MLP without and with the penalty and prints the test accuracy and the mean
||J||_2 over the test set for each. jacext.jacobian_spectral_norm picks the exact path here (the
10 x 10 Gram J J^T); --method power runs the power iteration instead, each sample started from its
vector of the previous epoch."""
import argparse
import time

import torch
import torch.nn.functional as F

import jacext
from jacext.data import load_digits


def train(lam, args, data):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = jacext.MLP([64, *args.hidden, 10], activation="tanh")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(args.seed)
    # the power path's warm start: each training sample's top left singular vector from its last
    # visit (a zero row draws a random start)
    vectors = torch.zeros(len(x_train), 10)
    started = time.perf_counter()
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x_train), generator=order).split(args.batch):
            logits, s, vectors[batch] = jacext.jacobian_spectral_norm(  # logits == model(x)
                model, x_train[batch], method=args.method, init=vectors[batch], return_vectors=True)
            loss = F.cross_entropy(logits, y_train[batch]) + lam * s.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        logits, s = jacext.jacobian_spectral_norm(model, x_test, method="exact")
    return (logits.argmax(1) == y_test).float().mean().item(), s.mean().item(), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.05, help="weight of the mean ||J||_2 in the loss")
    parser.add_argument("--method", default="auto", choices=jacext.spectral.SPECTRAL_METHODS)
    parser.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")], default=[128, 128])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 300 training samples, hidden 32,32")
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load_digits(seed=args.seed)
    if args.quick:
        args.epochs, args.hidden = 1, [32, 32]
        x_train, y_train = x_train[:300], y_train[:300]
    print(f"digits: {len(x_train)} train / {len(x_test)} test, MLP {[64, *args.hidden, 10]} (tanh), "
          f"{args.epochs} epoch(s), method={args.method!r}")
    for lam in (0.0, args.lam):
        accuracy, lipschitz, seconds = train(lam, args, (x_train, y_train, x_test, y_test))
        print(f"lambda = {lam:<6g} test accuracy {accuracy:.3f}   mean ||J||_2 {lipschitz:8.3f}   "
              f"({seconds:.1f} s training)")


if __name__ == "__main__":
    main()
