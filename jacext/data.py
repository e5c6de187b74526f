"""Data that needs no download: scikit-learn's bundled digits (8x8 images, 10 classes), for
classification and, dequantized and logit-transformed, for density models; and a user's own
MNIST copy (IDX files or .npz)."""
from __future__ import annotations

import gzip
import math
import os
import struct
from typing import Optional

import numpy as np
import torch


def _sklearn_digits(test_fraction):
    """scikit-learn's bundled digits (data: 0..16 grey levels, target), after checking test_fraction."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from error
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return sklearn_digits()


def _random_split(n, test_fraction, generator):
    """(train, test) indices of a random split of n samples."""
    order = torch.randperm(n, generator=generator)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def load_digits(test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32, device="cpu"):
    """(x_train, y_train, x_test, y_test): the 1797 scikit-learn digits, pixels scaled to [0, 1],
    split at random (fixed by `seed`)."""
    digits = _sklearn_digits(test_fraction)
    x = torch.tensor(digits.data, dtype=dtype) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = _random_split(len(x), test_fraction, torch.Generator().manual_seed(seed))
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


# ---- data for density models (flows): dequantized, logit-transformed pixels -------------------

LOGIT_LAMBDA = 1e-6  # as MAF and the relative-gradient paper's MNIST setting


def logit_transform(pixels: torch.Tensor, levels: int, generator: Optional[torch.Generator] = None,
                    lam: float = LOGIT_LAMBDA):
    """(x, logdet): integer pixels in [0, levels) dequantized to u = (pixel + U(0, 1)) / levels,
    then x = logit(lam + (1 - 2 lam) u); logdet[b] = sum log|dx/du| per sample, so that
    log p(u) = log p(x) + logdet (the density of the dequantized pixels in [0, 1]^D)."""
    pixels = torch.as_tensor(pixels).to(torch.float64)
    if pixels.numel() and (pixels.min() < 0 or pixels.max() > levels - 1):
        raise ValueError(f"pixels must lie in [0, {levels - 1}], got [{pixels.min().item()}, {pixels.max().item()}]")
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float64)
    p = lam + (1 - 2 * lam) * (pixels + noise) / levels
    x = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * lam) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    return x, logdet


def load_digits_flow(test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32, device="cpu"):
    """(x_train, x_test): the scikit-learn digits (8 x 8, 17 grey levels) dequantized and
    logit-transformed (logit_transform), flattened to 64 features; the noise and a random split
    fixed by `seed`."""
    pixels = torch.tensor(_sklearn_digits(test_fraction).data)
    generator = torch.Generator().manual_seed(seed)
    x, _ = logit_transform(pixels, levels=17, generator=generator)
    train, test = _random_split(len(x), test_fraction, generator)
    return x[train].to(device, dtype), x[test].to(device, dtype)


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic 0x00000803 or 0x00000801)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says shape {shape} but the file holds {body.size} bytes of data")
    return body.reshape(shape)


IDX_NAMES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def load_mnist(path: str):
    """(x_train, y_train, x_test, y_test) from a user's MNIST copy (nothing is downloaded): a
    folder with the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz), or an .npz with
    x_train, y_train, x_test, y_test (as keras' mnist.npz). Images come as uint8 (N, 784), labels
    as int64 (N,)."""
    if os.path.isdir(path):
        arrays = {}
        for key, name in IDX_NAMES.items():
            found = [os.path.join(path, name + ext) for ext in ("", ".gz")
                     if os.path.exists(os.path.join(path, name + ext))]
            if not found:
                raise FileNotFoundError(f"{path} holds no {name} (or {name}.gz): expected the four MNIST IDX files")
            arrays[key] = _read_idx(found[0])
    elif path.endswith(".npz") and os.path.exists(path):
        with np.load(path) as npz:
            missing = [key for key in IDX_NAMES if key not in npz]
            if missing:
                raise ValueError(f"{path} lacks {missing}; expected arrays x_train, y_train, x_test, y_test")
            arrays = {key: npz[key] for key in IDX_NAMES}
    else:
        raise FileNotFoundError(f"{path!r} is neither a folder of MNIST IDX files nor an existing .npz file")
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.dtype != np.uint8 or images.ndim < 2 or len(images) != len(labels):
            raise ValueError(f"MNIST {split} images must be uint8 (N, ...) with one label each, got "
                             f"{images.dtype} {images.shape} and {len(labels)} labels")
    def images(key):
        return torch.from_numpy(arrays[key].reshape(len(arrays[key]), -1).copy())

    def labels(key):
        return torch.from_numpy(arrays[key].reshape(-1).astype(np.int64))

    return images("x_train"), labels("y_train"), images("x_test"), labels("y_test")
