"""A continuous normalizing flow (FFJORD-style) on 2-D data, trained with jacext's exact divergence.

The field f(x, t) is the user's own module: an MLP on torch.cat([x, t], 1), with t a conditioning
input. The flow dz/dt = f(z, t) maps the data (t = 0) to a standard normal (t = 1), and

    log p(x) = log N(z(1); 0, I) + integral_0^1 div_z f(z(t), t) dt

with the divergence over z only (t held fixed): `jacext.divergence(field, z, cond=t)`, exact, on
the fused engine (the concatenation with t is lowered; the divergence runs the fused diagonal op),
along a fixed-step RK4 solve that training differentiates through (the divergence's own gradient
is its double backward). `--estimator hutchinson` uses one Rademacher projection per step instead
(FFJORD's estimator, unbiased). `--field concatsquash` uses FFJORD's ConcatSquash layers instead,
`(W h + b) * sigmoid(A t + a) + C t`: t enters every layer as a per-sample gate and bias, which the
engine carries too. At the end: the mean log-likelihood of held-out points, and a PNG of the data
beside the learned density.

    python examples/cnf_density.py --out bench/results/cnf_density.png
                                                # 600 steps, two minutes or less on 2 cores: held-out
                                                # NLL 1.45 nats (a fitted Gaussian: 2.80)
    python examples/cnf_density.py --quick      # tiny sizes, seconds (the tests run it)
    python examples/cnf_density.py --field concatsquash
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

import jacext


class Field(nn.Module):
    """f(x, t) = MLP(cat([x, t])): tanh hidden layers, a linear output."""

    def __init__(self, dim=2, width=64, depth=2):
        super().__init__()
        layers, n = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(n, width), nn.Tanh()]
            n = width
        self.net = nn.Sequential(*layers, nn.Linear(n, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t], 1))


class ConcatSquashLinear(nn.Module):
    """FFJORD's layers.diffeq_layers.ConcatSquashLinear (t a (B, 1) tensor here)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(-1, 1))) + self._hyper_bias(t.view(-1, 1))


class SquashField(nn.Module):
    """f(x, t) of ConcatSquash layers, tanh between them (FFJORD's "concatsquash" ODEnet)."""

    def __init__(self, dim=2, width=64, depth=2):
        super().__init__()
        widths = [dim] + [width] * depth + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x, t):
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


FIELDS = {"concat": Field, "concatsquash": SquashField}


def two_moons(n, generator, noise=0.08):
    """n points of the two-moons set (generated, no download)."""
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
    return points + noise * torch.randn(n, 2, generator=generator)


def log_likelihood(field, x, steps, estimator="exact", generator=None):
    """log p(x) (B,) by RK4 on [0, 1] with `steps` steps, the divergence integrated beside z."""
    def rates(z, t):
        tt = torch.full((z.shape[0], 1), t, dtype=z.dtype)
        if estimator == "exact":
            return jacext.divergence(field, z, cond=tt)
        return jacext.divergence(field, z, cond=tt, method="hutchinson", n_proj=1, generator=generator)

    z, integral, h = x, x.new_zeros(x.shape[0]), 1.0 / steps
    for k in range(steps):
        t = k * h
        f1, d1 = rates(z, t)
        f2, d2 = rates(z + 0.5 * h * f1, t + 0.5 * h)
        f3, d3 = rates(z + 0.5 * h * f2, t + 0.5 * h)
        f4, d4 = rates(z + h * f3, t + h)
        z = z + h / 6 * (f1 + 2 * f2 + 2 * f3 + f4)
        integral = integral + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    base = -0.5 * z.square().sum(1) - z.shape[1] / 2 * math.log(2 * math.pi)
    return base + integral


def plot(field, data, args, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG written)")
        return
    n, lim = args.grid, 2.8
    axis = torch.linspace(-lim, lim, n)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        density = torch.cat([log_likelihood(field, chunk, args.ode_steps).exp() for chunk in grid.split(4096)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    axes[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.4)
    axes[0].set(title="data (two moons)", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    axes[1].imshow(density.reshape(n, n).t().numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
    axes[1].set(title="learned density (jacext.divergence, exact)", aspect="equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--ode-steps", type=int, default=4, help="RK4 steps on [0, 1]")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--estimator", choices=("exact", "hutchinson"), default="exact")
    parser.add_argument("--field", choices=tuple(FIELDS), default="concat",
                        help="cat([x, t]) at the input, or ConcatSquash layers")
    parser.add_argument("--grid", type=int, default=120, help="density plot resolution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="cnf_density.png", help="PNG path ('' for none)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.width, args.ode_steps, args.grid = 8, 32, 16, 2, 24

    torch.manual_seed(args.seed)
    points = torch.Generator().manual_seed(args.seed + 1)
    field = FIELDS[args.field](width=args.width)
    optimizer = torch.optim.Adam(field.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps, eta_min=args.lr / 20)
    held_out = two_moons(2048 if not args.quick else 64, torch.Generator().manual_seed(args.seed + 2))
    try:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, desc="training", disable=not sys.stderr.isatty())
    except ImportError:
        progress = None
    started = time.perf_counter()
    for step in range(args.steps):
        loss = -log_likelihood(field, two_moons(args.batch, points), args.ode_steps, args.estimator, points).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(nll=f"{loss.item():.3f}")
        elif step % max(args.steps // 10, 1) == 0:
            print(f"step {step:4d}: negative log-likelihood {loss.item():.3f}", flush=True)
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        nll = -log_likelihood(field, held_out, args.ode_steps).mean().item()
    # a standard normal fitted to the data by its own mean and covariance: the baseline to beat
    centered = held_out - held_out.mean(0)
    cov = centered.t() @ centered / len(held_out)
    gaussian = -torch.distributions.MultivariateNormal(held_out.mean(0), cov).log_prob(held_out).mean().item()
    summary = (f"held-out negative log-likelihood {nll:.3f} nats (a Gaussian fitted to the data: {gaussian:.3f});\n"
               f"{args.steps} steps in {seconds:.1f} s ({args.estimator} divergence)")
    print(summary.replace("\n", " "))
    if args.out:
        plot(field, held_out, args, args.out, summary)
    return nll, gaussian


if __name__ == "__main__":
    main()
