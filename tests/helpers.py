"""Shared test builders: models for every activation and a loss that weights every output."""
import torch
from torch import nn

import jacext
from jacext.activations import activation_value

# (name, module factory): one per supported activation, with non-default parameters where the
# activation has any, so that the parameters are checked too.
ACTIVATIONS = [
    ("identity", nn.Identity),
    ("relu", nn.ReLU),
    ("leaky_relu", lambda: nn.LeakyReLU(0.2)),
    ("tanh", nn.Tanh),
    ("sigmoid", nn.Sigmoid),
    ("softplus", lambda: nn.Softplus(beta=1.5, threshold=2.0)),
    ("elu", lambda: nn.ELU(alpha=0.7)),
    ("gelu", nn.GELU),
    ("gelu_tanh", lambda: nn.GELU(approximate="tanh")),
    ("silu", nn.SiLU),
    ("smooth_leaky_relu", lambda: jacext.SmoothLeakyReLU(0.3)),
]
ACTIVATION_IDS = [name for name, _ in ACTIVATIONS]


def make_mlp(widths, activation, bias=True, output_activation=None, dtype=torch.float64,
             device="cpu", seed=0):
    """nn.Sequential with `activation()` after every hidden Linear."""
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias if isinstance(bias, bool) else bias[i]))
        if i < len(widths) - 2:
            layers.append(activation())
        elif output_activation is not None:
            layers.append(output_activation())
    model = nn.Sequential(*layers).to(device=device, dtype=dtype)
    with torch.no_grad():  # scale so activations are in their interesting range
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(1.5)
    return model


def weighted_objective(y, sq, seed=1):
    """A scalar that weights every output and every sample differently."""
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    wsq = torch.rand(sq.shape, generator=g, dtype=sq.dtype).to(sq.device) + 0.5
    return (wy * y).sum() + (wsq * sq).sum()


def factored_mlp(weights, biases, codes, params, residual=None):
    """An MLP with every factor the ops take, as a function of one sample and its per-sample biases,
    gates and dropout masks (torch ops, for torch.func): h = m * act(g * (W h) + b + s), then a skip's
    input added (residual: per layer -1 or j)."""
    def f(x, shifts, gates, masks):
        h, inputs = x, []
        for i, w in enumerate(weights):
            inputs.append(h)
            z = w @ h
            if gates[i] is not None:
                z = gates[i] * z
            if biases[i] is not None:
                z = z + biases[i]
            if shifts[i] is not None:
                z = z + shifts[i]
            h = activation_value(z, codes[i], params[2 * i], params[2 * i + 1])
            if masks[i] is not None:
                h = masks[i] * h
            if residual is not None and residual[i] >= 0:
                h = h + inputs[residual[i]]
        return h
    return f
