"""Target propagation: DTP and Gauss-Newton targets against closed forms and torch.func, training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

import jacext
from jacext.data import load_digits
from jacext.targetprop import TargetPropTrainer, layer_outputs, layer_targets

TOL = dict(rtol=1e-10, atol=1e-10)


def deep_linear(widths, device="cpu", seed=0):
    torch.manual_seed(seed)
    return jacext.MLP(widths, activation="identity").double().to(device)


def test_exact_dtp_targets_in_a_linear_net_are_the_closed_form(device):
    model = deep_linear([5, 4, 6, 3], device)
    x = torch.randn(7, 5, dtype=torch.float64, device=device)
    hs = layer_outputs(model, x)
    output_target = hs[-1] + torch.randn_like(hs[-1])
    targets = layer_targets(model, x, output_target, "dtp")
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    delta = output_target - hs[3]
    # t_l = h_l + W_{l+1}^+ ... W_L^+ (t_L - h_L)
    want2 = hs[2] + delta @ torch.linalg.pinv(weights[2]).T
    want1 = hs[1] + delta @ (torch.linalg.pinv(weights[1]) @ torch.linalg.pinv(weights[2])).T
    torch.testing.assert_close(targets[2], output_target, **TOL)
    torch.testing.assert_close(targets[1], want2, **TOL)
    torch.testing.assert_close(targets[0], want1, **TOL)


def test_dtp_step_with_exact_inverses_reduces_the_loss(device):
    model = deep_linear([4, 6, 6, 3], device, seed=1)
    x = torch.randn(32, 4, dtype=torch.float64, device=device)
    y = x @ torch.randn(4, 3, dtype=torch.float64, device=device)
    trainer = TargetPropTrainer(model, "dtp", "exact", lr=1e-2, output_step=0.2, loss_fn=F.mse_loss,
                                optimizer=torch.optim.SGD)
    losses = [trainer.step(x, y)["loss"] for _ in range(5)]
    final = F.mse_loss(model(x), y).item()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert final < losses[0]


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_gauss_newton_targets_match_torch_func_and_pinv(damping, device):
    torch.manual_seed(0)
    model = jacext.MLP([6, 9, 8, 3], activation="tanh").double().to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    hs = layer_outputs(model, x)
    output_target = hs[-1] + 0.3 * torch.randn_like(hs[-1])
    targets = layer_targets(model, x, output_target, "gn", damping=damping)
    delta = output_target - hs[-1]
    for l in (1, 2):
        jac = vmap(jacrev(model[2 * l:]))(hs[l])  # (B, m, n_l), the Jacobian of the layers above
        if damping:  # the damped pseudo-inverse J^T (J J^T + d I)^-1 is pinv([J; sqrt(d) I])[:, :m]
            eye = torch.eye(hs[l].shape[1], dtype=torch.float64, device=device).expand(len(x), -1, -1)
            pinv = torch.linalg.pinv(torch.cat([jac, damping ** 0.5 * eye], 1))[:, :, :3]
        else:
            pinv = torch.linalg.pinv(jac)
        want = hs[l] + torch.bmm(pinv, delta.unsqueeze(2)).squeeze(2)
        torch.testing.assert_close(targets[l - 1], want, **TOL)
    torch.testing.assert_close(targets[2], output_target, **TOL)


def test_layer_targets_bad_input():
    model = jacext.MLP([4, 5, 3], activation="tanh").double()
    x = torch.randn(2, 4, dtype=torch.float64)
    target = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer 2 is nonlinear"):
        layer_targets(jacext.MLP([4, 5, 3], activation="tanh", output_activation="tanh").double(), x, target, "dtp")
    with pytest.raises(ValueError, match="method"):
        layer_targets(model, x, target, "backprop")
    with pytest.raises(ValueError, match="output's shape"):
        layer_targets(model, x, torch.zeros(2, 4, dtype=torch.float64), "gn")
    with pytest.raises(ValueError, match="inverses must hold 2"):
        layer_targets(model, x, target, "dtp", inverses=[None])
    with pytest.raises(ValueError, match="inverses must be"):
        TargetPropTrainer(model, "gn", "learned")


def train(model, step, x, y, epochs, batch=32, end_epoch=None):
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for b in torch.randperm(len(x), generator=order).to(x.device).split(batch):
            step(x[b], y[b])
        if end_epoch:
            end_epoch()


def test_dtp_with_learned_inverses_and_gn_train_digits(device):
    x_train, y_train, x_test, y_test = load_digits(device=device)
    accuracy = {}
    for name in ("dtp", "gn", "backprop"):
        torch.manual_seed(0)
        model = jacext.MLP([64, 128, 128, 10], activation="tanh").to(device)
        if name == "backprop":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

            def step(x, y):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            train(model, step, x_train, y_train, epochs=10)
        else:
            trainer = TargetPropTrainer(model, name, noise=0.1, noise_decay=0.9)
            train(model, trainer.step, x_train, y_train, epochs=10, end_epoch=trainer.end_epoch)
        with torch.no_grad():
            accuracy[name] = (model(x_test).argmax(1) == y_test).float().mean().item()
    print("digits test accuracy after 10 epochs:", accuracy)
    assert accuracy["dtp"] >= 0.85, accuracy
    assert accuracy["gn"] >= 0.85, accuracy
