"""A residual physics-informed net for the Poisson equation, trained with jacext.laplacian.

    -Delta u = f on [0, 1]^2,   f = 2 pi^2 sin(pi x) sin(pi y),   u = sin(pi x) sin(pi y) on the boundary

whose solution is u = sin(pi x) sin(pi y). The net is the user's own nn.Module, a ResNet-style MLP:
2 -> 64, three blocks h + tanh(W h + b) of width 64, -> 1. jacext reads the blocks' skips and runs
them on its fused forward Laplacian (each block's end adds the carry [h; dh/dx; Delta h] that
entered it), so the loss mean (Delta u + f)^2 at random interior points plus a boundary term takes
one fused op per step, exact, with its backward. Before training the script checks the Laplacian
against the autograd loop PINN codes use; per epoch it prints the relative L2 error against the
exact solution on a grid, and at the end writes a PNG (solution, error, loss curve).

    python examples/residual_pinn.py              # about a minute on 2 cores; ends below 1e-2
    python examples/residual_pinn.py --quick      # tiny sizes, seconds (the tests run it)
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

import jacext


class ResidualBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


class ResidualPINN(nn.Module):
    def __init__(self, width=64, blocks=3):
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(self.blocks(torch.tanh(self.inp(x))))


def exact_solution(points):
    return torch.sin(math.pi * points[:, 0]) * torch.sin(math.pi * points[:, 1])


def source(points):
    return 2 * math.pi ** 2 * exact_solution(points)


def boundary_points(n, generator):
    """n points spread over the four sides of the unit square."""
    t = torch.rand(n, generator=generator)
    side = torch.randint(0, 4, (n,), generator=generator)
    fixed = (side % 2).float()  # sides 0, 1: x = 0 or 1; sides 2, 3: y = 0 or 1
    return torch.where((side < 2).unsqueeze(1), torch.stack([fixed, t], 1), torch.stack([t, fixed], 1))


def laplacian_autograd(model, points):
    """The usual PINN code, for the check: d^2 u / dx_j^2 by autograd.grad calls per input dimension."""
    points = points.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(points).sum(), points, create_graph=True)
    return sum(torch.autograd.grad(grad[:, j].sum(), points, retain_graph=True)[0][:, j] for j in range(2))


def relative_error(model, grid):
    with torch.no_grad():
        u, u_exact = model(grid)[:, 0], exact_solution(grid)
    return ((u - u_exact).norm() / u_exact.norm()).item()


def plot(model, losses, error, grid_n, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG written)")
        return
    side = torch.linspace(0, 1, grid_n)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        u = model(grid)[:, 0].reshape(grid_n, grid_n)
    field_error = (u - exact_solution(grid).reshape(grid_n, grid_n)).abs()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, field, title in [(axes[0], u, "u (residual PINN)"), (axes[1], field_error, "|u - u_exact|")]:
        image = ax.imshow(field.T.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set(title=title, xlabel="x", ylabel="y")
    axes[2].plot(losses)
    axes[2].set(yscale="log", xlabel="step", ylabel="loss", title="training loss (jacext.laplacian)")
    fig.suptitle(f"-Delta u = 2 pi^2 sin(pi x) sin(pi y), residual MLP: relative L2 error {error:.2e}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per epoch (fresh points each step)")
    parser.add_argument("--interior", type=int, default=512, help="interior collocation points per step")
    parser.add_argument("--boundary", type=int, default=128, help="boundary points per step")
    parser.add_argument("--boundary-weight", type=float, default=100.0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=3, help="residual blocks h + tanh(W h + b)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--grid", type=int, default=101, help="evaluation grid points per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="residual_pinn.png", help="PNG path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs (the tests)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps, args.interior, args.boundary, args.width, args.grid = 2, 8, 64, 32, 8, 11

    torch.manual_seed(args.seed)
    model = ResidualPINN(args.width, args.blocks)
    points = torch.Generator().manual_seed(args.seed + 1)
    check = torch.rand(64, 2, generator=points)
    _, lap = jacext.laplacian(model, check)
    gap = (lap[:, 0] - laplacian_autograd(model, check)).abs().max().item()
    print(f"residual MLP 2 -> {args.width}, {args.blocks} blocks h + tanh(W h + b), -> 1; "
          f"the fused Laplacian against the autograd loop: max |difference| {gap:.1e}")
    print(jacext.explain(model, check, quantity="laplacian"))

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = args.epochs * args.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 5 % of the rate
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    side = torch.linspace(0, 1, args.grid)
    grid = torch.cartesian_prod(side, side)
    losses = []
    print(f"{'epoch':>5} {'loss':>10} {'relative L2 error':>18}")
    for epoch in range(1, args.epochs + 1):
        for _ in range(args.steps):
            interior = torch.rand(args.interior, 2, generator=points)
            boundary = boundary_points(args.boundary, points)
            _, lap = jacext.laplacian(model, interior)
            pde = (lap[:, 0] + source(interior)).square().mean()
            bc = (model(boundary)[:, 0] - exact_solution(boundary)).square().mean()
            loss = pde + args.boundary_weight * bc
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        error = relative_error(model, grid)
        print(f"{epoch:5d} {losses[-1]:10.3e} {error:18.3e}", flush=True)
    plot(model, losses, error, args.grid, args.out)
    print(f"final relative L2 error {error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
