import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA GPU")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    """With JACEXT_DEVICE_FORMULAS=1 (CI's second pass: the CPU kernels evaluate the activations by
    the CUDA kernels' formulas, csrc/device_formulas.h), only what that changes runs again: the
    tests parametrized over the activations, and the device-formula tests themselves."""
    if os.environ.get("JACEXT_DEVICE_FORMULAS") != "1":
        return
    selected, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        keep = "activation" in params or item.path.name == "test_device_formulas.py"
        (selected if keep else deselected).append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = selected
