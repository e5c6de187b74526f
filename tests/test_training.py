"""Seed-style use: cross-entropy + lambda * ||J||_F^2 on scikit-learn's digits."""
import torch
import torch.nn.functional as F

import jacext
from jacext.data import load_digits


def train(penalty_weight, device, epochs=15, seed=0):
    x_train, y_train, x_test, y_test = load_digits(seed=seed, device=device)
    torch.manual_seed(seed)
    model = jacext.MLP([64, 64, 10], activation="tanh").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order).to(device)
        for start in range(0, len(x_train), 64):
            batch = perm[start:start + 64]
            logits, sq = jacext.jacobian_frobenius(model, x_train[batch])
            loss = F.cross_entropy(logits, y_train[batch]) + penalty_weight * sq.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits, sq = jacext.jacobian_frobenius(model, x_test)
    return (logits.argmax(1) == y_test).float().mean().item(), sq.mean().item()


def test_penalty_keeps_accuracy_and_shrinks_the_jacobian(device):
    accuracy_plain, sq_plain = train(0.0, device)
    accuracy_penalized, sq_penalized = train(0.01, device)
    assert accuracy_plain > 0.9
    assert accuracy_penalized >= accuracy_plain - 0.03, (accuracy_penalized, accuracy_plain)
    assert sq_penalized < 0.2 * sq_plain, (sq_penalized, sq_plain)
