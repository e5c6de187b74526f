"""`wrt=`: which features of the flattened per-sample input x.reshape(B, -1) a Jacobian quantity
is taken with respect to (the others are held fixed)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

__all__ = ["resolve_wrt", "wrt_columns"]

EXPECTED = ("None (every feature), an int k (features 0..k-1), a slice, or a sequence of distinct "
            "feature indices")


def resolve_wrt(wrt, n_features: int) -> Optional[torch.Tensor]:
    """The chosen feature indices as a CPU int64 tensor (B-independent, in the order given), or
    None for wrt=None (every feature, in order).

    wrt: None; an int k in [1, n_features]: the first k features (wrt=3 is features 0, 1, 2; one
    feature j is wrt=[j]); a slice of range(n_features) (non-empty); or a sequence (list, tuple,
    range, 1-D integer tensor or array) of distinct indices in [0, n_features - 1], in any order
    (the order of the Jacobian's columns, and the pairing of outputs with features in divergence
    and jacobian_diagonal). Negative indices are refused rather than wrapped, as out of range."""
    if wrt is None:
        return None
    if isinstance(wrt, bool):
        raise TypeError(f"wrt must be {EXPECTED}; got the bool {wrt!r}")
    if isinstance(wrt, numbers.Integral):
        if not 1 <= wrt <= n_features:
            raise ValueError(f"wrt={int(wrt)} selects the first {int(wrt)} features, but an int wrt must be in "
                             f"[1, {n_features}] (the input has {n_features} features per sample); "
                             f"one feature j is wrt=[j]")
        return torch.arange(int(wrt))
    if isinstance(wrt, slice):
        for part in (wrt.start, wrt.stop, wrt.step):
            if part is not None and (isinstance(part, bool) or not isinstance(part, numbers.Integral)):
                raise TypeError(f"a slice wrt needs integer start, stop and step; got {wrt!r}")
        chosen = range(n_features)[wrt]
        if len(chosen) == 0:
            raise ValueError(f"wrt={wrt!r} selects no feature of the {n_features} features per sample")
        return torch.tensor(list(chosen), dtype=torch.int64)
    if isinstance(wrt, (str, bytes)) or isinstance(wrt, numbers.Number):
        raise TypeError(f"wrt must be {EXPECTED}; got {type(wrt).__name__} {wrt!r}")
    if isinstance(wrt, torch.Tensor):
        if wrt.dim() != 1 or wrt.dtype == torch.bool or wrt.is_floating_point() or wrt.is_complex():
            raise TypeError(f"a tensor wrt must be a 1-D integer tensor of feature indices; got "
                            f"{wrt.dtype} of shape {tuple(wrt.shape)}")
        items = wrt.tolist()
    else:
        try:
            items = list(wrt)
        except TypeError:
            raise TypeError(f"wrt must be {EXPECTED}; got {type(wrt).__name__}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"wrt must hold integer feature indices; got {type(item).__name__} {item!r} in {wrt!r}")
    if not items:
        raise ValueError(f"wrt selects no feature: got an empty {type(wrt).__name__}; expected {EXPECTED}")
    outside = [int(i) for i in items if not 0 <= i < n_features]
    if outside:
        raise ValueError(f"wrt holds feature indices outside [0, {n_features - 1}] (the input has {n_features} "
                         f"features per sample after flattening): {outside}")
    seen, repeated = set(), []
    for i in items:
        if int(i) in seen and int(i) not in repeated:
            repeated.append(int(i))
        seen.add(int(i))
    if repeated:
        raise ValueError(f"wrt holds repeated feature indices {repeated}; each feature may be chosen once")
    return torch.tensor([int(i) for i in items], dtype=torch.int64)


def wrt_columns(wrt, n_features: int, offset: int = 0, n_columns: Optional[int] = None) -> Optional[torch.Tensor]:
    """The columns of an (B, n_columns) input that hold the features wrt chooses, when x's
    n_features features sit at columns offset..offset+n_features-1 of it (a model that concatenates
    conditioning inputs with x); None for every column in order (n_columns defaults to n_features)."""
    n_columns = n_features if n_columns is None else n_columns
    index = resolve_wrt(wrt, n_features)
    if index is None:
        if offset == 0 and n_features == n_columns:
            return None  # no tensor to compare: torch.compile traces this call
        index = torch.arange(n_features)
    index = index + offset
    if index.numel() == n_columns and bool((index == torch.arange(n_columns)).all()):
        return None
    return index
