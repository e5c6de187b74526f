"""Train an MLP normalizing flow by maximum likelihood with the relative gradient (Gresele et al.
2020), printing the held-out log-likelihood per epoch like the seed notebook.

    python examples/train_flow.py                         # bundled digits (64 dims), 2 layers
    python examples/train_flow.py --data ~/mnist --epochs 100 --lr 1e-4   # your MNIST (IDX folder or .npz)
    python examples/train_flow.py --gradient autodiff     # the ordinary gradient, for comparison

Data are dequantized and logit-transformed (jacext.data.logit_transform, lambda = 1e-6), as in
the paper; log-likelihoods are per sample in nats, in logit space (add the transform's log-det,
printed too, for the density of the dequantized pixels in [0, 1]^D). No data set is downloaded.
"""
import argparse
import time

import torch
from tqdm import tqdm

from jacext.data import load_digits_flow, load_mnist, logit_transform
from jacext.flows import MLPFlow


def load(args):
    """(x_train, x_test, the logit transform's log-det per test sample or None for the digits)."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.data is None:
        x_train, x_test = load_digits_flow(seed=args.seed, dtype=torch.float64)
        transform_logdet = None
    else:
        images_train, _, images_test, _ = load_mnist(args.data)
        x_train, _ = logit_transform(images_train, levels=256, generator=generator)
        x_test, transform_logdet = logit_transform(images_test, levels=256, generator=generator)
    dtype = torch.float64 if args.float64 else torch.float32
    return x_train.to(dtype), x_test.to(dtype), transform_logdet


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="MNIST: a folder of the four IDX files or an .npz")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.3, help="smooth_leaky_relu's slope for y -> -inf")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gradient", choices=["relative", "autodiff"], default="relative")
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x_train, x_test, transform_logdet = load(args)
    x_train, x_test = x_train.to(args.device), x_test.to(args.device)
    torch.manual_seed(args.seed)
    flow = MLPFlow(x_train.shape[1], args.layers, alpha=args.alpha).to(args.device, x_train.dtype)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    relative = args.gradient == "relative"
    print(f"{len(x_train)} training and {len(x_test)} test samples of dimension {x_train.shape[1]}; "
          f"{args.layers}-layer flow; {args.gradient} gradient, Adam lr {args.lr}, batch {args.batch}")

    def test_log_likelihood():
        with torch.no_grad():
            return torch.cat([flow.log_prob(chunk) for chunk in x_test.split(1000)]).mean().item()

    print(f"epoch   0: test log-likelihood {test_log_likelihood():10.2f}")
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(x_train), device=args.device)
        bar = tqdm(order.split(args.batch), desc=f"epoch {epoch}", leave=False)
        for step, batch in enumerate(bar):
            optimizer.zero_grad()
            # logdet_value=False: skip the O(D^3) determinant in the value; the gradient has its term
            loss = flow.nll(x_train[batch], relative_gradient=relative, logdet_value=not relative)
            loss.backward()
            optimizer.step()
            if step % 100 == 0:  # the relative run's value leaves out -sum log|det W_k|
                bar.set_postfix({"batch nll" + (" w/o log|det W|" if relative else ""): f"{loss.item():.1f}"})
        seconds = time.perf_counter() - start
        ll = test_log_likelihood()
        extra = "" if transform_logdet is None else \
            f" ({ll + transform_logdet.mean().item():.2f} for the pixels in [0, 1])"
        print(f"epoch {epoch:3d}: test log-likelihood {ll:10.2f}{extra}   ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
