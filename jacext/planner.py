"""Which exact strategy to run: a multiply-add count per strategy, and the choice it implies.

The op's `strategy` argument (csrc/mlp_jacobian.h): carry the m output rows back (REVERSE),
carry the n_layer input columns forward (FORWARD), carry rows back and end the Frobenius norm
with the Gram epilogue (REVERSE_GRAM), or, for one hidden layer and a linear output, d^T M d with
the sample-independent M = (W_1 W_1^T) .* (W_2^T W_2) (GRAM1)."""
from __future__ import annotations

import math
from typing import Sequence

REVERSE, FORWARD, REVERSE_GRAM, GRAM1 = 0, 1, 2, 3
STRATEGY_NAMES = {REVERSE: "reverse", FORWARD: "forward", REVERSE_GRAM: "reverse + Gram epilogue",
                  GRAM1: "one-hidden-layer Gram"}


def penalty_macs(widths: Sequence[int], batch: int, strategy: int, layer: int = 0,
                 projections: int = 0) -> int:
    """GEMM multiply-adds of one forward + backward of the op for layer widths [n_0, ..., n_L]
    (elementwise work is not counted). Each carry GEMM runs three times: forward, and in the
    backward once for the carry's adjoint and once for the weight gradient; so does each of the
    MLP's own GEMMs. With k = `projections` random rows (the estimator) the reverse carry has k
    rows instead of m, and starts with one more GEMM (V D_L W_L)."""
    n = list(widths)
    m, depth = (projections or n[-1]), len(n) - 1
    mlp = 3 * batch * sum(n[i] * n[i + 1] for i in range(depth))
    if projections:
        if strategy == FORWARD:
            raise ValueError("projections are carried in reverse mode only")
        mlp += 3 * batch * projections * n[-1] * n[-2]
    if strategy == FORWARD:  # the first carry is W_{layer+1}^T itself: no GEMM
        return mlp + 3 * batch * n[layer] * sum(n[i] * n[i + 1] for i in range(layer + 1, depth))
    if strategy == REVERSE:  # the first carry is D_L W_L itself: no GEMM
        return mlp + 3 * batch * m * sum(n[i] * n[i + 1] for i in range(layer, depth - 1))
    if strategy == GRAM1:  # G1, G2 and M d forward; dM, then dW_1 and dW_2 backward
        return mlp + 2 * n[1] ** 2 * (n[0] + n[2]) + 2 * batch * n[1] ** 2
    if strategy == REVERSE_GRAM:  # carry down to R^(1); G = W_1 W_1^T replaces the last GEMM
        carry = 3 * batch * m * sum(n[i] * n[i + 1] for i in range(1, depth - 1))
        return mlp + carry + 2 * n[1] ** 2 * n[0] + 2 * batch * m * n[1] ** 2
    raise ValueError(f"unknown strategy {strategy}")


def gram1_applies(widths: Sequence[int], output_linear: bool) -> bool:
    """The one-hidden-layer Gram formula needs J = W_2 D_1 W_1: two layers, no output activation."""
    return len(widths) == 3 and output_linear


def resolve_strategy(method: str, widths: Sequence[int], layer: int = 0, frobenius: bool = True,
                     batch: int = 64, projections: int = 0, output_linear: bool = False) -> int:
    """The op strategy for a method name ("hutchinson": the reverse carry of k = `projections`
    random rows; "gram": the one-hidden-layer Gram formula, which needs `output_linear`).

    "reverse" ends the Frobenius norm with the Gram epilogue when that needs fewer multiply-adds;
    "auto" takes whichever exact strategy needs fewest (reverse on a tie)."""
    if method not in ("auto", "reverse", "forward", "gram", "hutchinson"):
        raise ValueError(f"unknown method {method!r} for the op; expected 'auto', 'reverse', 'forward', "
                         f"'gram' or 'hutchinson'")
    if not isinstance(batch, int):  # a symbolic size under torch.compile: plan for a typical batch
        batch = 64
    gram1 = frobenius and layer == 0 and not projections and gram1_applies(widths, output_linear)
    if method == "gram":
        if not gram1:
            raise ValueError("method='gram' is implemented for one hidden layer with a linear output "
                             f"layer (widths [n_0, n_1, m], no output activation); got widths {list(widths)}"
                             + ("" if output_linear else " with an output activation"))
        return GRAM1
    if method == "forward":
        return FORWARD
    reverse = REVERSE
    if frobenius and layer == 0 and len(widths) >= 3:
        gram = penalty_macs(widths, batch, REVERSE_GRAM, projections=projections)
        if gram < penalty_macs(widths, batch, REVERSE, projections=projections):
            reverse = REVERSE_GRAM
    if method in ("reverse", "hutchinson"):
        return reverse
    candidates = [reverse, FORWARD] + ([GRAM1] if gram1 else [])
    return min(candidates, key=lambda strategy: penalty_macs(widths, batch, strategy, layer))


class Plan:
    """What jacobian_frobenius(model, x, method) will run, and what each candidate would cost."""

    def __init__(self, widths, batch, method, candidates, choice):
        self.widths, self.batch, self.method = widths, batch, method
        self.candidates = candidates  # {strategy: (multiply-adds, bytes saved for the backward)}
        self.choice = choice

    def __repr__(self):
        lines = [f"MLP {self.widths}, batch {self.batch}, method={self.method!r}: runs "
                 f"{STRATEGY_NAMES[self.choice]}",
                 f"  {'strategy':26}{'GEMM multiply-adds':>20}{'saved for backward':>20}"]
        for strategy, (macs, saved) in self.candidates.items():
            mark = "  <- chosen" if strategy == self.choice else ""
            lines.append(f"  {STRATEGY_NAMES[strategy]:26}{macs / 1e9:>17.3f} G{saved / 2**20:>17.1f} MB{mark}")
        lines.append("  (forward + backward; the choice is the fewest multiply-adds, reverse on a tie)")
        return "\n".join(lines)


def explain(model, x, method: str = "auto") -> Plan:
    """The plan for jacobian_frobenius(model, x, method) with every exact candidate's cost:
    `print(jacext.explain(model, x))`."""
    from ._ops import _saved_shapes
    from .activations import IDENTITY
    from .nn import parse_model

    spec = parse_model(model)
    widths, batch = spec.widths, x.shape[0]
    output_linear = spec.activations[-1] == IDENTITY
    choice = resolve_strategy(method, widths, batch=batch, output_linear=output_linear)
    candidates = {}
    for strategy in (REVERSE, REVERSE_GRAM, FORWARD, GRAM1):
        if strategy == REVERSE_GRAM and len(widths) < 3:
            continue
        if strategy == GRAM1 and not gram1_applies(widths, output_linear):
            continue
        saved = sum(math.prod(shape) for shape in _saved_shapes(x, spec.weights, 0, strategy))
        candidates[strategy] = (penalty_macs(widths, batch, strategy), saved * x.element_size())
    return Plan(widths, batch, method, candidates, choice)

