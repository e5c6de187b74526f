"""The ops' argument codes and saved-tensor layouts: the one Python description of what the C++
ops save (csrc/mlp_jacobian.h, csrc/mlp_laplacian.h). The fake kernels build their outputs from
it, so torch.library.opcheck (tests/test_contract.py) tests it against the compiled ops on every
op and strategy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .activations import IDENTITY, LEAKY_RELU, RELU

# mlp_jacobian_frobenius / mlp_jacobian's `strategy` (csrc/mlp_jacobian.h)
REVERSE, FORWARD, REVERSE_GRAM, GRAM1, FORWARD_GRAM = 0, 1, 2, 3, 4
# mlp_jacobian_diagonal's `strategy` (csrc/mlp_laplacian.h)
CARRY_FORWARD, DIAGONAL_GRAM1, TRACE_GRAM2 = 0, 1, 2


def first_carry_index(n_layers: int) -> int:
    """Where the carries start in the op's `saved` list: after d and act'' for every layer and
    h_1..h_{L-1} (csrc/mlp_jacobian.h). Reverse carries are dy/dh_i for i = L-1 down to `layer`."""
    return 3 * n_layers - 1


def saved_shapes(widths: Sequence[int], batch, layer: int, strategy: int, rows: Optional[int] = None,
                 activations: Optional[Sequence[int]] = None, masked: Sequence[bool] = ()):
    """Shapes of the op's `saved` outputs (layout documented in csrc/mlp_jacobian.h); `rows` is
    the number of carried rows in reverse mode: m, or k with projections. With the activation
    codes, an identity layer's d and a piecewise-linear layer's act'' are empty, (0,), as the op
    saves them; without, every layer is taken to have both (an upper bound). `masked`: which layers
    have a mask or a gate, a per-sample diagonal (none when empty): an identity layer with one has d."""
    B, L = batch, len(widths) - 1
    rows = widths[-1] if rows is None else rows
    codes = list(activations) if activations is not None else [None] * L
    # d and act'' for every layer, h_1..h_{L-1}, then the carries
    masked = list(masked) or [False] * L
    shapes = [(0,) if codes[i] == IDENTITY and not masked[i] else (B, widths[i + 1]) for i in range(L)]
    shapes += [(0,) if codes[i] in (IDENTITY, RELU, LEAKY_RELU) else (B, widths[i + 1]) for i in range(L)]
    shapes += [(B, widths[i]) for i in range(1, L)]
    if strategy == GRAM1:  # G1, G2 (n_1, n_1) and M d (B, n_1)
        shapes += [(widths[1], widths[1])] * 2 + [(B, widths[1])]
    elif strategy == FORWARD:
        shapes += [(B, widths[layer], widths[i]) for i in range(layer + 2, L + 1)]
    elif strategy == FORWARD_GRAM:  # U^(2)..U^(L-1), then P = T H: (B, n_0, n_{L-1})
        shapes += [(B, widths[0], widths[i]) for i in range(2, L)] + [(B, widths[0], widths[L - 1])]
    else:
        shapes += [(B, rows, widths[i]) for i in range(L - 1, layer - 1, -1)]
        if strategy == REVERSE_GRAM:  # P = S G replaces J: (B, rows, n_1)
            shapes[-1] = (B, rows, widths[1])
    return shapes


@dataclass(frozen=True)
class CarryLayout:
    """What a forward-carry op carries: `columns` tangent rows, the Laplacian's Delta row or not,
    through the first `carried` layers; `extra` is the width of the epilogue's saved tensor."""
    columns: int
    laplacian: bool
    carried: int
    extra: int = 0

    @property
    def rows(self) -> int:
        return 1 + self.columns + int(self.laplacian)


def skip_into_output(residual: Optional[Sequence[int]]) -> bool:
    """Whether a residual skip (the ops' `residual`: per layer, -1 or the j whose input carry is
    added to the layer's output) ends at the last layer: the epilogues that map h alone, or skip
    the tangent rows, above the last carry do not apply then."""
    return residual is not None and residual[-1] >= 0


def laplacian_layout(widths: Sequence[int], activations: Sequence[int], gradient: bool,
                     directions: Optional[int] = None, laplacian_rows: int = -1,
                     residual: Optional[Sequence[int]] = None, per_sample_top: bool = False) -> CarryLayout:
    """The c tangent rows (the n_0 unit vectors, or `directions` rows) and Delta through every
    layer, or, with a linear output layer, no gradient returned, no skip into it and no per-sample
    bias, gate or mask on it (`per_sample_top`), through all but the last, which maps h and Delta
    alone. Without the gradient only the first laplacian_rows rows (-1: all) are carried: the others
    reach no output."""
    depth = len(widths) - 1
    columns = widths[0] if directions is None else directions
    if not gradient and laplacian_rows != -1:
        columns = laplacian_rows
    thin_top = not gradient and activations[-1] == IDENTITY and not skip_into_output(residual) and not per_sample_top
    return CarryLayout(columns, True, depth - 1 if thin_top else depth)


def diagonal_layout(widths: Sequence[int], strategy: int, projections: int = 0,
                    residual: Optional[Sequence[int]] = None, per_sample_top: bool = False) -> CarryLayout:
    """kForward: the n_0 columns up to the last layer and the row-dot epilogue (k projected columns
    through every layer with projections, the n_0 columns with a skip into the last layer or a
    per-sample bias, gate or mask on it: `per_sample_top`); the closed forms carry h alone."""
    depth = len(widths) - 1
    if strategy == TRACE_GRAM2:
        return CarryLayout(0, False, depth, widths[2])
    if strategy == DIAGONAL_GRAM1:
        return CarryLayout(0, False, depth, widths[0])
    if projections:
        return CarryLayout(projections, False, depth)
    if skip_into_output(residual) or per_sample_top:
        return CarryLayout(widths[0], False, depth)
    return CarryLayout(widths[0], False, depth - 1, widths[0])


def carry_saved_shapes(widths: Sequence[int], batch, activations: Sequence[int], layout: CarryLayout):
    """Shapes of a forward-carry op's `saved` outputs (layout documented in csrc/mlp_laplacian.h)."""
    B, depth, rows = batch, len(widths) - 1, layout.rows
    curved = [code not in (IDENTITY, RELU, LEAKY_RELU) for code in activations]
    d1 = [(0,) if activations[i] == IDENTITY else (B, widths[i + 1]) for i in range(depth)]
    d2 = [(B, widths[i + 1]) if curved[i] else (0,) for i in range(depth)]
    d3 = [(B, widths[i + 1]) if curved[i] and layout.laplacian else (0,) for i in range(depth)]
    hidden = [(B, rows, widths[i]) for i in range(1, depth)]
    pre = [(B, rows, widths[i + 1]) if i < layout.carried and rows > 1 and curved[i] else (0,) for i in range(depth)]
    return d1 + d2 + d3 + hidden + pre + [(B, layout.extra) if layout.extra else (0,)]
