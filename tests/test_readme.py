"""README.md: its headline table is the one bench/headline.py computes from the JSON files in
bench/results/ (so every figure in it comes from a file a named command wrote), it stays short,
and its API block runs as printed."""
import os
import re
import sys
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import headline  # noqa: E402  (bench/headline.py)


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_the_headline_table_is_computed_from_the_bench_json():
    rows = headline.headline_rows()
    assert len(rows) >= 5, "the headline table needs its JSON files in bench/results/"
    assert headline.readme_block(readme()) == headline.table()


def test_the_headline_table_fails_when_a_figure_is_edited(tmp_path):
    """The check above can fail: a README whose table differs by one figure does not match."""
    table = headline.table()
    first_figure = re.search(r"\d+\.\d+×", table).group(0)
    edited = table.replace(first_figure, "9" + first_figure, 1)
    text = f"x\n{headline.START}\n{edited}\n{headline.END}\ny"
    assert headline.readme_block(text) != table


def test_the_readme_is_short():
    assert len(readme()) < 15_000


class _TimeField(nn.Module):
    """A field f(z, t) on cat([z, t]), as FFJORD's."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, z, t):
        return self.net(torch.cat([z, t], 1))


def test_the_api_block_runs():
    """The first python block under '## API', with the names it leaves to the reader defined."""
    block = readme().split("## API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    import jacext
    namespace = {"target": torch.randint(0, 10, (128,)), "g": torch.Generator().manual_seed(0),
                 "output_target": torch.randn(128, 10), "pinn": jacext.MLP([2, 16, 1]), "xt": torch.rand(64, 2),
                 "ffjord": _TimeField(), "z": torch.randn(32, 4), "t": torch.rand(32, 1),
                 "cnn": nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)),
                 "images": torch.randn(4, 1, 4, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CNN's: it runs the generic path
        exec(compile(block, "README.md API block", "exec"), namespace)
    assert namespace["lap"].shape == (128, 10) and namespace["s"].shape == (128,)
    assert namespace["div"].shape == (128,) and namespace["diag"].shape == (128, 784)
    assert len(namespace["targets"]) == 3
    assert namespace["u_xx"].shape == (64, 1) and namespace["grad_u"].shape == (64, 1, 2)
    assert namespace["div_z"].shape == (32,) and namespace["sq"].shape == (4,)


def _pip_packages(command):
    """The package names of the first `pip install` in a shell command line, versions dropped."""
    words = command.split("pip install", 1)[1].split("&&", 1)[0].split()
    return {re.split(r"[=<>]", w)[0] for w in words if not w.startswith("-")}


def test_the_readme_test_command_installs_what_ci_tests_with():
    """README's test command must install every package .ci/run's CPU venv installs for the suite
    (the demo and example tests write PNGs with matplotlib), pybind11 aside: torch ships its headers."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_line = next(l for l in f if '"$work/cpu/bin/pip" install -q torch' in l)
    ci = _pip_packages(ci_line.replace('"$work/cpu/bin/pip"', "pip").replace("-q ", ""))
    command = next(l for l in readme().splitlines() if l.startswith("python3 -m venv") and "pytest -q tests" in l)
    missing = ci - {"pybind11"} - _pip_packages(command)
    assert not missing, f"README's test command does not install {sorted(missing)}"
