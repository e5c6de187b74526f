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


def test_float32_tanh_within_a_few_ulp_nan_and_inf():
    """float32 tanh: the CPU kernels' own loop (tanh_float_loop; the device formula under
    JACEXT_DEVICE_FORMULAS=1) against float64 tanh, every 9973rd float in [-12, 12] plus both sides
    of its switch at |x| = 0.625, tiny and huge values: within 2.5 ulp (measured: 1.33 for the loop,
    2.10 for glibc's tanhf, the device formula on CPU), and tanh' = 1 - tanh^2 with
    it. An identity layer makes y = tanh(x) exactly (x W^T adds zeros); NaN stays NaN, +-inf
    give +-1."""
    grid = torch.arange(-0x413fffff, 0x41400000, 9973, dtype=torch.int64)  # the bits of floats in [-12, 12]
    bits = torch.where(grid < 0, (-grid) | -0x80000000, grid).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([0.625, -0.625, 0.62499994, 1e-30, -1e-30, 0.0, 9.5, 1e30])])
    k = 64
    x = torch.cat([x, x.new_zeros(-len(x) % k)]).view(-1, k)
    layer = torch.nn.Linear(k, k, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(k))
    model = torch.nn.Sequential(layer, torch.nn.Tanh())
    y, _ = jacext.jacobian_frobenius(model, x, method="forward")
    ref = torch.tanh(x.double())
    ulp = (ref.float().abs().nextafter(torch.tensor(float("inf"))) - ref.float().abs()).double()
    assert ((y.double() - ref).abs() <= 2.5 * ulp).all(), ((y.double() - ref).abs() / ulp).max()
    special = torch.tensor([[float("nan")], [float("inf")], [-float("inf")]])  # one per sample: inf * 0 is NaN
    one = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        one.weight.fill_(1.0)
    y, sq = jacext.jacobian_frobenius(torch.nn.Sequential(one, torch.nn.Tanh()), special, method="forward")
    assert y[0, 0].isnan() and sq[0].isnan() and y[1:, 0].tolist() == [1, -1] and sq[1:].tolist() == [0, 0]
    # the derivative saved with the value: ||J||^2 = sum (1 - t^2)^2 for the identity layer
    x = torch.linspace(-3, 3, 4 * k).view(4, k)
    _, sq = jacext.jacobian_frobenius(model, x, method="forward")
    torch.testing.assert_close(sq.double(), ((1 - torch.tanh(x.double()) ** 2) ** 2).sum(1), rtol=1e-6, atol=0)
