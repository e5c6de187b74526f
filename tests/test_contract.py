"""The contract of every registered op, driven by per-op sample inputs (as pytorch/extension-cpp
tests its ops): torch.library.opcheck on every sample (schema, autograd registration, fake tensor,
and on one sample per op the aot-dispatch test, which traces the autograd formulas), gradcheck and
gradgradcheck of the forward ops, torch.compile(fullgraph=True) against eager, and bad inputs.
The per-feature files test the values against torch.func; this one tests that each op keeps the
promises every custom op makes."""
import pytest
import torch

import jacext
from jacext import activations as act
from jacext.layouts import (CARRY_FORWARD, DIAGONAL_GRAM1, FORWARD, FORWARD_GRAM, GRAM1, REVERSE, REVERSE_GRAM,
                            TRACE_GRAM2, first_carry_index)

OPS = torch.ops.jacext
# Ops without tensors: the workspace's controls and the device-formula switch (test_memory.py,
# test_device_formulas.py).
UTILITY_OPS = {"device_formulas", "workspace_stats", "workspace_set_limit", "workspace_release"}
# opcheck's aot_dispatch test traces the autograd formulas (slow): on each op's first sample only
FAST = ("test_schema", "test_autograd_registration", "test_faketensor")


def mlp(widths, codes, bias=None, seed=0, batch=3):
    """(x, weights, op biases (an empty tensor for a layer without), codes, params), float64, all
    requiring grad; `codes` names the hidden layers' activation, the output's last."""
    g = torch.Generator().manual_seed(seed)
    depth = len(widths) - 1
    bias = [i != 1 for i in range(depth)] if bias is None else bias
    weights = [(torch.randn(o, i, generator=g, dtype=torch.float64) * 0.9).requires_grad_()
               for i, o in zip(widths[:-1], widths[1:])]
    biases = [(torch.randn(o, generator=g, dtype=torch.float64) * 0.5).requires_grad_() if b
              else torch.empty(0, dtype=torch.float64) for o, b in zip(widths[1:], bias)]
    codes = [act.NAMES[c] for c in codes]
    params = [p for c in codes for p in ({act.SOFTPLUS: (1.5, 2.0), act.LEAKY_RELU: (0.2, 0.0),
                                          act.SMOOTH_LEAKY_RELU: (0.3, 0.0)}.get(c, (0.0, 0.0)))]
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64).requires_grad_()
    return x, weights, biases, codes, params


def masks(widths, layers, batch=3, p=0.5):
    """Dropout masks (0 or 1/(1-p)) on `layers`, an empty tensor for the others (the ops' form)."""
    g = torch.Generator().manual_seed(9)
    return [(torch.rand(batch, n, generator=g, dtype=torch.float64) > p).double() / (1 - p) if i in layers
            else torch.empty(0, dtype=torch.float64) for i, n in enumerate(widths[1:])]


def conditioning(widths, layers, batch=3, gate=False):
    """Per-sample biases (or gates, around 1) on `layers`, an empty tensor for the others (the ops'
    form), requiring grad."""
    g = torch.Generator().manual_seed(11 + gate)
    return [(torch.randn(batch, n, generator=g, dtype=torch.float64) * 0.5 + gate).requires_grad_() if i in layers
            else torch.empty(0, dtype=torch.float64) for i, n in enumerate(widths[1:])]


def _grads_like(outputs):
    return [None if o is None else torch.randn_like(o).requires_grad_() for o in outputs]


def _forward_samples():
    """(op, label, args, kwargs): the forward ops' samples."""
    deep = lambda out="sigmoid", **kw: mlp((3, 4, 5, 2), ["tanh", "softplus", out], **kw)  # noqa: E731
    linear_out = lambda: mlp((3, 6, 4), ["tanh", "identity"], bias=[True, True])  # noqa: E731
    square = lambda out="identity": mlp((3, 4, 5, 3), ["tanh", "gelu", out])  # noqa: E731
    v = torch.randint(0, 2, (3, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    for name, strategy in [("reverse", REVERSE), ("forward", FORWARD), ("reverse_gram", REVERSE_GRAM)]:
        yield "mlp_jacobian_frobenius", name, (*deep(), strategy), {}
    for name, strategy in [("gram1", GRAM1), ("forward_gram", FORWARD_GRAM)]:
        yield "mlp_jacobian_frobenius", name, (*linear_out(), strategy), {}
    yield "mlp_jacobian_frobenius", "projections", (*deep(), REVERSE, v), {}
    yield "mlp_jacobian_frobenius", "tiles", (*deep(), REVERSE), {"tile": 2}
    for layer in (0, 2):
        for name, strategy in [("reverse", REVERSE), ("forward", FORWARD)]:
            yield "mlp_jacobian", f"{name}-layer{layer}", (*deep(), layer, strategy), {}
    yield "mlp_jacobian", "gram", (*mlp((6, 3, 4, 2), ["tanh", "tanh", "sigmoid"]), 0, REVERSE_GRAM), {"gram": True}
    # dropout masks (a per-sample diagonal after the activation; the backward op takes them too)
    on = masks((3, 4, 5, 2), (0, 2))
    for name, strategy in [("reverse", REVERSE), ("forward", FORWARD), ("reverse_gram", REVERSE_GRAM)]:
        yield "mlp_jacobian_frobenius", f"masked-{name}", (*deep(), strategy), {"masks": on}
    identity_hidden = mlp((3, 4, 5, 2), ["identity", "softplus", "sigmoid"])  # d = the mask
    yield "mlp_jacobian_frobenius", "masked-identity", (*identity_hidden, REVERSE), {"masks": masks((3, 4, 5, 2), (0,))}
    for name, strategy in [("gram1", GRAM1), ("forward_gram", FORWARD_GRAM)]:
        yield "mlp_jacobian_frobenius", f"masked-{name}", (*linear_out(), strategy), {"masks": masks((3, 6, 4), (0,))}
    for name, strategy in [("reverse", REVERSE), ("forward", FORWARD)]:
        yield "mlp_jacobian", f"masked-{name}", (*deep(), 0, strategy), {"masks": on}
    yield "mlp_laplacian", "gradient", (*deep(out="identity"), True), {}
    yield "mlp_laplacian", "thin-top", (*deep(out="identity"), False), {}
    directions = torch.eye(3, dtype=torch.float64)[[2, 0, 1]].unsqueeze(0)
    yield "mlp_laplacian", "directions", (*deep(), True, directions, 1), {}
    yield "mlp_laplacian", "chosen-columns", (*deep(), False, directions[:, :2], 2), {}
    yield "mlp_jacobian_diagonal", "forward", (*square(), CARRY_FORWARD), {}
    yield "mlp_jacobian_diagonal", "gram1", (*mlp((3, 4, 3), ["tanh", "sigmoid"]), DIAGONAL_GRAM1), {}
    yield "mlp_jacobian_diagonal", "trace2", (*square(), TRACE_GRAM2), {}
    p = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    yield "mlp_jacobian_diagonal", "projections", (*square(), CARRY_FORWARD, p), {}
    # residual skips (csrc/mlp_laplacian.h): blocks of one and two layers, two skips from one carry, a skip
    # above the thin last layer, a skip into the output, with tiles
    blocks = lambda out="identity": mlp((3, 4, 4, 4, 3), ["tanh", "softplus", "sigmoid", out])  # noqa: E731
    for gradient in (True, False):
        yield "mlp_laplacian", f"residual-gradient={gradient}", (*blocks(), gradient), {"residual": [-1, 1, 1, -1]}
    yield "mlp_laplacian", "residual-output", (*blocks(), False, None, 2), {"residual": [-1, 1, -1, 0], "tile": 2}
    yield "mlp_jacobian_diagonal", "residual-forward", (*blocks("tanh"), CARRY_FORWARD), {"residual": [-1, 1, 1, -1]}
    yield "mlp_jacobian_diagonal", "residual-output", (*blocks(), CARRY_FORWARD), {"residual": [-1, -1, 2, 0],
                                                                                  "tile": 2}
    yield "mlp_jacobian_diagonal", "residual-projections", (*blocks(), CARRY_FORWARD, p), {"residual": [-1, 1, 1, 0]}
    # residual skips in the Jacobian family (csrc/mlp_jacobian.h; reverse and forward): with projections, masks,
    # tiles, and the carries at a hidden layer (their gradients pass the skips back)
    skips = [-1, 1, 1, 0]
    v3 = torch.randint(0, 2, (3, 2, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    yield "mlp_jacobian_frobenius", "residual", (*blocks("tanh"), REVERSE), {"residual": skips}
    yield "mlp_jacobian_frobenius", "residual-projections", (*blocks(), REVERSE, v3), {"residual": skips, "tile": 2}
    yield "mlp_jacobian_frobenius", "residual-masked", (*blocks(), REVERSE), {
        "residual": skips, "masks": masks((3, 4, 4, 4, 3), (1, 2))}
    yield "mlp_jacobian_frobenius", "residual-forward", (*blocks(), FORWARD), {"residual": skips, "tile": 2}
    for layer in (0, 2):
        for name, strategy in [("reverse", REVERSE), ("forward", FORWARD)]:
            yield "mlp_jacobian", f"residual-{name}-layer{layer}", (*blocks("tanh"), layer, strategy), {"residual": skips}
    # conditioning inside the net (csrc/mlp_laplacian.h): per-sample biases and gates, differentiable
    # (positional), on hidden layers and on the last one (which keeps every row through it then)
    deep_widths, square_widths = (3, 4, 5, 2), (3, 4, 5, 3)
    lap_on = (conditioning(deep_widths, (0, 1)), conditioning(deep_widths, (1,), gate=True))
    yield "mlp_laplacian", "conditioned-gradient", (*deep(), True, None, -1, *lap_on), {}
    yield "mlp_laplacian", "conditioned-thin-top", (*deep(out="identity"), False, None, -1, *lap_on), {"tile": 2}
    top_on = (conditioning(deep_widths, (2,)), conditioning(deep_widths, (0, 2), gate=True))
    yield "mlp_laplacian", "conditioned-top", (*deep(out="identity"), False, None, -1, *top_on), {}
    sq_on = (conditioning(square_widths, (1,)), conditioning(square_widths, (0,), gate=True))
    yield "mlp_jacobian_diagonal", "conditioned-forward", (*square(), CARRY_FORWARD, None, *sq_on), {}
    sq_top = (conditioning(square_widths, (2,)), conditioning(square_widths, (1, 2), gate=True))
    yield "mlp_jacobian_diagonal", "conditioned-top", (*square(), CARRY_FORWARD, None, *sq_top), {"tile": 2}
    yield "mlp_jacobian_diagonal", "conditioned-projections", (*square(), CARRY_FORWARD, p, *sq_on), {}
    # conditioning inside the net in the Jacobian family (csrc/mlp_jacobian.h): per-sample biases and gates
    # (positional after the masks, differentiable); a gate is one more diagonal of J (an identity layer's d
    # then), on the last layer too; with every strategy that takes it, projections, tiles, masks and skips
    jac_on = (conditioning(deep_widths, (0, 2)), conditioning(deep_widths, (1, 2), gate=True))
    for name, strategy in [("reverse", REVERSE), ("forward", FORWARD), ("reverse_gram", REVERSE_GRAM)]:
        yield "mlp_jacobian_frobenius", f"conditioned-{name}", (*deep(), strategy, None, None, *jac_on), {}
    yield "mlp_jacobian_frobenius", "conditioned-projections", (*deep(), REVERSE, v, None, *jac_on), {"tile": 2}
    gated_identity = mlp((3, 4, 5, 2), ["identity", "softplus", "sigmoid"])
    yield "mlp_jacobian_frobenius", "conditioned-identity", (*gated_identity, REVERSE, None, None, None,
                                                             conditioning(deep_widths, (0,), gate=True)), {}
    linear_on = (conditioning((3, 6, 4), (0, 1)), conditioning((3, 6, 4), (0,), gate=True))
    for name, strategy in [("gram1", GRAM1), ("forward_gram", FORWARD_GRAM)]:
        yield "mlp_jacobian_frobenius", f"conditioned-{name}", (*linear_out(), strategy, None, None, *linear_on), {}
    blocks_widths = (3, 4, 4, 4, 3)
    blocks_on = (conditioning(blocks_widths, (1, 3)), conditioning(blocks_widths, (0, 2), gate=True))
    yield "mlp_jacobian_frobenius", "conditioned-residual-masked", (
        *blocks(), REVERSE, None, masks(blocks_widths, (1, 2)), *blocks_on), {"residual": skips}
    for layer in (0, 2):
        for name, strategy in [("reverse", REVERSE), ("forward", FORWARD)]:
            yield "mlp_jacobian", f"conditioned-{name}-layer{layer}", (*deep(), layer, strategy, None, *jac_on), {}
    yield "mlp_jacobian", "conditioned-residual", (*blocks("tanh"), 0, FORWARD, None, *blocks_on), {"residual": skips}
    gram_widths = (6, 3, 4, 2)
    yield "mlp_jacobian", "conditioned-gram", (*mlp(gram_widths, ["tanh", "tanh", "sigmoid"]), 0, REVERSE_GRAM, None,
                                               conditioning(gram_widths, (0,)), conditioning(gram_widths, (0, 2),
                                                                                             gate=True)), {"gram": True}
    # dropout masks on the forward-carry ops (constants, positional after the gates): on hidden layers
    # (below the Laplacian's thin top), on the last layer (which keeps every row through it then), with
    # skips, and beside per-sample biases and gates
    lap_masks, deep_top = masks(deep_widths, (0, 1)), masks(deep_widths, (1, 2))
    yield "mlp_laplacian", "masked-gradient", (*deep(), True), {"masks": lap_masks}
    yield "mlp_laplacian", "masked-thin-top", (*deep(out="identity"), False), {"masks": lap_masks, "tile": 2}
    yield "mlp_laplacian", "masked-top", (*deep(out="identity"), False), {"masks": deep_top}
    yield "mlp_laplacian", "masked-conditioned", (*deep(), True, None, -1, *lap_on, lap_masks), {}
    block_masks = masks((3, 4, 4, 4, 3), (1, 2))
    yield "mlp_laplacian", "masked-residual", (*blocks(), False), {"residual": [-1, 1, 1, -1], "masks": block_masks}
    sq_masks = masks(square_widths, (0, 1))
    yield "mlp_jacobian_diagonal", "masked-forward", (*square(), CARRY_FORWARD), {"masks": sq_masks}
    yield "mlp_jacobian_diagonal", "masked-top", (*square(), CARRY_FORWARD), {"masks": masks(square_widths, (1, 2)),
                                                                              "tile": 2}
    yield "mlp_jacobian_diagonal", "masked-conditioned-projections", (*square(), CARRY_FORWARD, p, *sq_on, sq_masks), {}
    yield "mlp_jacobian_diagonal", "masked-residual", (*blocks(), CARRY_FORWARD), {"residual": [-1, 1, 1, 0],
                                                                                   "masks": block_masks}
    x, weights, biases, _, _ = mlp((4, 4, 4), ["smooth_leaky_relu", "identity"], bias=[True, False])
    with torch.no_grad():
        for w in weights:
            w.add_(torch.eye(4, dtype=torch.float64))  # invertible
    flow = (x, weights, biases, [act.SMOOTH_LEAKY_RELU, act.IDENTITY], [0.3, 0.0, 0.0, 0.0])
    for relative in (False, True):
        yield "mlp_flow", f"relative={relative}", (*flow, relative, True), {}
    yield "activation_derivatives", "gelu", (torch.randn(3, 5, dtype=torch.float64), act.GELU, 0.0, 0.0), {}


def _backward_sample(op, label, args, kwargs):
    """The backward op's sample built from a forward sample's outputs, or None."""
    if op == "activation_derivatives":
        return None
    with torch.no_grad():
        outputs = getattr(OPS, op)(*args, **kwargs)
    saved = list(outputs[-1])
    if op == "mlp_jacobian_frobenius":
        x, w, b, codes, params, strategy, *proj = args
        grad_y, grad_sq = _grads_like(outputs[:2])
        return ("mlp_jacobian_backward", label, (grad_y, grad_sq, None, x, w, b, codes, params, 0, strategy, saved, [],
                                                 *proj), kwargs)
    if op == "mlp_jacobian":
        if kwargs.get("gram"):
            return None
        x, w, b, codes, params, layer, strategy, *factors = args  # masks, sample_biases, gates
        grad_y, grad_jac = _grads_like(outputs[:2])
        grad_carries = []
        if strategy == REVERSE:  # the carries are differentiable outputs too
            grad_carries = [torch.randn_like(c).requires_grad_() for c in saved[first_carry_index(len(w)):]]
        return ("mlp_jacobian_backward", label, (grad_y, None, grad_jac, x, w, b, codes, params, layer, strategy,
                                                 saved, grad_carries, *([None, *factors] if factors else [])), kwargs)
    if op == "mlp_laplacian":
        x, w, b, codes, params, gradient, *rest = args
        grad_y, grad_grad, grad_lap = _grads_like([outputs[0], outputs[1] if gradient else None, outputs[2]])
        return ("mlp_laplacian_backward", label, (grad_y, grad_grad, grad_lap, x, w, b, codes, params, gradient, saved,
                                                  *rest), kwargs)
    if op == "mlp_jacobian_diagonal":
        x, w, b, codes, params, strategy, *proj = args
        grad_y, grad_out = _grads_like(outputs[:2])
        return ("mlp_jacobian_diagonal_backward", label, (grad_y, grad_out, x, w, b, codes, params, strategy, saved,
                                                          *proj), kwargs)
    if op == "mlp_flow":
        x, w, b, codes, params, relative, _ = args
        grads = [g.detach() for g in _grads_like(outputs[:3])]
        return ("mlp_flow_backward", label, (*grads, x.detach(), [t.detach() for t in w], [t.detach() for t in b],
                                             codes, params, saved, relative, True), kwargs)
    raise AssertionError(f"no backward sample for {op}")


def samples():
    forward = list(_forward_samples())
    backward = [s for s in (_backward_sample(*f) for f in forward) if s is not None]
    return forward + backward


SAMPLES = samples()
FIRST = {}
for _op, _label, _, _ in SAMPLES:
    FIRST.setdefault(_op, _label)


def test_every_registered_op_has_samples():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("jacext::")}
    assert registered - UTILITY_OPS == {op for op, *_ in SAMPLES}


@pytest.mark.parametrize("op, label, args, kwargs", SAMPLES, ids=[f"{op}-{label}" for op, label, *_ in SAMPLES])
def test_opcheck(op, label, args, kwargs):
    utils = {} if FIRST[op] == label else {"test_utils": FAST}
    torch.library.opcheck(getattr(OPS, op).default, args, kwargs, **utils)


DIFFERENTIABLE = [s for s in SAMPLES if s[0] in ("mlp_jacobian_frobenius", "mlp_jacobian", "mlp_laplacian",
                                                   "mlp_jacobian_diagonal")]


def _as_function(op, args, kwargs):
    """fn(x, *weights, *present biases) -> the op's tensor outputs other than `saved`."""
    x, weights, biases, *config = args
    present = [i for i, b in enumerate(biases) if b.numel()]

    def fn(x, *flat):
        ws = list(flat[:len(weights)])
        bs = list(biases)
        for i, b in zip(present, flat[len(weights):]):
            bs[i] = b
        outputs = getattr(OPS, op)(x, ws, bs, *config, **kwargs)[:-1]
        return tuple(o for o in outputs if o.numel())

    return fn, (x, *weights, *[biases[i] for i in present])


@pytest.mark.parametrize("op, label, args, kwargs", DIFFERENTIABLE,
                         ids=[f"{op}-{label}" for op, label, *_ in DIFFERENTIABLE])
def test_gradcheck_and_gradgradcheck(op, label, args, kwargs):
    fn, inputs = _as_function(op, args, kwargs)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("op", ["mlp_jacobian_frobenius", "mlp_jacobian", "mlp_laplacian", "mlp_jacobian_diagonal",
                                "mlp_flow"])
def test_compiled_fullgraph_equals_eager(op):
    _, _, args, kwargs = next(s for s in SAMPLES if s[0] == op)
    args = [a.detach() if isinstance(a, torch.Tensor) else [t.detach() for t in a]
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args]
    call = lambda *a: getattr(OPS, op)(*a, **kwargs)[:-1]  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), call(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["mlp_jacobian_frobenius", "mlp_jacobian", "mlp_laplacian", "mlp_jacobian_diagonal",
                                "mlp_flow"])
def test_bad_inputs_raise_clear_errors(op):
    _, _, args, kwargs = next(s for s in SAMPLES if s[0] == op)
    x, weights, biases, *config = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    weights = [w.detach() for w in weights]
    biases = [b.detach() for b in biases]
    with pytest.raises(RuntimeError, match="jacext"):  # integer input
        getattr(OPS, op)(x.long(), weights, biases, *config, **kwargs)
    with pytest.raises(RuntimeError, match="jacext"):  # mismatched widths
        getattr(OPS, op)(x[:, 1:], weights, biases, *config, **kwargs)
    with pytest.raises(RuntimeError, match="jacext"):  # mixed dtypes
        getattr(OPS, op)(x.float(), weights, biases, *config, **kwargs)
    empty = getattr(OPS, op)(x[:0], weights, biases, *config, **kwargs)
    assert empty[0].shape[0] == 0
