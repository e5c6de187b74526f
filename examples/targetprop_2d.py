"""Target propagation in 2-D: a 2-layer deep linear net with rank-one 2 x 2 weights, trained by
difference target propagation with exact pseudo-inverses, drawn to one PNG.

    python examples/targetprop_2d.py [--steps 30] [--out targetprop_2d.png]

Panels: (1) input space: W1's row space and null space, the sample x; (2) hidden space: W1's
column space and left null space, W2's row space and null space, the forward activation h1 and
its target t1 at every step, and the loss as a function of h1 (contours); (3) output space: W2's
column space and left null space, h2 and t2 at every step, the loss contours around y; (4) the
loss per step. Subspaces are drawn at the start (dashed) and the end (solid): the weights start
rank-one and each local regression step moves them.
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import jacext  # noqa: E402
from jacext.targetprop import TargetPropTrainer, layer_outputs, layer_targets  # noqa: E402


def subspaces(w):
    """(column space, left null space, row space, null space) of a 2 x 2 matrix: unit vectors
    (a line each; a zero vector where the space is {0}), from the SVD."""
    u, s, vt = np.linalg.svd(w)
    rank = int((s > 1e-9 * max(s[0], 1e-300)).sum())
    zero = np.zeros(2)
    col = u[:, 0] if rank >= 1 else zero
    left_null = u[:, 1] if rank == 1 else zero
    row = vt[0] if rank >= 1 else zero
    null = vt[1] if rank == 1 else zero
    return col, left_null, row, null


def draw_line(ax, direction, style, color, label):
    if not np.any(direction):
        return
    t = np.array([-10, 10])
    ax.plot(t * direction[0], t * direction[1], style, color=color, lw=1.2, label=label)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--output-step", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="targetprop_2d.png")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    model = jacext.MLP([2, 2, 2], activation="identity", bias=False).double()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # rank-one weights u v^T
        for m in linears:
            u, v = torch.randn(2, 1, generator=g, dtype=torch.float64), torch.randn(1, 2, generator=g, dtype=torch.float64)
            m.weight.copy_(u @ v)
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([[-1.0, 1.5]], dtype=torch.float64)
    start = [m.weight.detach().numpy().copy() for m in linears]
    trainer = TargetPropTrainer(model, "dtp", "exact", lr=args.lr, output_step=args.output_step,
                                loss_fn=lambda out, tgt: 0.5 * F.mse_loss(out, tgt, reduction="sum"),
                                optimizer=torch.optim.SGD)
    h1s, h2s, t1s, t2s, losses = [], [], [], [], []
    for _ in range(args.steps):
        hs = layer_outputs(model, x)
        output = hs[2].detach().requires_grad_()
        (grad,) = torch.autograd.grad(0.5 * (output - y).square().sum(), output)
        t1, t2 = layer_targets(model, x, output.detach() - args.output_step * grad, "dtp")
        h1s.append(hs[1][0].detach().numpy()), h2s.append(hs[2][0].detach().numpy())
        t1s.append(t1[0].numpy()), t2s.append(t2[0].numpy())
        losses.append(trainer.step(x, y)["loss"])
    end = [m.weight.detach().numpy() for m in linears]

    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    colors = dict(col="tab:blue", left_null="tab:orange", row="tab:green", null="tab:red")

    def draw_subspaces(ax, which, layer, tag):
        for weights, style, when in ((start, "--", "start"), (end, "-", "end")):
            col, left_null, row, null = subspaces(weights[layer])
            parts = dict(col=col, left_null=left_null, row=row, null=null)
            for key in which:
                draw_line(ax, parts[key], style, colors[key], f"{tag} {key.replace('_', ' ')} ({when})")

    steps = np.arange(args.steps)
    ax = axes[0]
    draw_subspaces(ax, ("row", "null"), 0, "W1")
    ax.plot(*x[0].numpy(), "k*", ms=14, label="x")
    ax.set_title("input space")

    ax = axes[1]
    lim = 1.2 * max(np.abs(np.array(h1s + t1s)).max(), 1.0)
    grid = np.linspace(-lim, lim, 200)
    gx, gy = np.meshgrid(grid, grid)
    points = np.stack([gx.ravel(), gy.ravel()], 1)
    loss_h1 = 0.5 * (((points @ end[1].T) - y.numpy()) ** 2).sum(1).reshape(gx.shape)
    ax.contour(gx, gy, loss_h1, levels=15, cmap="Greys", linewidths=0.6)
    draw_subspaces(ax, ("col", "left_null"), 0, "W1")
    draw_subspaces(ax, ("row", "null"), 1, "W2")
    ax.scatter(*np.array(h1s).T, c=steps, cmap="viridis", s=18, label="h1 (forward)")
    ax.scatter(*np.array(t1s).T, c=steps, cmap="viridis", marker="x", s=24, label="t1 (target)")
    ax.set_title("hidden space (contours: loss as a function of h1, final W2)")

    ax = axes[2]
    lim = 1.2 * max(np.abs(np.array(h2s + t2s + [y[0].numpy()])).max(), 1.0)
    grid = np.linspace(-lim, lim, 200)
    gx, gy = np.meshgrid(grid, grid)
    ax.contour(gx, gy, 0.5 * ((gx - y[0, 0].item()) ** 2 + (gy - y[0, 1].item()) ** 2), levels=15,
               cmap="Greys", linewidths=0.6)
    draw_subspaces(ax, ("col", "left_null"), 1, "W2")
    ax.scatter(*np.array(h2s).T, c=steps, cmap="viridis", s=18, label="h2 (forward)")
    ax.scatter(*np.array(t2s).T, c=steps, cmap="viridis", marker="x", s=24, label="t2 (target)")
    ax.plot(*y[0].numpy(), "r*", ms=14, label="y")
    ax.set_title("output space (contours: the loss)")

    for ax, lim_src in zip(axes[:3], (None, h1s + t1s, h2s + t2s + [y[0].numpy()])):
        lim = 1.2 * max(np.abs(np.array(lim_src)).max(), 1.0) if lim_src else 2.0
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="lower left")
    axes[3].semilogy(steps, losses, "o-")
    axes[3].set_xlabel("step"), axes[3].set_ylabel("loss 0.5 ||h2 - y||^2"), axes[3].set_title("loss")
    fig.suptitle("Difference target propagation, 2-layer deep linear net, rank-one 2x2 weights at the start "
                 "(colour: step)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"loss {losses[0]:.4g} -> {losses[-1]:.4g} over {args.steps} steps; wrote {args.out}")


if __name__ == "__main__":
    main()
