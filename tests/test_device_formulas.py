"""JACEXT_DEVICE_FORMULAS=1: the CPU kernels run the activation formulas the CUDA kernels run
(csrc/activations.h) instead of ATen's vectorized ones. CI runs the whole suite a second time with
it; here: the switch is what the environment says, and both paths give the same numbers."""
import json
import os
import subprocess
import sys

import torch

import jacext

SCRIPT = r"""
import json, torch, jacext
from torch import nn
torch.manual_seed(0)
out = {"device_formulas": jacext.ops.device_formulas()}
factories = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
             "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
             "smooth_leaky_relu": lambda: jacext.SmoothLeakyReLU(0.3)}
for name, factory in factories.items():  # the activations whose CPU path the switch changes
    model = nn.Sequential(nn.Linear(6, 9), factory(), nn.Linear(9, 9), factory(), nn.Linear(9, 4)).double()
    x = 2 * torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    y, sq = jacext.jacobian_frobenius(model, x, method="reverse")
    g = torch.autograd.grad(y.sum() + sq.sum(), [x, *model.parameters()])
    out[name] = [t.tolist() for t in (y, sq, *g)]
print("RESULT " + json.dumps(out))
"""


def run(env_value):
    env = dict(os.environ)
    env.pop("JACEXT_DEVICE_FORMULAS", None)
    if env_value is not None:
        env["JACEXT_DEVICE_FORMULAS"] = env_value
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_switch_follows_the_environment():
    assert jacext.ops.device_formulas() == (os.environ.get("JACEXT_DEVICE_FORMULAS") == "1")


def test_device_formulas_give_the_same_values_and_gradients():
    default, device = run(None), run("1")
    assert default.pop("device_formulas") is False and device.pop("device_formulas") is True
    for name in default:
        for a, b in zip(default[name], device[name]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-12, atol=1e-12)
