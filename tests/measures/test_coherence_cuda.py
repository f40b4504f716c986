"""Coherence on CUDA: replayed CUDA graphs give the eager numbers (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynlens as dl
from dynlens import cudagraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KEYS = ("alpha", "m_coherence", "gsnr", "noise_scale", "trace_sigma", "stiffness_within", "stiffness_between")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 32), nn.Tanh(), nn.Linear(32, 4)).cuda().eval()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 3, 6, 6, generator=g).cuda(), torch.randint(0, 4, (40,), generator=g).cuda()


def _same(a: dl.Coherence, b: dl.Coherence) -> None:
    for key in KEYS:
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(a.grad_norms, b.grad_norms, rtol=1e-5)
    for c in b.per_class:
        np.testing.assert_allclose(a.per_class[c], b.per_class[c], rtol=1e-5)


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "vmap"])
def test_replays_match_eager_measurements_as_parameters_and_batch_values_change(hooks):
    cudagraphs.clear_graphs()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(0)
    methods = []
    for step in range(5):
        batch = (x + 0.1 * step, y)  # same shapes and labels, new values every call
        graphed = dl.gradient_coherence(model, loss_fn, batch, hooks=hooks, graphs=True)
        eager = dl.gradient_coherence(model, loss_fn, batch, hooks=hooks, graphs=False)
        _same(graphed, eager)
        methods.append(graphed.method)
        model.train()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()  # in place: the graph reads the new values
        model.eval()
    assert "CUDA graph" not in methods[0] and all("CUDA graph" in m for m in methods[2:]), methods


def test_new_labels_or_shapes_are_measured_afresh():
    cudagraphs.clear_graphs()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    x, y = _batch(1)
    for _ in range(3):
        dl.gradient_coherence(model, loss_fn, (x, y), graphs=True)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).cuda()]
    _same(dl.gradient_coherence(model, loss_fn, (x, shuffled), graphs=True),
          dl.gradient_coherence(model, loss_fn, (x, shuffled), graphs=False))
    _same(dl.gradient_coherence(model, loss_fn, (x[:30], y[:30]), graphs=True),
          dl.gradient_coherence(model, loss_fn, (x[:30], y[:30]), graphs=False))


class Syncs(nn.Module):
    """A forward that copies a new tensor from the host (vmap runs it; a CUDA graph cannot record
    a copy from pageable host memory)."""

    def forward(self, x):
        return x * x.new_tensor([2.0])


def test_a_model_that_synchronises_is_measured_eagerly_without_error():
    cudagraphs.clear_graphs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Syncs(), nn.Linear(6, 3)).cuda().eval()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(16, 5, generator=g).cuda(), torch.randint(0, 3, (16,), generator=g).cuda())
    loss_fn = nn.CrossEntropyLoss()  # one object: the cache key names it by id
    results = [dl.gradient_coherence(model, loss_fn, batch, hooks=False, graphs=True) for _ in range(3)]
    assert all("CUDA graph" not in r.method for r in results)
    assert cudagraphs.graphs().failed
    assert any("recording failed" in note for note in results[-1].notes)
    _same(results[-1], dl.gradient_coherence(model, loss_fn, batch, graphs=False))


def test_graphs_leave_random_states_grad_and_buffers_alone():
    cudagraphs.clear_graphs()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    batch = _batch(3)
    loss_fn(model(batch[0]), batch[1]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.random.get_rng_state()
    for _ in range(4):
        dl.gradient_coherence(model, loss_fn, batch, graphs=True)
    assert torch.equal(cuda_state, torch.cuda.get_rng_state())
    assert torch.equal(cpu_state, torch.random.get_rng_state())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_auto_takes_hooks_for_convolutions_except_stiffness_over_several_chunks(monkeypatch):
    """hooks="auto" on a GPU: layer hooks for a convolutional model, but vmap for its stiffness
    once the batch is split into chunks (every pair of chunks is a new pass); the numbers agree."""
    from dynlens.measures import coherence

    model, batch = _model(), _batch(0)
    loss_fn = nn.CrossEntropyLoss()
    one_chunk = dl.gradient_coherence(model, loss_fn, batch, graphs=False)
    assert one_chunk.method == "hooks", one_chunk.notes
    monkeypatch.setattr(coherence, "CUDA_BUDGET", 4 * 2**10)  # a few examples per chunk
    chunked = dl.gradient_coherence(model, loss_fn, batch, graphs=False)
    assert chunked.method == "vmap", chunked.notes
    assert not chunked.notes  # a choice, not a failure
    _same(chunked, one_chunk)
    no_pairs = dl.gradient_coherence(model, loss_fn, batch, graphs=False, stiffness=False)
    assert no_pairs.method == "hooks", no_pairs.notes
    np.testing.assert_allclose(no_pairs.m_coherence, one_chunk.m_coherence, rtol=1e-5)
