"""jacext.explain: the plan every quantity will run, with each candidate's predicted cost (the top
layer of the package: it reads the model as the quantities do and asks the planner)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import check_square
from .activations import IDENTITY
from .layouts import (CARRY_FORWARD, FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM, carry_saved_shapes,
                      diagonal_layout, laplacian_layout)
from ._wrt import wrt_columns
from ._route import as_cond
from .frontend import dropout_listing, lower, skip_listing
from .laplacian import FORWARD_CARRY
from .planner import (DIAGONAL_STRATEGY_NAMES, L2_CACHE_BYTES, Split, applicable, batch_chunk, best_split,
                      carry_cost, carry_macs, carry_tile_size, default_memory_budget, diagonal_applicable, footprint,
                      op_element_size, penalty_macs, predicted_cost, resolve_diagonal_strategy, resolve_strategy,
                      strategy_name, tile_size)
from .margin import margin_plan
from .spectral import spectral_plan

__all__ = ["explain", "explain_carry", "Plan", "CarryPlan"]


class Plan:
    """What jacobian_frobenius(model, x, method, max_memory=...) will run, and what each candidate
    would cost."""

    def __init__(self, widths, batch, method, candidates, choice, chunk, max_memory, tile, dropout=(), residual=None,
                 conditioning=((), ())):
        self.widths, self.batch, self.method = widths, batch, method
        self.residual = residual  # the model's skips (MLPSpec.residual), None without
        self.conditioning = conditioning  # (layers with a per-sample bias, layers with a gate)
        self.dropout = dropout  # per layer, its Dropouts in train() (frontend.Layer.dropout)
        self.candidates = candidates  # {strategy: (multiply-adds, predicted cost, estimated peak bytes)}
        self.choice = choice
        self.chunk, self.max_memory = chunk, max_memory  # samples per op call, the budget in bytes
        self.tile = tile  # samples per tile inside the op (0: the whole call at once)

    def __repr__(self):
        lines = [f"MLP {self.widths}, batch {self.batch}, method={self.method!r}: runs "
                 f"{strategy_name(self.choice)}",
                 f"  {'strategy':26}{'GEMM multiply-adds':>20}{'predicted cost':>17}{'peak memory (est.)':>20}"]
        for strategy, (macs, cost, peak) in self.candidates.items():
            mark = "  <- chosen" if strategy == self.choice else ""
            lines.append(f"  {strategy_name(strategy):26}{macs / 1e9:>17.4g} G{cost / 1e9:>14.4g} G"
                         f"{peak / 2**20:>17.1f} MB{mark}")
        lines.append("  (forward + backward; cost = multiply-adds + CARRY_ELEMENT_COST x carried elements; "
                     "the least cost wins, reverse on a tie)")
        masked = dropout_listing(self.dropout)
        if masked:
            lines.append("  dropout masks, drawn per call as the model draws them (a diagonal factor after the layer's "
                         "activation): " + masked)
        if self.residual is not None:
            skips = skip_listing(self.residual)
            lines.append(f"  residual skips (i, j), layer i's output adds layer j's input: {skips}; the reverse carry "
                         "dy/dh_j adds the one above each block, the forward carry T the one that entered it; the Gram "
                         "forms (which factor J through single layers) do not apply across a skip")
        shifted, gated = self.conditioning
        if shifted or gated:
            top = bool(gated) and gated[-1] == len(self.widths) - 2
            lines.append(f"  conditioning inside the network: per-sample biases at layers {list(shifted)}, gates at "
                         f"layers {list(gated)}; a bias changes the forward values only, a gate is one more "
                         "per-sample diagonal of J (D = diag(gate * act')), which every carry takes"
                         + ("; on the output layer it rules out the forms that need a linear output (the "
                            "one-hidden-layer Gram, the forward Gram epilogue)" if top else ""))
        budget = f"memory budget {self.max_memory / 2**20:.0f} MB"
        if self.chunk < self.batch:
            lines.append(f"  {budget}: {math.ceil(self.batch / self.chunk)} chunks of <= {self.chunk} samples, "
                         f"each recomputed in the backward (about 1/3 more multiply-adds)")
        else:
            lines.append(f"  {budget}: the whole batch in one call")
        if self.tile:
            lines.append(f"  tiles of {self.tile} samples: each thread takes a tile through every layer while its "
                         f"carries stay in its {L2_CACHE_BYTES // 1024} KiB L2 cache")
        else:
            lines.append("  no tiles: each step runs over the whole call's samples at once")
        return "\n".join(lines)


def explain(model, x, method: str = "auto", max_memory: Optional[int] = None, *, quantity: str = "frobenius",
            **options):
    """The plan for jacobian_frobenius(model, x, method, max_memory=max_memory) with every exact
    candidate's cost: `print(jacext.explain(model, x))`. quantity "spectral_norm": the plan of
    jacobian_spectral_norm(model, x, method=method, **options) (layer, n_iter, tol, cond); "laplacian",
    "divergence" or "jacobian_diagonal": the plan of that function (explain_carry; options
    return_gradient, n_proj, wrt, cond); "margin": the plan of large_margin_loss(model, x, method=method,
    **options) (margin_plan; options target, layers, top_k, dist_norm, use_approximation, cond). For
    quantity "frobenius", option cond: the conditioning inputs, which a model conditioned inside the
    network needs (its per-sample biases and gates; the model's Dropout masks are drawn then, as a call
    draws them)."""
    if quantity != "frobenius" and max_memory is not None:
        raise ValueError("explain: max_memory applies to the Frobenius norm's plan only")
    if quantity == "spectral_norm":
        return spectral_plan(model, x, method, **options)
    if quantity == "margin":
        return margin_plan(model, x, method=method, **options)
    if quantity != "frobenius":
        return explain_carry(model, x, quantity, method, **options)
    cond = as_cond(options.pop("cond", None))
    if options:
        raise TypeError(f"explain: {sorted(options)} do not apply to quantity='frobenius'")

    supports = frozenset(("dropout", "residual", "dropout_with_residual"))
    if cond:  # the per-sample biases and gates are the call's
        lowered = lower(model, x, *cond, supports=supports | {"sample_bias", "gate", "dropout_with_conditioning"})
    else:  # without x: no masks drawn, only where they go
        lowered = lower(model, supports=supports)
    spec = lowered.spec
    widths, batch, skips = spec.widths, x.shape[0], spec.residual is not None
    conditioning = tuple(tuple(i for i, t in enumerate(ts or ()) if t is not None)
                         for ts in (spec.sample_biases, spec.gates))
    # a mask or gate on the last layer is a diagonal there: strategies 3 and 4 need none
    output_linear = (spec.activations[-1] == IDENTITY and not (lowered.dropout and lowered.dropout[-1])
                     and not (spec.gates is not None and spec.gates[-1] is not None))
    choice = resolve_strategy(method, widths, batch=batch, output_linear=output_linear, skips=skips)
    strategies = [st for st in (REVERSE, REVERSE_GRAM, FORWARD, FORWARD_GRAM, GRAM1)
                  if applicable(st, widths, output_linear=output_linear) and (st in (REVERSE, FORWARD) or not skips)]
    split = None if skips else best_split(widths, batch)
    candidates = {strategy: (penalty_macs(widths, batch, strategy), predicted_cost(widths, batch, strategy),
                             footprint(widths, batch, strategy, op_element_size(x)))
                  for strategy in strategies + ([split] if split else [])}
    max_memory = default_memory_budget(x.device) if max_memory is None else max_memory
    chunk = batch_chunk(widths, batch, choice, op_element_size(x), max_memory)
    tile = 0 if isinstance(choice, Split) else tile_size(widths, chunk, choice, op_element_size(x), device=x.device)
    return Plan(widths, batch, method, candidates, choice, chunk, max_memory, tile, lowered.dropout, spec.residual,
                conditioning)


class CarryPlan:
    """What jacext.laplacian / divergence / jacobian_diagonal will run, with each exact
    candidate's cost."""

    def __init__(self, quantity, widths, batch, method, candidates, choice, layout, tile, residual=None,
                 conditioning=((), ()), dropout=()):
        self.quantity, self.widths, self.batch, self.method = quantity, widths, batch, method
        self.candidates = candidates  # {name: (multiply-adds, predicted cost, saved bytes)}
        self.choice, self.layout, self.tile = choice, layout, tile
        self.residual = residual  # the model's skips (MLPSpec.residual), None without
        self.conditioning = conditioning  # (layers with a per-sample bias, layers with a gate)
        self.dropout = dropout  # per layer, its Dropouts in train() (frontend.Layer.dropout)

    def __repr__(self):
        rows, layout = self.layout.rows, self.layout
        what = (f"[h; {layout.columns} {'projected' if self.method == 'hutchinson' else 'input'} columns"
                f"{'; Delta' if layout.laplacian else ''}]" if rows > 1 else "h alone")
        lines = [f"{self.quantity} of MLP {self.widths}, batch {self.batch}, method={self.method!r}: runs {self.choice}",
                 f"  carries {what} = {rows} row{'s' if rows > 1 else ''} per sample through "
                 f"{layout.carried} of {len(self.widths) - 1} layers, one GEMM per layer over the batch",
                 f"  {'strategy':38}{'GEMM multiply-adds':>20}{'predicted cost':>17}{'saved (est.)':>15}"]
        for name, (macs, cost, saved) in self.candidates.items():
            mark = "  <- chosen" if name == self.choice else ""
            lines.append(f"  {name:38}{macs / 1e9:>17.4g} G{cost / 1e9:>14.4g} G{saved / 2**20:>12.1f} MB{mark}")
        lines.append("  (forward + backward; cost = multiply-adds + CARRY_ELEMENT_COST x saved elements)")
        if self.residual is not None:
            skips = skip_listing(self.residual)
            lines.append(f"  residual skips (i, j), layer i's output adds layer j's input: {skips}")
            lines.append("  each block's end adds the carry that entered it (every row)")
            if self.quantity != "laplacian":
                lines.append("  the closed forms (which carry h alone) do not apply across a skip: the forward "
                             "columns run")
            elif self.residual[-1] >= 0:
                lines.append("  the thin linear last layer (h and Delta alone) does not apply under a skip into it")
        shifted, gated = self.conditioning
        if shifted or gated:
            lines.append(f"  conditioning inside the network: per-sample biases at layers {list(shifted)}, gates at "
                         f"layers {list(gated)}; a gate scales every row of its layer's GEMM output, a bias "
                         "shifts the h row")
        masked = dropout_listing(self.dropout)
        if masked:
            lines.append("  dropout masks, drawn per call as the model draws them: " + masked)
            lines.append("  a mask scales every row of its layer's carry after the activation (h, the columns"
                         f"{' and Delta' if self.quantity == 'laplacian' else ''})")
            if self.quantity == "laplacian" and self.dropout[-1]:
                lines.append("  the thin linear last layer (h and Delta alone) does not apply under a mask on it")
        if (shifted or gated or masked) and self.quantity != "laplacian":
            lines.append("  the closed forms (sample-independent matrices) do not apply: the forward columns run")
        lines.append(f"  tiles of {self.tile} samples" if self.tile else "  no tiles: each step runs over the whole batch")
        return "\n".join(lines)


def explain_carry(model, x, quantity: str = "laplacian", method: str = "auto", return_gradient: bool = False,
                  n_proj: int = 1, wrt=None, cond=None) -> CarryPlan:
    """The plan of jacext.laplacian (quantity "laplacian", over the features `wrt` names),
    divergence or jacobian_diagonal; `cond`: the conditioning inputs, which a model conditioned
    inside the network needs (its per-sample biases and gates)."""
    cond = as_cond(cond)
    if cond:  # lowering with x draws the dropout masks: from a copy of the generator's state
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            lowered = lower(model, x, *cond, supports=FORWARD_CARRY)
    else:
        lowered = lower(model, supports=FORWARD_CARRY)
    spec, dropout = lowered.spec, lowered.dropout
    widths, batch, codes, residual = spec.widths, x.shape[0], spec.activations, spec.residual
    conditioning = tuple(tuple(i for i, t in enumerate(ts or ()) if t is not None)
                         for ts in (spec.sample_biases, spec.gates))
    per_sample = any(conditioning) or any(dropout)
    top = any(ts is not None and ts[-1] is not None for ts in (spec.sample_biases, spec.gates)) or \
        bool(dropout and dropout[-1])

    def entry(layout, strategy=CARRY_FORWARD):
        shapes = carry_saved_shapes(widths, batch, codes, layout)
        gated = conditioning[1]
        return (carry_macs(widths, batch, layout, strategy, gated),
                carry_cost(widths, batch, codes, layout, strategy, gated),
                op_element_size(x) * sum(math.prod(s) for s in shapes))

    if quantity == "laplacian":
        if method != "auto":
            raise ValueError(f"the Laplacian has one method ('auto'), got {method!r}")
        columns = wrt_columns(wrt, widths[0])
        features = list(range(widths[0])) if columns is None else columns.tolist()
        rows = len(features) if wrt is not None else -1
        layout = laplacian_layout(widths, codes, return_gradient, None if rows == -1 else widths[0], rows, residual,
                                  top)
        name = "forward Laplacian" + (f" over features {features}" if wrt is not None else "")
        name += " (thin last layer)" if layout.carried < len(widths) - 1 else ""
        candidates, choice = {name: entry(layout)}, name
    elif quantity in ("divergence", "jacobian_diagonal"):
        if wrt is not None:
            raise ValueError(f"explain: wrt applies to the Laplacian's plan, not to {quantity!r}")
        check_square(spec.widths)
        trace = quantity == "divergence"
        strategy = resolve_diagonal_strategy(method, widths, codes, trace, batch, residual, per_sample)
        if method == "hutchinson":
            layout = diagonal_layout(widths, strategy, n_proj, residual, top)
            choice = f"hutchinson, {n_proj} projection{'s' if n_proj > 1 else ''}"
            candidates = {choice: entry(layout)}
        else:
            layout = diagonal_layout(widths, strategy, residual=residual, per_sample_top=top)
            able = [st for st in DIAGONAL_STRATEGY_NAMES
                    if diagonal_applicable(st, widths, trace, codes[-1] == IDENTITY, residual=residual,
                                           per_sample=per_sample)]
            candidates = {DIAGONAL_STRATEGY_NAMES[st]: entry(diagonal_layout(widths, st, residual=residual,
                                                                             per_sample_top=top), st)
                          for st in able}
            choice = DIAGONAL_STRATEGY_NAMES[strategy]
    else:
        raise ValueError(f"unknown quantity {quantity!r}; expected 'frobenius', 'spectral_norm', 'margin', "
                         "'laplacian', 'divergence' or 'jacobian_diagonal'")
    tile = carry_tile_size(widths, batch, layout, op_element_size(x), x.device)
    return CarryPlan(quantity, widths, batch, method, candidates, choice, layout, tile, residual, conditioning,
                     dropout)
