"""Which path a call runs: the fused engine when the model lowers (frontend.lower), the generic
autograd path (generic.py) otherwise. Every public function asks here first."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .frontend import FACTORS, Lowered, NotLowerable, lower

__all__ = ["as_cond", "engine_or_generic", "FACTORS"]

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


def engine_or_generic(model, x, cond: tuple, method: str, quantity: str, any_module=ANY_MODULE,
                      stacklevel: int = 3, *, supports: frozenset) -> Optional[Lowered]:
    """The lowered model for the engine, or None for the generic path. method="autograd" is the
    generic path; "auto" (and the other methods in `any_module`) take it when the model does not
    lower, or has a part beyond a plain MLP that the quantity's engine path (or the method) does not
    take (`supports`: the frontend.FACTORS it takes, said at every call; refused before any dropout
    mask is drawn), with one warning per model class and node naming the node; any other method is
    one of the engine's own and raises a TypeError naming that node."""
    if method == "autograd":
        return None
    try:
        return lower(model, x, *cond, supports=supports)
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
