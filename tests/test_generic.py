"""jacext.generic, the generic path (method="autograd"), and jacext._wrt: every quantity for
any module against torch.func references in float64 (vmap(jacrev), hessian), with wrt,
conditioning inputs, CNNs, LayerNorm, Dropout in train(), max_memory chunking and empty batches."""
import collections
import functools
import gc
import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import jacext
from jacext import generic
from jacext._wrt import resolve_wrt

DT = torch.float64


class FieldOnXT(nn.Module):
    """A user's module with a conditioning input: forward(x, t) on cat([x, t])."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x, t):
        return self.net(torch.cat([x, t], 1))


def make(kind, batch=3):
    """(model, x, cond) in float64, x and cond requiring grad."""
    torch.manual_seed(0)
    cond = ()
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(batch, 4)
    elif kind == "cond":
        model, x, cond = FieldOnXT(), torch.randn(batch, 3), (torch.randn(batch, 1),)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 4),
                              nn.ReLU(), nn.Linear(4, 3))
        x = torch.randn(batch, 1, 8, 8)
    elif kind == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(batch, 4)
    else:
        raise ValueError(kind)
    return model.to(DT), x.to(DT).requires_grad_(), tuple(c.to(DT).requires_grad_() for c in cond)


KINDS = ["mlp", "cond", "cnn", "layernorm"]
WRTS = [None, 2, slice(1, None, 2), [2, 0], [1]]


def columns(wrt, n):
    """The chosen features, written out independently of resolve_wrt."""
    if wrt is None:
        return list(range(n))
    if isinstance(wrt, int):
        return list(range(wrt))
    if isinstance(wrt, slice):
        return list(range(n))[wrt]
    return list(wrt)


class NormFormula(nn.Module):
    """A normalization module written out in elementary ops, sharing the module's parameters:
    the references' stand-in, since torch's fused normalization ops have wrong third derivatives
    (pytorch/pytorch#175754), which the reference's derivatives of second derivatives reach."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, h):
        norm = self.norm
        channel = (-1,) + (1,) * (h.dim() - 2)
        if isinstance(norm, nn.LayerNorm):
            dims = tuple(range(-len(norm.normalized_shape), 0))
            return standardized(h, dims, norm.eps) * norm.weight + norm.bias
        if isinstance(norm, nn.GroupNorm):
            grouped = standardized(h.reshape(len(h), norm.num_groups, -1), (-1,), norm.eps).reshape(h.shape)
            return grouped * norm.weight.view(channel) + norm.bias.view(channel)
        if isinstance(norm, nn.RMSNorm):
            eps = torch.finfo(h.dtype).eps if norm.eps is None else norm.eps  # None: F.rms_norm's default
            return h / (h.square().mean(-1, keepdim=True) + eps).sqrt() * norm.weight
        if isinstance(norm, nn.InstanceNorm1d):
            return standardized(h, (2,), norm.eps) * norm.weight.view(channel) + norm.bias.view(channel)
        if isinstance(norm, nn.BatchNorm1d):
            scale = (norm.running_var + norm.eps).sqrt()
            return (h - norm.running_mean.view(channel)) / scale.view(channel) * norm.weight.view(channel) \
                + norm.bias.view(channel)
        raise TypeError(type(norm))


def standardized(h, dims, eps):
    mean = h.mean(dims, keepdim=True)
    return (h - mean) / ((h - mean).square().mean(dims, keepdim=True) + eps).sqrt()


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.BatchNorm1d)


def with_norm_formulas(model):
    """The model with its normalization modules replaced by NormFormula (same parameters)."""
    if isinstance(model, NORMS):
        return NormFormula(model)
    if isinstance(model, nn.Sequential):
        return nn.Sequential(*(with_norm_formulas(module) for module in model))
    return model


def per_sample(model, x, cond):
    """one(x_b flattened, *cond_b) -> y_b flattened, and the flattened batch."""
    model = with_norm_formulas(model)
    shape = x.shape[1:]

    def one(xf, *c):
        return model(xf.view(1, *shape), *(ci.unsqueeze(0) for ci in c)).reshape(-1)

    return one, x.reshape(len(x), -1)


def ref_jacobian(model, x, cond):
    """(y, J) (B, m, n) over every feature, by vmap(jacrev)."""
    one, flat = per_sample(model, x, cond)
    return vmap(one)(flat, *cond), vmap(jacrev(one))(flat, *cond)


def ref_hessian(model, x, cond):
    """(B, m, n, n) by vmap(hessian)."""
    one, flat = per_sample(model, x, cond)
    return vmap(hessian(one))(flat, *cond)


def ref_quantity(name, model, x, cond, wrt, computed=None):
    """(y, quantity) of generic.<name> from the torch.func references, or from `computed`:
    (y, J, Hessian) over every feature, computed once."""
    y, jac, hess = computed if computed is not None else (*ref_jacobian(model, x, cond), None)
    idx = columns(wrt, jac.shape[2])
    sub = jac[:, :, idx]
    if name == "jacobian":
        return y, sub
    if name == "jacobian_frobenius":
        return y, sub.square().sum((1, 2))
    if name == "jacobian_gram":
        return y, sub @ sub.transpose(1, 2)
    if name == "jacobian_spectral_norm":
        return y, torch.linalg.matrix_norm(sub, 2)
    if name == "laplacian":
        hess = ref_hessian(model, x, cond) if hess is None else hess
        return y, jac, hess[:, :, idx, idx].sum(-1)
    if name == "divergence":
        return y, sub.diagonal(dim1=1, dim2=2).sum(1)
    if name == "jacobian_diagonal":
        return y, sub.diagonal(dim1=1, dim2=2)
    raise ValueError(name)


def generic_quantity(name, model, x, cond, wrt, **options):
    if name == "laplacian":
        return generic.laplacian(model, x, *cond, wrt=wrt, return_gradient=True, **options)
    return getattr(generic, name)(model, x, *cond, wrt=wrt, **options)


FIRST_ORDER = ["jacobian", "jacobian_frobenius", "jacobian_gram", "jacobian_spectral_norm"]
ALL = FIRST_ORDER + ["laplacian"]


def weighted_sum(outputs, seed=1):
    """A scalar from every output with fixed random weights (so each output's gradient counts)."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)


def gradients(scalar, model, x, cond):
    param = next(p for p in model.parameters())
    return torch.autograd.grad(scalar, [x, *cond, param])


@functools.lru_cache(maxsize=None)
def full_reference(kind):
    """(y, J, Hessian) over every feature for make(kind), without graph: computed once."""
    model, x, cond = make(kind)
    with torch.no_grad():
        return (*ref_jacobian(model, x, cond), ref_hessian(model, x, cond))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrt", WRTS, ids=repr)
def test_values_against_torch_func(kind, wrt):
    model, x, cond = make(kind)
    for name in ALL:
        got = generic_quantity(name, model, x, cond, wrt)
        want = ref_quantity(name, model, x, cond, wrt, full_reference(kind))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=f"{name} {kind} wrt={wrt!r}")


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_against_torch_func(kind):
    """Gradients w.r.t. x, the conditioning input and a parameter, for every quantity."""
    model, x, cond = make(kind)
    wrt = [2, 0]
    for name in ALL:
        got = gradients(weighted_sum(generic_quantity(name, model, x, cond, wrt)), model, x, cond)
        want = gradients(weighted_sum(ref_quantity(name, model, x, cond, wrt)), model, x, cond)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=f"{name} {kind}")


SQUARE = [("mlp", 3), ("mlp", [2, 0, 3]), ("mlp", slice(1, None)), ("cond", None), ("cnn", [5, 60, 9]),
          ("layernorm", [3, 1, 2])]


@pytest.mark.parametrize("kind,wrt", SQUARE, ids=repr)
def test_divergence_and_diagonal(kind, wrt):
    """Output i paired with the i-th chosen feature: values and gradients."""
    model, x, cond = make(kind)
    for name in ("divergence", "jacobian_diagonal"):
        got = generic_quantity(name, model, x, cond, wrt)
        want = ref_quantity(name, model, x, cond, wrt)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        for g, w in zip(gradients(weighted_sum(got), model, x, cond), gradients(weighted_sum(want), model, x, cond)):
            torch.testing.assert_close(g, w)


def test_divergence_needs_as_many_outputs_as_chosen_features():
    model, x, _ = make("mlp")
    for function in (generic.divergence, generic.jacobian_diagonal):
        with pytest.raises(ValueError, match="its 4 chosen features to 3 outputs"):
            function(model, x)
        with pytest.raises(ValueError, match="its 2 chosen features to 3 outputs"):
            function(model, x, wrt=[0, 1])


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_estimates(distribution):
    """The terms with the projections jacext.random_projections draws from the same seed:
    ||v^T J||^2 and v^T J v (J from torch.func), their mean and variance."""
    model, x, _ = make("mlp", batch=4)
    n_proj = 5
    for name, columns_used in (("jacobian_frobenius", 4), ("divergence", 3)):
        sub = ref_jacobian(model, x, ())[1][:, :, :columns_used]
        v = jacext.random_projections(4, n_proj, 3, distribution=distribution,
                                      generator=torch.Generator().manual_seed(7), dtype=DT)
        rows = v @ sub
        terms = rows.square().sum(2) if name == "jacobian_frobenius" else (rows * v).sum(2)
        wrt = None if name == "jacobian_frobenius" else 3
        y, est, var = getattr(generic, name)(model, x, wrt=wrt, method="hutchinson", n_proj=n_proj,
                                             generator=torch.Generator().manual_seed(7), distribution=distribution,
                                             return_variance=True)
        torch.testing.assert_close(est, terms.mean(1))
        torch.testing.assert_close(var, terms.var(1) / n_proj)
        for g, w in zip(gradients(est.sum(), model, x, ()), gradients(terms.mean(1).sum(), model, x, ())):
            torch.testing.assert_close(g, w)


def test_estimator_options_are_checked():
    model, x, _ = make("mlp")
    with pytest.raises(ValueError, match="apply to method='hutchinson' only"):
        generic.jacobian_frobenius(model, x, n_proj=4)
    with pytest.raises(ValueError, match="unknown method 'power'"):
        generic.divergence(model, x, wrt=3, method="power")
    with pytest.raises(ValueError, match="n_proj must be a positive integer"):
        generic.jacobian_frobenius(model, x, method="hutchinson", n_proj=0)
    with pytest.raises(ValueError, match="return_variance needs n_proj >= 2"):
        generic.jacobian_frobenius(model, x, method="hutchinson", return_variance=True)


def test_input_gradients_of_directions_that_depend_on_the_output():
    """u_j^T J for the large-margin loss's directions u = S_y - S_j (rows of the softmax
    Jacobian at the realized output): values and the gradient of their norms."""
    model, x, _ = make("mlp", batch=4)
    target = torch.tensor([0, 2, 1, 0])

    def directions(logits):
        s = torch.softmax(logits, 1)
        jac_softmax = torch.diag_embed(s) - s.unsqueeze(2) * s.unsqueeze(1)
        others = torch.tensor([[1, 2], [0, 1], [2, 0], [2, 1]])
        return jac_softmax[torch.arange(4), target].unsqueeze(1) - jac_softmax.gather(
            1, others.unsqueeze(2).expand(-1, -1, 3))

    lin = generic.ModelJacobian(model, x, wrt=[3, 1])
    rows = lin.input_gradients(directions(lin.y))
    y, jac = ref_jacobian(model, x, ())
    want = directions(y) @ jac[:, :, [3, 1]]
    torch.testing.assert_close(rows, want)
    with torch.no_grad():  # held constant (use_approximation) while y keeps its graph
        constant = lin.input_gradients(directions(lin.y))
    assert not constant.requires_grad and lin.output().requires_grad
    torch.testing.assert_close(constant, want.detach())
    for g, w in zip(gradients(rows.norm(dim=2).sum(), model, x, ()), gradients(want.norm(dim=2).sum(), model, x, ())):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match=r"directions must be a tensor of shape \(4, r, 3\)"):
        lin.input_gradients(torch.ones(4, 3))


@pytest.mark.parametrize("max_memory", [None, 1])
@pytest.mark.parametrize("name", ALL + ["divergence", "jacobian_diagonal"])
def test_gradcheck_and_gradgradcheck(name, max_memory):
    """Each quantity on a small net with a conditioning input, whole and in chunks (recomputed)."""
    model, x, (t,) = make("cond", batch=2)
    for p in model.parameters():
        p.requires_grad_(False)  # x and t are the checked inputs; the parameters' gradients are tested above
    wrt = None if name in ("divergence", "jacobian_diagonal") else [2, 0]

    def function(x, t):
        return generic_quantity(name, model, x, (t,), wrt, max_memory=max_memory)

    assert torch.autograd.gradcheck(function, (x, t))
    assert torch.autograd.gradgradcheck(function, (x, t))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_max_memory_chunks_give_the_same_values_and_gradients(kind):
    """max_memory=1 byte: one row a chunk (the chunks after the first recomputed in the backward)."""
    model, x, cond = make(kind)
    names = ALL + (["divergence", "jacobian_diagonal"] if kind == "cnn" else [])
    wrt = [5, 60, 9] if kind == "cnn" else [2, 0]
    for name in names:
        whole = generic_quantity(name, model, x, cond, wrt)
        chunked = generic_quantity(name, model, x, cond, wrt, max_memory=1)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(gradients(weighted_sum(whole), model, x, cond), gradients(weighted_sum(chunked), model, x, cond)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        generic.jacobian(model, x, max_memory=0)


def test_max_memory_sets_the_chunks(monkeypatch):
    """One row a chunk at 1 byte (each chunk after the first recomputed), one chunk for a
    budget above everything, and none recomputed without a graph."""
    model, x, _ = make("mlp")
    recomputed = []
    original = generic._Recomputed.apply
    monkeypatch.setattr(generic._Recomputed, "apply", staticmethod(lambda *args: recomputed.append(1) or original(*args)))
    generic.jacobian(model, x, max_memory=1)
    assert len(recomputed) == 3 - 1
    recomputed.clear()
    generic.laplacian(model, x, wrt=[1, 2], max_memory=1)
    assert len(recomputed) == 3 * 2 - 1
    recomputed.clear()
    generic.jacobian(model, x, max_memory=2 ** 40)
    with torch.no_grad():
        generic.jacobian(model, x, max_memory=1)
    assert not recomputed


class HeldBytes:
    """The bytes of the storages that live graphs hold, through saved-tensor hooks: a storage's
    bytes count (once) from the first packing of a tensor on it until the last graph that saved
    one is freed."""

    def __init__(self):
        self.held, self.users = 0, collections.Counter()

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not self.users[key]:
            self.held += storage.nbytes()
        self.users[key] += 1
        holder = Holder(tensor.detach())  # (the tensor itself, an output, would tie its node in a cycle)
        weakref.finalize(holder, self._release, key, storage.nbytes())
        return holder

    def _release(self, key, size):
        self.users[key] -= 1
        if not self.users[key]:
            self.held -= size

    @staticmethod
    def unpack(holder):
        return holder.tensor


class Holder:
    def __init__(self, tensor):
        self.tensor = tensor


def test_max_memory_lowers_the_memory_the_graph_holds():
    """With a graph, the chunks after the first hold none: the bytes the outputs' graph holds
    fall with the budget (and the values do not change)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16)).to(DT)
    x = torch.randn(32, 4, dtype=DT, requires_grad=True)
    held = {}
    for max_memory in (None, 1):
        counter = HeldBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            y, sq = generic.jacobian_frobenius(model, x, max_memory=max_memory)
        gc.collect()
        held[max_memory] = counter.held
        torch.autograd.grad(sq.sum(), x)  # the graph is whole
    assert held[1] < held[None] / 4, held


def test_under_no_grad_results_carry_no_graph():
    model, x, cond = make("cond")
    with torch.no_grad():
        for name in ALL:
            outputs = generic_quantity(name, model, x, cond, [1], max_memory=1)
            assert not any(o.requires_grad for o in outputs), name
            for g, w in zip(outputs, ref_quantity(name, model, x, cond, [1])):
                torch.testing.assert_close(g, w)


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.drop, self.last = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        return self.last(self.drop(torch.tanh(self.first(x))))


def test_dropout_in_train_draws_the_modules_masks():
    """y equals model(x) under the same seed, the random state after it is model(x)'s, and every
    quantity is that of the network with the drawn masks held fixed (recorded by a hook), with
    or without chunks."""
    torch.manual_seed(0)
    model = DropoutNet().to(DT).train()
    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    masks = []
    hook = model.drop.register_forward_hook(lambda module, inputs, output: masks.append((output / inputs[0]).detach()))
    torch.manual_seed(11)
    y_model = model(x)
    after_model = torch.rand(3)
    hook.remove()
    (mask,) = masks
    assert (mask == 0).any() and (mask == 2).any()

    def masked(xi, mi):
        return model.last(torch.tanh(model.first(xi)) * mi)

    for max_memory in (None, 1):
        jac = vmap(jacrev(masked))(x, mask)
        lap = vmap(hessian(masked))(x, mask).diagonal(dim1=2, dim2=3).sum(-1)
        torch.manual_seed(11)
        y, got = generic.jacobian(model, x, max_memory=max_memory)
        torch.testing.assert_close(torch.rand(3), after_model)
        torch.testing.assert_close(y, y_model, rtol=0, atol=0)
        torch.testing.assert_close(got, jac)
        torch.manual_seed(11)
        _, sq = generic.jacobian_frobenius(model, x, max_memory=max_memory)
        want = jac.square().sum((1, 2))
        torch.testing.assert_close(sq, want)
        for g, w in zip(gradients(sq.sum(), model, x, ()), gradients(want.sum(), model, x, ())):
            torch.testing.assert_close(g, w)
        torch.manual_seed(11)
        _, got_lap = generic.laplacian(model, x, max_memory=max_memory)
        torch.testing.assert_close(got_lap, lap)
        for g, w in zip(gradients(got_lap.sum(), model, x, ()), gradients(lap.sum(), model, x, ())):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("norm", [nn.LayerNorm((4, 2)), nn.GroupNorm(2, 4), nn.RMSNorm(2),
                                  nn.InstanceNorm1d(4, affine=True), nn.BatchNorm1d(4)], ids=lambda n: type(n).__name__)
def test_third_derivatives_through_normalization_layers(norm):
    """The Laplacian's gradient (third derivatives of the model) through each normalization
    module, against torch.func on the written-out formula: the generic path runs the formulas,
    since the fused ops' third derivatives are wrong."""
    torch.manual_seed(0)
    if isinstance(norm, nn.BatchNorm1d):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.eval()
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    model = nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (4, 2)), norm, nn.Flatten(), nn.Tanh(),
                          nn.Linear(8, 2)).to(DT)
    x = torch.randn(3, 3, dtype=DT, requires_grad=True)
    torch.testing.assert_close(model(x), with_norm_formulas(model)(x))
    got = generic.laplacian(model, x, wrt=[2, 0])
    want = ref_quantity("laplacian", model, x, (), [2, 0])[::2]
    torch.testing.assert_close(got[1], want[1])
    inputs = [x, model[0].weight, next(norm.parameters())]
    for g, w in zip(torch.autograd.grad(weighted_sum(got), inputs), torch.autograd.grad(weighted_sum(want), inputs)):
        torch.testing.assert_close(g, w)


def test_batchnorm_in_train_is_refused_and_runs_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    model(x)  # some running statistics
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) is in train\(\) mode: .* per-sample "
                                         r"Jacobians are not defined; call model.eval\(\)"):
        generic.jacobian_frobenius(model, x)
    model.eval()
    torch.testing.assert_close(generic.jacobian(model, x, wrt=[3])[1], ref_jacobian(model, x, ())[1][:, :, [3]])
    no_stats = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False)).to(DT).eval()
    with pytest.raises(ValueError, match="no running statistics .* even in eval"):
        generic.jacobian(no_stats, x)
    per_sample_norm = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.InstanceNorm1d(2, affine=True),
                                    nn.Flatten()).to(DT).train()
    torch.testing.assert_close(generic.jacobian(per_sample_norm, x)[1], ref_jacobian(per_sample_norm, x, ())[1])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    model, x, cond = make(kind, batch=0)
    m, n = 3, math.prod(x.shape[1:])
    shapes = {"jacobian": [(0, m, 2)], "jacobian_frobenius": [(0,)], "jacobian_gram": [(0, m, m)],
              "jacobian_spectral_norm": [(0,)], "laplacian": [(0, m, n), (0, m)]}
    for name, expected in shapes.items():
        for max_memory in (None, 1):
            y, *outputs = generic_quantity(name, model, x, cond, [1, 0], max_memory=max_memory)
            assert y.shape == (0, m)
            assert [tuple(o.shape) for o in outputs] == expected, name
    _, div = generic.divergence(model, x, *cond, wrt=[2, 0, 1])
    _, diag = generic.jacobian_diagonal(model, x, *cond, wrt=[2, 0, 1])
    _, est = generic.divergence(model, x, *cond, wrt=[2, 0, 1], method="hutchinson", n_proj=2)
    assert div.shape == (0,) and diag.shape == (0, 3) and est.shape == (0,)


def test_bad_calls():
    model, x, _ = make("mlp")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        generic.jacobian(model, x.tolist())
    with pytest.raises(ValueError, match=r"x must have shape \(batch, ...\)"):
        generic.jacobian(model, x[0])
    with pytest.raises(TypeError, match="floating-point"):
        generic.jacobian(model, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="must return one tensor of shape"):
        generic.jacobian(lambda x: (x, x), x)
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        generic.laplacian(model, x, wrt=[4])


@pytest.mark.parametrize("wrt,n,expected", [
    (None, 5, None), (3, 5, [0, 1, 2]), (5, 5, [0, 1, 2, 3, 4]), (slice(1, None, 2), 5, [1, 3]),
    (slice(-2, None), 5, [3, 4]), ([4, 0, 2], 5, [4, 0, 2]), ((1,), 5, [1]), (range(2, 4), 5, [2, 3]),
    (torch.tensor([3, 1]), 5, [3, 1]), (np.array([2]), 5, [2]), ([np.int64(1)], 5, [1])], ids=repr)
def test_resolve_wrt(wrt, n, expected):
    got = resolve_wrt(wrt, n)
    if expected is None:
        assert got is None
    else:
        assert got.dtype == torch.int64 and got.tolist() == expected


@pytest.mark.parametrize("wrt,error,match", [
    (0, ValueError, r"wrt=0 .* must be in \[1, 5\]"), (6, ValueError, r"must be in \[1, 5\]"),
    (-1, ValueError, r"must be in \[1, 5\]"),
    ([], ValueError, "selects no feature: got an empty list"), (slice(3, 3), ValueError, "selects no feature"),
    ([1, 1, 2], ValueError, r"repeated feature indices \[1\]"), ([0, 5], ValueError, r"outside \[0, 4\].*\[5\]"),
    ([-1], ValueError, r"outside \[0, 4\]"),
    (True, TypeError, "got the bool True"), ([True, 0], TypeError, "integer feature indices; got bool"),
    (1.5, TypeError, "got float 1.5"), ([0, 1.0], TypeError, "integer feature indices; got float 1.0"),
    ("01", TypeError, "got str"), (slice(0.5, 2), TypeError, "integer start, stop and step"),
    (torch.tensor([0.0]), TypeError, "1-D integer tensor"), (torch.tensor(2), TypeError, "1-D integer tensor"),
    (object(), TypeError, "got object")], ids=repr)
def test_resolve_wrt_refuses(wrt, error, match):
    with pytest.raises(error, match=match):
        resolve_wrt(wrt, 5)


@pytest.mark.parametrize("max_memory", [None, 1])
def test_gradients_at_named_points(max_memory):
    """ModelJacobian(points=...): u^T dy/dh at the input and at submodule outputs, from one forward,
    against torch.func (the model split at the points), values and the gradient of their norms;
    chunked (max_memory=1: one row a chunk, recomputed) as well."""
    model, x, _ = make("cnn", batch=3)
    u = torch.randn(3, 2, 3, dtype=DT)
    lin = generic.ModelJacobian(model, x, points=(None, "1", "4"), max_memory=max_memory)
    got = lin.gradients(u)
    assert [g.shape for g in got] == [(3, 2, 64), (3, 2, 2 * 6 * 6), (3, 2, 4)]

    def tail(start):  # the model from the output of module `start` on, per sample
        return lambda h: model[start + 1:](h.unsqueeze(0)).squeeze(0)

    h1 = model[:2](x)
    h4 = model[:5](x)
    want = [torch.einsum("brm,bmn->brn", u, vmap(jacrev(lambda h: model(h.unsqueeze(0)).squeeze(0)))(x).flatten(2)),
            torch.einsum("brm,bmn->brn", u, vmap(jacrev(tail(1)))(h1).flatten(2)),
            torch.einsum("brm,bmn->brn", u, vmap(jacrev(tail(4)))(h4))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    total = sum(g.square().sum() for g in got)
    reference = sum(w.square().sum() for w in want)
    inputs = [x] + list(model.parameters())[:-1]  # the rows do not depend on the last bias
    for a, b in zip(torch.autograd.grad(total, inputs), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="use gradients"):
        lin.input_gradients(u)


class TwiceAndInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.linear = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.linear(self.shared(self.shared(x)))
        return h.tanh_()


@pytest.mark.parametrize("points, match", [
    (["missing"], "names no submodule"),
    (["shared"], "more than once"),
    (["linear"], "changed in place"),
    ([None, None], "distinct"),
    ("linear", "sequence of submodule names"),
])
def test_bad_points(points, match):
    model = TwiceAndInPlace().to(DT)
    error = TypeError if match.startswith("sequence") else ValueError
    with pytest.raises(error, match=match):
        lin = generic.ModelJacobian(model, torch.randn(2, 3, dtype=DT), points=points)
        lin.gradients(torch.ones(2, 1, 2, dtype=DT))


@pytest.mark.parametrize("vmap_bytes", [1, "four rows", 2 ** 40])
def test_rows_in_vmapped_groups_or_one_by_one_give_the_same_jacobian(vmap_bytes, monkeypatch):
    """The rows of J go through vmapped backwards in groups sized by the forward's saved bytes (one
    by one past generic.VMAP_BYTES): every grouping gives torch.func's J and its gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 10)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    saved = generic.ModelJacobian(model, x).saved_bytes
    monkeypatch.setattr(generic, "VMAP_BYTES", 4 * saved if vmap_bytes == "four rows" else vmap_bytes)
    lin = generic.ModelJacobian(model, x)
    assert lin.row_group == {1: 1, "four rows": 4}.get(vmap_bytes, lin.row_group)
    jac = lin.jacobian()
    ref = torch.func.vmap(torch.func.jacrev(lambda xi: model(xi.unsqueeze(0))[0]))(x)
    torch.testing.assert_close(jac, ref)
    torch.testing.assert_close(torch.autograd.grad(jac.square().sum(), x)[0],
                               torch.autograd.grad(ref.square().sum(), x)[0])
