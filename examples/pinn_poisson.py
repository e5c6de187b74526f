"""A physics-informed net for the Poisson equation, trained with jacext.laplacian.

    -Delta u = f on [0, 1]^2,   f = 2 pi^2 sin(pi x) sin(pi y),   u = sin(pi x) sin(pi y) on the boundary

whose solution is u = sin(pi x) sin(pi y). A tanh MLP u_theta is trained on the residual
mean (Delta u_theta + f)^2 at random interior points plus a boundary term, the Laplacian from one
fused jacext op per step; the same training (same initialization, same points) runs beside it with
the Laplacian from the autograd loop PINN codes use (one autograd.grad(create_graph=True) per
input dimension, twice). Per epoch: the relative L2 error of both against the exact solution on a
grid; at the end, the time per step of each, and a PNG (solution, error, loss curves).

    python examples/pinn_poisson.py              # about a minute on 2 cores; ends below 1e-2
    python examples/pinn_poisson.py --quick      # tiny sizes, seconds (the tests run it)
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import jacext

TARGET_ERROR = 1e-2
WARMUP_STEPS = 5  # the first steps pay one-time costs: not timed


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
    """The usual PINN code: d^2 u / dx_j^2 by two autograd.grad calls per input dimension."""
    points = points.requires_grad_()
    u = model(points)
    (grad,) = torch.autograd.grad(u.sum(), points, create_graph=True)
    lap = sum(torch.autograd.grad(grad[:, j].sum(), points, create_graph=True)[0][:, j] for j in range(points.shape[1]))
    return u, lap.unsqueeze(1)


def loss_terms(model, method, interior, boundary):
    if method == "jacext":
        _, lap = jacext.laplacian(model, interior)
    else:
        _, lap = laplacian_autograd(model, interior)
    residual = lap[:, 0] + source(interior)
    boundary_error = model(boundary)[:, 0] - exact_solution(boundary)
    return residual.square().mean(), boundary_error.square().mean()


def relative_error(model, grid):
    with torch.no_grad():
        u, u_exact = model(grid)[:, 0], exact_solution(grid)
    return ((u - u_exact).norm() / u_exact.norm()).item()


class Run:
    """One training: model, optimizer, schedule and its own stream of collocation points."""

    def __init__(self, method, args):
        torch.manual_seed(args.seed)
        self.method, self.args = method, args
        self.model = jacext.MLP([2] + [args.width] * args.depth + [1], activation="tanh")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        total = args.epochs * args.steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 5 % of the rate
            self.optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        self.points = torch.Generator().manual_seed(args.seed + 1)
        self.losses, self.errors, self.step_time, self.timed_steps, self.steps_done = [], [], 0.0, 0, 0

    def epoch(self, grid):
        for _ in range(self.args.steps):
            interior = torch.rand(self.args.interior, 2, generator=self.points)
            boundary = boundary_points(self.args.boundary, self.points)
            started = time.perf_counter()
            pde, bc = loss_terms(self.model, self.method, interior, boundary)
            loss = pde + self.args.boundary_weight * bc
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            if self.steps_done >= WARMUP_STEPS:
                self.step_time += time.perf_counter() - started
                self.timed_steps += 1
            self.steps_done += 1
            self.losses.append(loss.item())
        self.errors.append(relative_error(self.model, grid))

    @property
    def ms_per_step(self):
        return 1e3 * self.step_time / max(self.timed_steps, 1)


def plot(run, other, grid_n, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG written)")
        return
    side = torch.linspace(0, 1, grid_n)
    xx, yy = torch.meshgrid(side, side, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        u = run.model(grid)[:, 0].reshape(grid_n, grid_n)
    error = (u - exact_solution(grid).reshape(grid_n, grid_n)).abs()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, field, title in [(axes[0], u, "u (jacext PINN)"), (axes[1], error, "|u - u_exact|")]:
        image = ax.imshow(field.T.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set(title=title, xlabel="x", ylabel="y")
    for r, label in [(run, f"jacext.laplacian ({run.ms_per_step:.1f} ms/step)"),
                     (other, f"autograd loop ({other.ms_per_step:.1f} ms/step)")]:
        axes[2].plot(r.losses, label=label, alpha=0.8)
    axes[2].set(yscale="log", xlabel="step", ylabel="loss", title="training loss")
    axes[2].legend()
    fig.suptitle(f"-Delta u = 2 pi^2 sin(pi x) sin(pi y): relative L2 error {run.errors[-1]:.2e} (jacext), "
                 f"{other.errors[-1]:.2e} (autograd loop)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=250, help="Adam steps per epoch (fresh points each step)")
    parser.add_argument("--interior", type=int, default=1024, help="interior collocation points per step")
    parser.add_argument("--boundary", type=int, default=256, help="boundary points per step")
    parser.add_argument("--boundary-weight", type=float, default=100.0)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--grid", type=int, default=101, help="evaluation grid points per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="pinn_poisson.png", help="PNG path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs (the tests)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps, args.interior, args.boundary, args.width, args.grid = 2, 8, 64, 32, 8, 11

    side = torch.linspace(0, 1, args.grid)
    grid = torch.cartesian_prod(side, side)
    runs = {method: Run(method, args) for method in ("jacext", "autograd")}
    print(f"tanh MLP {[2] + [args.width] * args.depth + [1]}, {args.interior} interior + {args.boundary} boundary "
          f"points per step, {args.steps} Adam steps per epoch, {torch.get_num_threads()} threads")
    print(f"{'epoch':>5} {'relative L2 error (jacext)':>27} {'(autograd loop)':>16}")
    for epoch in range(1, args.epochs + 1):
        for run in runs.values():
            run.epoch(grid)
        print(f"{epoch:5d} {runs['jacext'].errors[-1]:27.3e} {runs['autograd'].errors[-1]:16.3e}", flush=True)
    jac, loop = runs["jacext"], runs["autograd"]
    print(f"\ntime per step (forward + backward + Adam): jacext.laplacian {jac.ms_per_step:.2f} ms, "
          f"autograd loop {loop.ms_per_step:.2f} ms ({loop.ms_per_step / jac.ms_per_step:.1f}x)")
    plot(jac, loop, args.grid, args.out)
    reached = jac.errors[-1] < TARGET_ERROR
    print(f"final relative L2 error {jac.errors[-1]:.2e}: " + ("below" if reached else "NOT below") + f" {TARGET_ERROR:g}")
    return 0 if reached or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
