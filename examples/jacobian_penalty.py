"""Drop-in Jacobian penalty in a training loop (robust / contractive MLPs).

    python examples/jacobian_penalty.py

Trains a digits classifier with cross-entropy + lambda * ||d logits / d x||_F^2 and prints the
test accuracy and the mean squared Jacobian norm, with and without the penalty."""
import torch
import torch.nn.functional as F
from torch import nn

import jacext
from jacext.data import load_digits


def train(penalty_weight, epochs=20):
    x_train, y_train, x_test, y_test = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train)).split(64):
            logits, sq = jacext.jacobian_frobenius(model, x_train[batch])  # logits == model(x)
            loss = F.cross_entropy(logits, y_train[batch]) + penalty_weight * sq.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits, sq = jacext.jacobian_frobenius(model, x_test)
    return (logits.argmax(1) == y_test).float().mean().item(), sq.mean().item()


if __name__ == "__main__":
    for weight in (0.0, 0.01):
        accuracy, penalty = train(weight)
        print(f"lambda = {weight:<5} test accuracy {accuracy:.3f}   mean ||J||_F^2 {penalty:9.3f}")
