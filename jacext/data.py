"""Small data sets that need no download: scikit-learn's bundled digits (8x8 images, 10 classes)."""
from __future__ import annotations

import torch


def load_digits(test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32, device="cpu"):
    """(x_train, y_train, x_test, y_test): the 1797 scikit-learn digits, pixels scaled to [0, 1],
    split at random (fixed by `seed`)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from error
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = sklearn_digits()
    x = torch.tensor(digits.data, dtype=dtype) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)
