"""The front-end (jacext.frontend.lower): every supported construct lowers to a spec whose network
is the model and whose engine Jacobian is torch.func's; the others are refused by name and line;
the trace is cached per module and re-read when the module changes."""
import gc
import inspect
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import jacext
from jacext import activations as act
from jacext import frontend
from jacext.frontend import FACTORS, NotLowerable, lower

TOL = dict(rtol=1e-10, atol=1e-12)


def run_spec(spec, x):
    """The spec's network in plain torch (the engine's reading of the model)."""
    h = x
    for i, (w, b, code) in enumerate(zip(spec.weights, spec.biases, spec.activations)):
        h = h @ w.T if b is None else h @ w.T + b
        h = act.activation_value(h, code, *spec.act_params[2 * i: 2 * i + 2])
    return h


def reference_jacobian(model, x):
    """(B, m, n): torch.func's per-sample Jacobian of the model w.r.t. the flattened input."""
    jac = vmap(jacrev(lambda v: model(v[None])[0]))(x)
    return jac.reshape(x.shape[0], jac.shape[1], -1)


def randomize_batchnorm(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g, dtype=torch.float64))
                    m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
    return model


class Functional(nn.Module):
    """A user module: F.linear with its own parameters and a functional activation."""

    def __init__(self, activation, n_in=5, hidden=7, n_out=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)
        self.activation = activation

    def forward(self, x):
        h = self.activation(F.linear(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(h)


class Flattening(nn.Module):
    def __init__(self, flatten):
        super().__init__()
        self.flatten_input = flatten
        self.net = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(self.flatten_input(x))


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear, self.norm = nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out)

    def forward(self, x):
        return F.silu(self.norm(self.linear(x)))


class Net(nn.Module):
    """The user's own classes, nested Sequentials, Dropout and functional dropout."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Block(5, 8), nn.Sequential(nn.Dropout(0.2), nn.Identity()), Block(8, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x, unused=None):
        h = F.dropout(self.body(x), 0.3, training=self.training)
        return self.head(h)


def seq(*modules):
    torch.manual_seed(0)
    return nn.Sequential(*modules)


SUPPORTED = {
    "sequential": (lambda: seq(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)),
    "bare_linear": (lambda: nn.Linear(5, 3), (5,)),
    "flatten_module": (lambda: seq(nn.Flatten(), nn.Linear(16, 6), nn.GELU(), nn.Linear(6, 3)), (1, 4, 4)),
    "view_size": (lambda: Flattening(lambda x: x.view(x.size(0), -1)), (1, 4, 4)),
    "reshape_shape": (lambda: Flattening(lambda x: x.reshape(x.shape[0], -1)), (2, 8)),
    "view_tuple": (lambda: Flattening(lambda x: x.view((x.shape[0], -1))), (4, 4)),
    "torch_flatten": (lambda: Flattening(lambda x: torch.flatten(x, 1)), (1, 4, 4)),
    "method_flatten": (lambda: Flattening(lambda x: x.flatten(start_dim=1)), (1, 4, 4)),
    "dropout_eval": (lambda: seq(nn.Linear(5, 7), nn.Dropout(0.3), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3)).eval(),
                     (5,)),
    "bn_after_linear": (lambda: seq(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).eval(), (5,)),
    "bn_before_first_linear": (lambda: seq(nn.BatchNorm1d(5), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).eval(),
                               (5,)),
    "bn_after_activation": (lambda: seq(nn.Linear(5, 7, bias=False), nn.ELU(0.7), nn.BatchNorm1d(7),
                                        nn.BatchNorm1d(7, affine=False), nn.Linear(7, 3, bias=False)).eval(), (5,)),
    "bn_twice_no_bias": (lambda: seq(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.BatchNorm1d(7, affine=False),
                                     nn.Sigmoid(), nn.Linear(7, 3), nn.BatchNorm1d(3)).eval(), (5,)),
    "flatten_then_bn": (lambda: seq(nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 4), nn.Tanh(),
                                    nn.Linear(4, 2)).eval(), (4, 4)),
    "user_classes_nested": (lambda: Net().eval(), (5,)),
    "mlp_builder": (lambda: jacext.MLP([5, 6, 4, 3], activation="smooth_leaky_relu"), (5,)),
}

FUNCTIONS = {
    "torch.tanh": torch.tanh, "Tensor.tanh": lambda h: h.tanh(), "torch.sigmoid": torch.sigmoid,
    "F.sigmoid": F.sigmoid, "Tensor.sigmoid": lambda h: h.sigmoid(), "F.relu": F.relu, "torch.relu": torch.relu,
    "Tensor.relu": lambda h: h.relu(), "F.relu_inplace": lambda h: F.relu(h, inplace=True),
    "F.leaky_relu": lambda h: F.leaky_relu(h, 0.2), "F.elu": lambda h: F.elu(h, alpha=0.7), "F.gelu": F.gelu,
    "F.gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "F.silu": F.silu,
    "F.softplus": lambda h: F.softplus(h, beta=1.5, threshold=2.0), "F.softplus_default": F.softplus,
    "F.tanh": F.tanh,
}
for _name, _f in FUNCTIONS.items():
    SUPPORTED[_name] = ((lambda f: lambda: Functional(f))(_f), (5,))


def build(case):
    make, shape = SUPPORTED[case]
    torch.manual_seed(0)
    model = randomize_batchnorm(make().double())
    x = torch.randn(6, *shape, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_lowered_network_and_jacobian_match_the_model(case):
    model, x = build(case)
    lowered = lower(model, x)
    spec = lowered.spec
    flat = lowered.input(x)
    assert lowered.flatten_input == (x.dim() > 2)
    assert lowered.input_shape == (tuple(x.shape[1:]) if x.dim() > 2 else None)
    assert flat.shape == (x.shape[0], x[0].numel())
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run_spec(spec, flat), expected, **TOL)
    y, jac = jacext.ops.mlp_jacobian(flat, spec.weights, spec.biases, spec.activations, spec.act_params)
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(jac, reference_jacobian(model, x), **TOL)


def test_functional_activation_codes():
    """The functions read as the table's codes and parameters (not only the same values)."""
    expect = {"F.leaky_relu": (act.LEAKY_RELU, 0.2, 0.0), "F.elu": (act.ELU, 0.7, 0.0),
              "F.softplus": (act.SOFTPLUS, 1.5, 2.0), "F.softplus_default": (act.SOFTPLUS, 1.0, 20.0),
              "F.gelu_tanh": (act.GELU_TANH, 0.0, 0.0), "F.gelu": (act.GELU, 0.0, 0.0),
              "Tensor.relu": (act.RELU, 0.0, 0.0)}
    for case, (code, p0, p1) in expect.items():
        spec = lower(build(case)[0]).spec
        assert (spec.activations[0], *spec.act_params[:2]) == (code, p0, p1), case


def test_parameters_are_the_modules_own():
    model, _ = build("sequential")
    spec = lower(model).spec
    assert spec.weights[0] is model[0].weight and spec.biases[1] is model[2].bias
    fn = build("F.tanh")[0]
    assert lower(fn).spec.weights[0] is fn.fc1.weight


@pytest.mark.parametrize("case", ["bn_after_linear", "bn_before_first_linear", "bn_after_activation",
                                  "bn_twice_no_bias", "user_classes_nested"])
def test_gradients_through_folded_batchnorm(case):
    """A penalty's gradients reach gamma, beta and the weights through the fold, equal to torch.func's."""
    model, x = build(case)
    x.requires_grad_(True)
    params = dict(model.named_parameters())

    def penalty(y, sq):
        return (sq * torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)).sum() + (y ** 2).sum()

    spec = lower(model).spec
    y, sq = jacext.ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params)
    got = torch.autograd.grad(penalty(y, sq), [x, *params.values()])

    def call(p, v):
        return functional_call(model, p, (v,))

    jac = vmap(jacrev(lambda v: call(params, v[None])[0]))(x)
    ref = torch.autograd.grad(penalty(call(params, x), jac.pow(2).sum((1, 2))), [x, *params.values()])
    assert any(isinstance(m, nn.BatchNorm1d) and m.affine for m in model.modules())
    for name, g, r in zip(["x", *params], got, ref):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{name}: {m}")


def test_reused_module_ties_the_weights():
    shared = nn.Linear(4, 4)
    spec = lower(nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 2))).spec
    assert spec.weights[0] is spec.weights[1] is shared.weight


def test_unused_extra_input_lowers_and_a_used_one_does_not():
    model, x = build("user_classes_nested")
    assert lower(model, x, torch.ones(6, 2)).spec.widths == [5, 8, 6, 2]

    class Conditioned(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x, t=None, *, scale=None):
            y = self.fc(x)
            if t is not None:
                y = y * t
            return y if scale is None else y * scale

    assert lower(Conditioned(), x).spec.widths == [5, 3]  # called as model(x): t and scale are None
    # y * t: a per-sample gate (tests/test_conditioning_inside.py), which a quantity takes or not
    with pytest.raises(NotLowerable, match=r"Conditioned \(operator.mul\) .* per-sample gate"):
        lower(Conditioned(), x, torch.ones(6, 1))
    t = torch.rand(6, 1)
    assert torch.equal(lower(Conditioned(), x, t, supports=FACTORS).spec.gates[0], t.expand(6, 3))


# ---- refusals: module path, op and the user's line ------------------------------------------

def line_of(cls, marker):
    """'file:line' of the line of cls's source that contains marker."""
    lines, start = inspect.getsourcelines(cls)
    offset = next(i for i, text in enumerate(lines) if marker in text)
    return f"{inspect.getsourcefile(cls)}:{start + offset}"


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(5, 6))
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.norm(self.inner(x)))  # norm


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = x + torch.tanh(self.block(x))  # residual
        return self.out(h)


class PostActivationResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(x + self.block(x))  # relu
        return self.out(h)


class SumOfBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        h = self.b(torch.tanh(h)) + h  # sum
        return self.out(h)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(torch.cat([x, x], dim=1))  # cat


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))  # features


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize("model, path, op, where, why", [
    (WithLayerNorm(), "norm", "LayerNorm", line_of(WithLayerNorm, "# norm"), "unsupported module"),
    (Residual(), "Residual", "operator.add", line_of(Residual, "# residual"),
     "a residual skip (h + g(h)): this quantity does not run it on the engine"),
    (PostActivationResidual(), "PostActivationResidual", "torch.relu", line_of(PostActivationResidual, "# relu"),
     "an activation after a residual sum"),
    (SumOfBranches(), "SumOfBranches", "operator.add", line_of(SumOfBranches, "# sum"),
     "it adds a value other than the input of an earlier nn.Linear"),
    (Concat(), "Concat", "torch.cat", line_of(Concat, "# cat"), "concatenates x once with conditioning inputs"),
    (Branchy(), "Branchy", "torch.fx trace", line_of(Branchy, "# data-dependent"), "torch.fx cannot trace it"),
    (Conv(), "features.0", "Conv2d", line_of(Conv, "# features"), "unsupported module"),
    (nn.Sequential(nn.Dropout(0.1), nn.Linear(5, 7), nn.Linear(7, 3)), "0", "Dropout", None,
     "Dropout in train() on the input"),
    (nn.Sequential(nn.Linear(5, 7), nn.Dropout1d(0.1), nn.Linear(7, 3)), "1", "Dropout1d", None,
     "only nn.Dropout's elementwise mask"),
    (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)), "1", "BatchNorm1d", None,
     "BatchNorm in train() mixes the samples"),
    (nn.Sequential(nn.Linear(5, 7), nn.Flatten(), nn.Linear(7, 3)), "1", "Flatten", None, "only on the input"),
    (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.BatchNorm1d(7)).eval(), "2", "BatchNorm1d", None,
     "no nn.Linear after it"),
    (nn.Sequential(nn.Tanh(), nn.Linear(5, 3)), "0", "Tanh", None, "before the first nn.Linear"),
    (nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.ReLU()), "2", "ReLU", None, "follows another activation"),
    (nn.Sequential(nn.Identity()), "Sequential", "output", None, "no nn.Linear"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "/" not in v else None)
def test_refusals_name_the_node(model, path, op, where, why):
    x = torch.randn(2, 1, 4, 4) if isinstance(model, Conv) else torch.randn(2, 5)
    call = f"{__file__}:{inspect.currentframe().f_lineno + 2}"
    with pytest.raises(NotLowerable) as info:
        lower(model, x)  # a Sequential's steps have no line of the user's: this call's line stands for them
    err = info.value
    assert isinstance(err, TypeError)
    assert (err.path, err.op) == (path, op)
    assert why in err.why
    assert err.where == (where or call)
    assert str(err) == f"jacext: {path} ({op}) at {err.where} does not run on the fused engine: {err.why}"


def test_parse_model_is_lower_spec():
    model, _ = build("bn_after_linear")
    torch.testing.assert_close(jacext.parse_model(model).weights[0], lower(model).spec.weights[0])
    with pytest.raises(NotLowerable, match=r"jacext: 1 \(LayerNorm\)"):
        jacext.parse_model(nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)))


def test_bad_x():
    model, _ = build("flatten_module")
    with pytest.raises(ValueError, match=r"x has 15 features per sample \(shape \(3, 5\)\)"):
        lower(model, torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lower(model, [0.0] * 16)
    assert lower(model, torch.randn(0, 1, 4, 4, dtype=torch.float64)).input_shape == (1, 4, 4)
    with pytest.raises(ValueError, match="4 features"):
        lower(build("sequential")[0], torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Module"):
        lower(lambda x: x)


# ---- the cache --------------------------------------------------------------------------------

@pytest.fixture
def reads(monkeypatch):
    """How many times the front-end traced a model."""
    count = [0]
    read = frontend._read

    def counting(*args):
        count[0] += 1
        return read(*args)

    monkeypatch.setattr(frontend, "_read", counting)
    return count


def test_a_second_call_does_not_retrace(reads):
    model, x = build("user_classes_nested")
    first = lower(model, x)
    second = lower(model, x)
    assert reads[0] == 1
    for a, b in zip(first.spec.weights, second.spec.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_changed_module_is_reread(reads):
    model, x = build("sequential")
    assert lower(model).spec.activations[0] == act.TANH
    model[1] = nn.ReLU()
    assert lower(model).spec.activations[0] == act.RELU
    model[1] = nn.LeakyReLU(0.3)
    assert lower(model).spec.act_params[:2] == [0.3, 0.0]
    model[1].negative_slope = 0.1
    assert lower(model).spec.act_params[:2] == [0.1, 0.0]
    assert reads[0] == 4
    model[0] = nn.Linear(5, 7).double()  # the same structure: read from the plan, no retrace
    model[2].weight = nn.Parameter(torch.ones(3, 7, dtype=torch.float64))
    spec = lower(model).spec
    assert spec.weights[0] is model[0].weight and spec.weights[1] is model[2].weight
    assert reads[0] == 4


def test_train_eval_toggle(reads):
    model, x = build("bn_after_linear")
    model.train()
    with pytest.raises(NotLowerable, match="BatchNorm in train"):
        lower(model, x)
    with pytest.raises(NotLowerable, match="BatchNorm in train"):
        lower(model, x)  # the refusal is cached too
    model.eval()
    lower(model, x)
    model.train()
    with pytest.raises(NotLowerable):
        lower(model, x)
    assert reads[0] == 2  # one trace per structure


def test_forward_hooks_are_not_ignored(reads):
    model, x = build("sequential")
    lower(model, x)
    handle = model[1].register_forward_hook(lambda m, i, o: 2 * o)
    with pytest.raises(NotLowerable, match="forward hooks"):
        lower(model, x)
    handle.remove()
    lower(model, x)


def test_the_cache_does_not_keep_the_model_alive():
    model, x = build("user_classes_nested")
    lower(model, x)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_under_torch_compile(reads):
    """A model first lowered inside torch.compile (fullgraph: the trace runs at compile time, its
    plan a constant), recompiled when its structure changes; a refusal can be caught there."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(3, 4, dtype=torch.float64)

    def penalty(x):
        spec = lower(model).spec
        return jacext.ops.mlp_jacobian_frobenius(x, spec.weights, spec.biases, spec.activations, spec.act_params)[1]

    compiled = torch.compile(penalty, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), penalty(x), **TOL)
    model[1] = nn.ReLU()
    torch.testing.assert_close(compiled(x), reference_jacobian(model, x).square().sum((1, 2)), **TOL)

    def guarded(x):
        try:
            return penalty(x)
        except NotLowerable:
            return -x.sum(1)

    model[1] = nn.LayerNorm(5).double()
    torch.testing.assert_close(torch.compile(guarded, fullgraph=True, backend="eager")(x), -x.sum(1))
