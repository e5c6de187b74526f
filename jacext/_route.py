"""Which path a call runs: the fused engine when the model lowers (frontend.lower), the generic
autograd path (generic.py) otherwise. Every public function asks here first."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ._wrt import resolve_wrt
from .frontend import Lowered, NotLowerable, lower

__all__ = ["as_cond", "engine_or_generic", "wrt_columns"]

# Methods that any module can run: "auto" picks the engine when the model lowers, "autograd" is
# the generic path itself; every other method names something only the engine does.
ANY_MODULE = ("auto", "autograd")

_warned = set()  # (model class, module path, op): one warning each


def as_cond(cond) -> tuple:
    """The conditioning inputs as a tuple of tensors: None, one tensor, or a sequence of them."""
    if cond is None:
        return ()
    if isinstance(cond, torch.Tensor):
        return (cond,)
    cond = tuple(cond)
    for i, c in enumerate(cond):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"cond must be a tensor or a sequence of tensors (passed as model(x, *cond)); "
                            f"cond[{i}] is {type(c).__name__}")
    return cond


def engine_or_generic(model, x, cond: tuple, method: str, quantity: str,
                      any_module=ANY_MODULE, stacklevel: int = 3, skips: bool = False) -> Optional[Lowered]:
    """The lowered model for the engine, or None for the generic path. method="autograd" is the
    generic path; "auto" (and the other methods in `any_module`) take it when the model does not
    lower, with one warning per model class and node naming the node; any other method is one of the
    engine's own and raises a TypeError naming that node. skips: whether this call runs residual
    skips on the engine (the forward-carry ops); without, a model with a skip does not lower."""
    if method == "autograd":
        return None
    try:
        return lower(model, x, *cond, skips=skips)
    except NotLowerable as reason:
        if method not in any_module:
            raise TypeError(f"{reason}; method={method!r} runs on the fused engine only: method='auto' or "
                            f"'autograd' runs any module on the generic path") from None
        key = (type(model), reason.path, reason.op)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{reason}. jacext.{quantity} runs the generic autograd path for this model class "
                          "(exact, slower); method='autograd' chooses it without this warning",
                          RuntimeWarning, stacklevel=stacklevel)
        return None


def wrt_columns(wrt, n_features: int):
    """resolve_wrt's index tensor of the chosen features, or None for all of them (also when
    wrt names every feature in order)."""
    index = resolve_wrt(wrt, n_features)
    if index is not None and index.numel() == n_features and bool((index == torch.arange(n_features)).all()):
        return None
    return index
