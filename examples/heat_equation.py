"""A physics-informed net for the heat equation on (x, t), trained with jacext.laplacian(wrt=[0]).

    u_t = u_xx on x in [0, 1], t in [0, T],   u(x, 0) = sin(pi x),   u(0, t) = u(1, t) = 0

whose solution is u = exp(-pi^2 t) sin(pi x). The net takes (x, t) and the residual needs u_xx
only (not u_xx + u_tt) beside u_t: `jacext.laplacian(model, xt, wrt=[0], return_gradient=True)`
returns the second derivative over the chosen feature x and the gradient over both features, from
one fused op. The same training (same initialization, same points) runs beside it with the
autograd code PINNs use (one autograd.grad(create_graph=True) for the gradient, one more for
u_xx). Per epoch: the relative L2 error of both against the exact solution on a grid; at the end,
the time per step of each and a PNG (the solution, its error, the loss curves).

    python examples/heat_equation.py              # a minute or two on 2 cores; ends below 1e-2
    python examples/heat_equation.py --quick      # tiny sizes, seconds (the tests run it)
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


def exact_solution(xt):
    return torch.exp(-math.pi ** 2 * xt[:, 1]) * torch.sin(math.pi * xt[:, 0])


def residual(model, method, xt):
    """u_t - u_xx at the points xt (B, 2)."""
    if method == "jacext":
        _, grad, u_xx = jacext.laplacian(model, xt, return_gradient=True, wrt=[0])
        return grad[:, 0, 1] - u_xx[:, 0]
    xt = xt.requires_grad_()
    u = model(xt)
    (grad,) = torch.autograd.grad(u.sum(), xt, create_graph=True)
    (second,) = torch.autograd.grad(grad[:, 0].sum(), xt, create_graph=True)
    return grad[:, 1] - second[:, 0]


def boundary_and_initial(n, t_end, generator):
    """n points on x = 0 or x = 1 (u = 0) and n on t = 0 (u = sin(pi x)), with their values."""
    t = torch.rand(n, generator=generator) * t_end
    side = torch.randint(0, 2, (n,), generator=generator).float()
    x0 = torch.rand(n, generator=generator)
    points = torch.cat([torch.stack([side, t], 1), torch.stack([x0, torch.zeros(n)], 1)])
    return points, torch.cat([torch.zeros(n), torch.sin(math.pi * x0)])


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

    def epoch(self, grid, progress):
        scale = torch.tensor([1.0, self.args.t_end])
        for _ in range(self.args.steps):
            interior = torch.rand(self.args.interior, 2, generator=self.points) * scale
            edge, values = boundary_and_initial(self.args.boundary, self.args.t_end, self.points)
            started = time.perf_counter()
            pde = residual(self.model, self.method, interior).square().mean()
            fit = (self.model(edge)[:, 0] - values).square().mean()
            loss = pde + self.args.boundary_weight * fit
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            if self.steps_done >= WARMUP_STEPS:
                self.step_time += time.perf_counter() - started
                self.timed_steps += 1
            self.steps_done += 1
            self.losses.append(loss.item())
            progress.update(1)
        self.errors.append(relative_error(self.model, grid))

    @property
    def ms_per_step(self):
        return 1e3 * self.step_time / max(self.timed_steps, 1)


def plot(run, other, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG written)")
        return
    n = args.grid
    xs, ts = torch.linspace(0, 1, n), torch.linspace(0, args.t_end, n)
    grid = torch.cartesian_prod(xs, ts)
    with torch.no_grad():
        u = run.model(grid)[:, 0].reshape(n, n)
    error = (u - exact_solution(grid).reshape(n, n)).abs()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    extent = (0, args.t_end, 0, 1)
    for ax, field, title in [(axes[0], u, "u(x, t) (jacext PINN)"), (axes[1], error, "|u - u_exact|")]:
        image = ax.imshow(field.numpy(), origin="lower", extent=extent, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set(title=title, xlabel="t", ylabel="x")
    for r, label in [(run, f"jacext.laplacian(wrt=[0]) ({run.ms_per_step:.1f} ms/step)"),
                     (other, f"autograd ({other.ms_per_step:.1f} ms/step)")]:
        axes[2].plot(r.losses, label=label, alpha=0.8)
    axes[2].set(yscale="log", xlabel="step", ylabel="loss", title="training loss")
    axes[2].legend()
    fig.suptitle(f"u_t = u_xx, u(x, 0) = sin(pi x): relative L2 error {run.errors[-1]:.2e} (jacext), "
                 f"{other.errors[-1]:.2e} (autograd)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total, quiet):
    if quiet:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="step", leave=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250, help="Adam steps per epoch (fresh points each step)")
    parser.add_argument("--interior", type=int, default=1024, help="interior collocation points per step")
    parser.add_argument("--boundary", type=int, default=256, help="boundary and initial points per step, each")
    parser.add_argument("--boundary-weight", type=float, default=10.0)
    parser.add_argument("--t-end", type=float, default=0.5, help="the time interval [0, T]")
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--grid", type=int, default=101, help="evaluation grid points per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="heat_equation.png", help="PNG path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs (the tests)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps, args.interior, args.boundary, args.width, args.grid = 2, 8, 64, 32, 8, 11

    xs, ts = torch.linspace(0, 1, args.grid), torch.linspace(0, args.t_end, args.grid)
    grid = torch.cartesian_prod(xs, ts)
    runs = {method: Run(method, args) for method in ("jacext", "autograd")}
    print(f"tanh MLP {[2] + [args.width] * args.depth + [1]} on (x, t), {args.interior} interior + "
          f"{2 * args.boundary} boundary/initial points per step, {args.steps} Adam steps per epoch, "
          f"{torch.get_num_threads()} threads")
    print(f"{'epoch':>5} {'relative L2 error (jacext)':>27} {'(autograd)':>11}")
    progress = progress_bar(2 * args.epochs * args.steps, args.quick)
    for epoch in range(1, args.epochs + 1):
        for run in runs.values():
            run.epoch(grid, progress)
        print(f"{epoch:5d} {runs['jacext'].errors[-1]:27.3e} {runs['autograd'].errors[-1]:11.3e}", flush=True)
    progress.close()
    jac, loop = runs["jacext"], runs["autograd"]
    print(f"\ntime per step (forward + backward + Adam): jacext.laplacian(wrt=[0]) {jac.ms_per_step:.2f} ms, "
          f"autograd {loop.ms_per_step:.2f} ms ({loop.ms_per_step / jac.ms_per_step:.1f}x)")
    plot(jac, loop, args, args.out)
    reached = jac.errors[-1] < TARGET_ERROR
    print(f"final relative L2 error {jac.errors[-1]:.2e}: " + ("below" if reached else "NOT below") + f" {TARGET_ERROR:g}")
    return 0 if reached or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
