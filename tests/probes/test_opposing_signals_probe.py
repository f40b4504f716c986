"""dl.probes.OpposingSignals in a Lens: the ledger read back from the run finds a planted pair,
the data map comes out as a DataFrame, and the rule and figures use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynlens as dl
from dynlens.measures.opposing import ledger_entry
from dynlens.rules.opposing_signals import ledger_of


def _planted(seed: int = 0):
    """Two groups of 20 sharing a large feature 0 with opposite labels, 160 ordinary examples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 6, generator=g) * 0.5
    y = (x[:, 1] > 0).long()
    x[:20, 0], y[:20] = 8.0, 0
    x[20:40, 0], y[20:40] = 8.0, 1
    return x, y


def _trained(path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, probes: list | None = None) -> dl.Run:
    """200 full-batch steps at a large step size with the ledger every step (and ``probes``
    before it); the run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    with dl.Lens(model, nn.CrossEntropyLoss(), (x, y), optimizer, run_dir=path, basic=False, budget=None,
                 probes=[*(probes or []), dl.probes.OpposingSignals(every=1)]) as lens:
        for _ in range(200):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            lens.step(loss=loss)
    return dl.load_run(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted data set trained once for the tests that read its run: (run, model, x, y)."""
    torch.manual_seed(0)
    x, y = _planted()
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    return _trained(tmp_path_factory.mktemp("planted"), model, x, y), model, x, y


def test_a_planted_pair_is_found_in_the_runs_ledger_and_drawn(planted):
    run, model, x, y = planted
    ledger = ledger_of(run)
    assert ledger.loss.shape == (201, 200) and ledger.labels.tolist() == y.tolist()
    np.testing.assert_allclose(ledger.loss[-1], ledger_entry(model, nn.CrossEntropyLoss(), (x, y)).loss, rtol=1e-5)
    pairs = dl.opposing_signals(run)
    assert pairs
    a, b = set(pairs[0].group_a.tolist()), set(pairs[0].group_b.tolist())
    planted = (set(range(20)), set(range(20, 40)))
    best = max(len(a & planted[0]) / len(a) + len(b & planted[1]) / len(b),
               len(a & planted[1]) / len(a) + len(b & planted[0]) / len(b))
    assert best >= 1.6  # precision ≥ 0.8 on each side
    frame = dl.data_map(run)
    assert list(frame.columns[:5]) == ["example", "label", "confidence", "variability", "correctness"]
    assert len(frame) == 200 and "forgetting" in frame
    assert [f.rule for f in dl.diagnose(run) if f.rule == "opposing_groups"]
    assert dl.reports.plot_opposing_groups(run) is not None and dl.reports.plot_data_map(run) is not None


def test_a_run_without_a_ledger_says_which_probe_to_attach(tmp_path):
    model = nn.Linear(3, 2)
    with dl.Lens(model, nn.CrossEntropyLoss(), (torch.randn(4, 3), torch.randint(0, 2, (4,))),
                 run_dir=tmp_path, budget=None):
        pass
    with pytest.raises(ValueError, match="OpposingSignals"):
        dl.opposing_signals(tmp_path)


def test_under_a_memory_allowance_the_ledger_forward_runs_in_chunks_or_waits():
    x, y = _planted()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    loss_fn = nn.CrossEntropyLoss()
    ctx = dl.probes.Context(model=model, loss_fn=loss_fn, probe_batch=(x, y), optimizer=None, step=0)
    whole = dl.probes.OpposingSignals().measure(ctx)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    ctx.memory = ctx.fn.activation_bytes(1) * 50  # 50 examples at a time
    calls.clear()
    chunked = dl.probes.OpposingSignals().measure(ctx)
    assert calls[-4:] == [50, 50, 50, 50] and max(calls) <= 50  # (the first: its memory model's)
    np.testing.assert_allclose(chunked["loss"].values, whole["loss"].values, rtol=1e-6)
    np.testing.assert_array_equal(chunked["correct"].values, whole["correct"].values)
    ctx.memory = 1
    with pytest.raises(dl.budget.MemoryBudgetTooSmall, match="the ledger's forward pass"):
        dl.probes.OpposingSignals().measure(ctx)


def test_the_planted_groups_shared_input_is_read_from_the_stored_inputs_and_drawn(planted):
    run, _, x, _ = planted
    stored = run.arrays("opposing_signals", "inputs")
    assert [s for s, _ in stored] == [0]  # once
    np.testing.assert_array_equal(stored[0][1], x.numpy())
    pair = dl.opposing_signals(run)[0]
    # the planted groups share feature 0 (8.0 against about 0 elsewhere)
    assert int(np.argmax(np.abs(pair.shared_input_signal))) == 0
    assert dl.reports.plot_opposing_inputs(run) is not None


def test_image_inputs_show_the_shared_pixel_as_an_image(tmp_path):
    torch.manual_seed(0)
    x, y = _planted()
    images = torch.zeros(200, 1, 4, 4)
    images.view(200, 16)[:, 10:] = x[:, :6]  # the planted feature 0 lands on pixel (2, 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    run = _trained(tmp_path, model, images, y)
    pair = dl.opposing_signals(run)[0]
    assert np.unravel_index(np.argmax(np.abs(pair.shared_input_signal)), (4, 4)) == (2, 2)
    fig = dl.reports.plot_opposing_inputs(run)
    shown = [ax.images[0].get_array().shape for ax in fig.axes if ax.images]
    assert shown and all(shape == (4, 4) for shape in shown)


def test_along_direction_is_each_examples_gradient_dotted_with_the_vector():
    from dynlens.measures.opposing import along_direction

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    expected = []
    for i in range(7):  # the oracle: one backward pass per example
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) @ v))
    np.testing.assert_allclose(along_direction(model, nn.CrossEntropyLoss(), (x, y), v, chunk_size=3), expected,
                               rtol=1e-10)
    assert all(p.grad is not None for p in model.parameters())  # untouched by the measurement
    with pytest.raises(ValueError, match="entries"):
        along_direction(model, nn.CrossEntropyLoss(), (x, y), v[:-1])


class _Attention(nn.Module):
    """nn.MultiheadAttention in eval mode runs a fused kernel with no forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        z = self.embed(x)
        return self.head(self.attention(z, z, z, need_weights=False)[0].mean(1))


def test_along_direction_without_forward_mode_derivatives_takes_two_backward_passes():
    from dynlens.measures.opposing import along_direction

    torch.manual_seed(2)
    model = _Attention().double().eval()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward AD"):  # the path it cannot take
        with torch.no_grad():
            z = model.embed(x)
            torch.func.jvp(lambda t: model.attention(t, t, t, need_weights=False)[0], (z,), (z,))
    expected = []
    for i in range(6):  # the oracle: one backward pass per example
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) @ v))
    model.zero_grad()
    np.testing.assert_allclose(along_direction(model, nn.CrossEntropyLoss(), (x, y), v, chunk_size=4), expected,
                               rtol=1e-10)


def test_with_the_hessian_probe_the_planted_groups_pull_opposite_ways_along_its_top_eigenvector(tmp_path):
    torch.manual_seed(0)
    x, y = _planted()
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    run = _trained(tmp_path, model, x, y, [dl.probes.Hessian(every=5, lambda_min=False, trace=False)])
    ledger = ledger_of(run)
    assert ledger.along_top is not None
    measured = np.isfinite(ledger.along_top).all(axis=1)
    # the Hessian measures every 5 steps; the ledger takes the latest vector at each step after
    assert measured.sum() >= 150 and measured[-1]
    pair = dl.opposing_signals(run)[0]
    assert pair.along_top_agreement is not None and pair.along_top_agreement >= 0.8
    assert pair.along_top_a > 0 > pair.along_top_b
    finding = next(f for f in dl.diagnose(run) if f.rule == "opposing_groups")
    assert finding.evidence["along_top_agreement"] >= 0.8
