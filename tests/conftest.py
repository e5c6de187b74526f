import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA GPU")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
