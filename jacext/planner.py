"""Which exact strategy to run: a multiply-add count per strategy, and the choice it implies.

The op's `strategy` argument (csrc/mlp_jacobian.h): carry the m output rows back (REVERSE),
carry the n_layer input columns forward (FORWARD), or carry rows back and end the Frobenius norm
with the Gram epilogue (REVERSE_GRAM)."""
from __future__ import annotations

from typing import Sequence

REVERSE, FORWARD, REVERSE_GRAM = 0, 1, 2
STRATEGY_NAMES = {REVERSE: "reverse", FORWARD: "forward", REVERSE_GRAM: "reverse + Gram epilogue"}


def penalty_macs(widths: Sequence[int], batch: int, strategy: int, layer: int = 0) -> int:
    """GEMM multiply-adds of one forward + backward of the op for layer widths [n_0, ..., n_L]
    (elementwise work is not counted). Each carry GEMM runs three times: forward, and in the
    backward once for the carry's adjoint and once for the weight gradient; so does each of the
    MLP's own GEMMs."""
    n = list(widths)
    m, depth = n[-1], len(n) - 1
    mlp = 3 * batch * sum(n[i] * n[i + 1] for i in range(depth))
    if strategy == FORWARD:  # the first carry is W_{layer+1}^T itself: no GEMM
        return mlp + 3 * batch * n[layer] * sum(n[i] * n[i + 1] for i in range(layer + 1, depth))
    if strategy == REVERSE:  # the first carry is D_L W_L itself: no GEMM
        return mlp + 3 * batch * m * sum(n[i] * n[i + 1] for i in range(layer, depth - 1))
    if strategy == REVERSE_GRAM:  # carry down to R^(1); G = W_1 W_1^T replaces the last GEMM
        carry = 3 * batch * m * sum(n[i] * n[i + 1] for i in range(1, depth - 1))
        return mlp + carry + 2 * n[1] ** 2 * n[0] + 2 * batch * m * n[1] ** 2
    raise ValueError(f"unknown strategy {strategy}")


def resolve_strategy(method: str, widths: Sequence[int], layer: int = 0, frobenius: bool = True,
                     batch: int = 64) -> int:
    """The op strategy for an exact method name.

    "reverse" ends the Frobenius norm with the Gram epilogue when that needs fewer multiply-adds;
    "auto" takes whichever of reverse and forward needs fewer (reverse on a tie)."""
    if method not in ("auto", "reverse", "forward"):
        raise ValueError(f"unknown method {method!r} for the exact op; expected 'auto', 'reverse' or 'forward'")
    if not isinstance(batch, int):  # a symbolic size under torch.compile: plan for a typical batch
        batch = 64
    if method == "forward":
        return FORWARD
    reverse = REVERSE
    if frobenius and layer == 0 and len(widths) >= 3:
        if penalty_macs(widths, batch, REVERSE_GRAM) < penalty_macs(widths, batch, REVERSE):
            reverse = REVERSE_GRAM
    if method == "reverse":
        return reverse
    forward_cheaper = penalty_macs(widths, batch, FORWARD, layer) < penalty_macs(widths, batch, reverse, layer)
    return FORWARD if forward_cheaper else reverse
