"""Small models and training loops shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@pytest.fixture(autouse=True)
def single_thread():
    """Small float64 models run fastest on one thread, and steadily on a busy shared CPU.

    An autouse fixture: a test module that imports it runs each of its tests on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn_dropout_cnn(seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm and Dropout (the model of the no-side-effects test)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def image_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int, lens=None,
          batch_size: int = 16, seed: int = 0) -> None:
    """A seeded training loop: shuffled mini-batches, cross-entropy, optional lens.step."""
    x, y = data
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        for idx in torch.randperm(len(y)).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            if lens is not None:
                lens.step(loss=loss)
            step += 1
            if step == steps:
                return


class Checkpointed(nn.Module):
    """An MLP whose middle block runs under activation checkpointing (``use_reentrant``: True,
    False, or None for no checkpointing, the oracle's model)."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 10)
        self.block = nn.Sequential(nn.Linear(10, 10), nn.Tanh())
        self.head = nn.Linear(10, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        if self.use_reentrant is not None:
            h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        else:
            h = self.block(h)
        return self.head(h)


class UserNet(nn.Module):
    """Linear, tanh, linear, defined in user code: dynamo compiles its frames (it leaves
    torch.nn's own, such as nn.Sequential's, to run eagerly)."""

    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def counting_backend(compiles: list[int], runs: list[int]):
    """A torch.compile backend that runs the captured graph as it is, appending to ``compiles``
    at each compilation and to ``runs`` at each call of compiled code."""
    def backend(graph_module, example_inputs):
        compiles.append(1)

        def run(*args):
            runs.append(1)
            return graph_module.forward(*args)
        return run
    return backend


def tiny_problem(seed: int = 0):
    """A two-layer ReLU network on 32 Gaussian examples of 3 classes: (model, loss_fn, batch)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return model, nn.CrossEntropyLoss(), (x, y)


def sgd_steps(model, loss_fn, batch, optimizer, lens, steps: int) -> None:
    """``steps`` full-batch optimizer steps on ``batch``, each followed by ``lens.step(loss=...)``
    (no Lens: ``lens=None``)."""
    x, y = batch
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if lens is not None:
            lens.step(loss=loss)
