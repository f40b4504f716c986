"""The ledger, the opposing-signals detector and the data map, on planted datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlens.measures.opposing import (
    Ledger,
    _leading_patterns,
    _pairs,
    data_map,
    ledger_entry,
    ledger_from_entries,
    opposing_signals,
)

ORDINARY, GROUP, FEATURES, CLASSES = 160, 20, 20, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared CPU: one thread is several times faster than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clusters(seed: int, planted_magnitude: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ORDINARY examples around four class means, then two groups of GROUP examples (labels 0
    and 1) whose own class signal is weak (0.3 of the mean) and which share feature 0 at
    ``planted_magnitude`` (0: no planted pair, the groups are ordinary examples)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, FEATURES, generator=g)
    means[:, 0] = 0
    y = torch.cat([torch.randint(0, CLASSES, (ORDINARY,), generator=g),
                   torch.zeros(GROUP, dtype=torch.long), torch.ones(GROUP, dtype=torch.long)])
    scale = torch.ones(len(y), 1)
    if planted_magnitude:
        scale[ORDINARY:] = 0.3
    x = means[y] * scale + 0.5 * torch.randn(len(y), FEATURES, generator=g)
    x[:, 0] = 0
    x[ORDINARY:, 0] = planted_magnitude
    return x, y


def _train(x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> Ledger:
    """Full-batch gradient descent on a tanh MLP, the ledger recorded before every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, int(y.max()) + 1))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    entries = []
    for _ in range(steps):
        entries.append(ledger_entry(model, loss_fn, (x, y)))
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return ledger_from_entries(list(range(steps)), entries, y, inputs=x)


def test_planted_opposing_groups_are_the_top_pair_on_different_sides():
    x, y = _clusters(seed=0, planted_magnitude=8.0)
    ledger = _train(x, y, lr=2.0, steps=200)
    pairs = opposing_signals(ledger)
    assert pairs, "the planted pair was not detected"
    top = pairs[0]
    planted_a, planted_b = set(range(ORDINARY, ORDINARY + GROUP)), set(range(ORDINARY + GROUP, ORDINARY + 2 * GROUP))
    a, b = set(top.group_a.tolist()), set(top.group_b.tolist())
    if len(a & planted_b) > len(a & planted_a):
        a, b = b, a
    # measured: precision 1.0 and 1.0 (all 20 of each group, nothing else), correlation −0.93
    assert len(a & planted_a) / len(a) >= 0.8 and len(b & planted_b) / len(b) >= 0.8
    assert top.correlation <= -0.5 and top.p_value <= 0.01
    assert len(top.oscillation_steps) > 0
    # the shared signal is the planted feature: feature 0 stands out, the rest are near 0
    shared = top.shared_input_signal
    assert shared is not None and np.argmax(np.abs(shared)) == 0 and shared[0] > 5 * np.abs(shared[1:]).max()
    assert top.loss_a.shape == top.loss_b.shape == (200,)
    assert sum(top.labels_a.values()) == len(top.group_a)


def test_no_pair_is_reported_without_a_planted_pair_at_a_small_step():
    x, y = _clusters(seed=1)
    ledger = _train(x, y, lr=0.1, steps=200)
    assert opposing_signals(ledger) == []


def _train_in_minibatches(x: torch.Tensor, y: torch.Tensor, lr: float, epochs: int, batch: int) -> Ledger:
    """SGD on shuffled mini-batches (their noise is what makes examples be forgotten), the
    ledger over the whole set recorded after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, int(y.max()) + 1))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(0)
    entries = []
    for _ in range(epochs):
        for members in torch.randperm(len(y), generator=order).split(batch):
            optimizer.zero_grad()
            loss_fn(model(x[members]), y[members]).backward()
            optimizer.step()
            entries.append(ledger_entry(model, loss_fn, (x, y)))
    return ledger_from_entries(range(len(entries)), entries, y)


def test_label_noise_is_hard_and_leads_forgetting():
    x, y = _clusters(seed=2)
    noisy = np.array([3, 17, 42, 77, 101, 130])
    shift = torch.randint(1, CLASSES, (len(noisy),), generator=torch.Generator().manual_seed(3))
    y[noisy] = (y[noisy] + shift) % CLASSES
    mapped = data_map(_train_in_minibatches(x, y, lr=0.5, epochs=15, batch=20))
    # measured: confidence 0.02-0.22 (median of all 0.95); three never learned, the other
    # three forgotten 6, 4 and 2 times, the most of any example (the next: 1)
    assert set(np.flatnonzero(mapped.region == "hard")) >= set(noisy.tolist())
    assert mapped.confidence[noisy].max() < 0.5 < np.median(mapped.confidence)
    assert set(mapped.most_forgotten(len(noisy)).tolist()) == set(noisy.tolist())
    learned_then_forgotten = noisy[~mapped.never_learned[noisy]]
    others = np.setdiff1d(np.arange(len(y)), noisy)
    assert len(learned_then_forgotten) and mapped.forgetting[learned_then_forgotten].min() > mapped.forgetting[others].max()
    assert sum(mapped.region_counts().values()) == len(y)


def test_data_map_follows_its_definitions_on_a_hand_built_ledger():
    p_y = np.array([[0.9, 0.1, 0.2], [0.9, 0.2, 0.8], [0.9, 0.1, 0.2], [0.9, 0.2, 0.8]], dtype=np.float32)
    correct = p_y > 0.5
    ledger = Ledger(np.arange(4), -np.log(p_y), p_y, correct, np.array([10, 11, 12]), np.array([0, 1, 2]))
    mapped = data_map(ledger)
    np.testing.assert_allclose(mapped.confidence, [0.9, 0.15, 0.5], rtol=1e-6)
    np.testing.assert_allclose(mapped.variability, [0.0, 0.05, 0.3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mapped.correctness, [1.0, 0.0, 0.5])
    assert mapped.forgetting.tolist() == [0, 0, 1]  # the third: wrong, right, wrong, right
    assert mapped.never_learned.tolist() == [False, True, False]
    assert mapped.region.tolist() == ["easy", "hard", "ambiguous"]
    assert data_map(ledger, window=(0, 2)).forgetting.tolist() == [0, 0, 0]


def test_ledger_of_ten_thousand_examples_and_a_thousand_steps_is_compact():
    n, t = 10_000, 1_000
    rng = np.random.default_rng(0)
    loss = rng.random(n, dtype=np.float32)
    entries = [(loss, loss, loss > 0.5) for _ in range(t)]
    ledger = ledger_from_entries(range(t), entries, labels=np.zeros(n, dtype=np.int64))
    assert ledger.loss.shape == ledger.p_y.shape == ledger.correct.shape == (t, n)
    assert ledger.loss.dtype == ledger.p_y.dtype == np.float32 and ledger.correct.dtype == np.bool_
    # (4 + 4 + 1) bytes per example and step, 8 per step and 16 per example: 90,168,000 bytes
    assert ledger.nbytes == 9 * t * n + 8 * t + 16 * n == 90_168_000


def test_ledger_entry_leaves_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()
    model[1].eval()  # a mixture of flags
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    entry = ledger_entry(model, loss_fn, (x, y), chunk_size=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(rng, torch.get_rng_state())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    np.testing.assert_allclose(entry.loss, F.cross_entropy(logits, y, reduction="none").numpy(), rtol=1e-5)
    np.testing.assert_allclose(entry.p_y, logits.softmax(1)[torch.arange(10), y].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(entry.correct, (logits.argmax(1) == y).numpy())


def test_ledger_entry_of_a_sequence_model_averages_over_counted_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7))
    tokens, targets = torch.randint(0, 7, (4, 6)), torch.randint(0, 7, (4, 6))
    targets[0, 3:] = -100
    targets[2, :] = -100

    def sequence_loss(outputs, t):
        return F.cross_entropy(outputs.reshape(-1, 7), t.reshape(-1))

    entry = ledger_entry(model, sequence_loss, (tokens, targets))
    with torch.no_grad():
        logits = model(tokens)
    p = logits.softmax(-1)
    first = targets[0, :3]
    assert entry.p_y[0] == pytest.approx(float(p[0, torch.arange(3), first].mean()), rel=1e-5)
    assert entry.loss[0] == pytest.approx(float(F.cross_entropy(logits[0, :3], first)), rel=1e-5)
    hits = (logits[1].argmax(-1) == targets[1]).sum()
    assert bool(entry.correct[1]) == bool(hits * 2 > 6)
    assert np.isnan(entry.loss[2]) and np.isnan(entry.p_y[2]) and not entry.correct[2]  # nothing counted


def _random_walks(steps: int, seed: int, oscillation: float = 0.0) -> Ledger:
    """200 independent random-walk losses; with ``oscillation``, examples 0–9 and 10–19 also
    alternate up and down against each other every step."""
    rng = np.random.default_rng(seed)
    delta = rng.normal(size=(steps - 1, 200))
    swing = oscillation * np.resize([1.0, -1.0], steps - 1) * rng.uniform(0.5, 1.5, size=steps - 1)
    delta[:, :10] += swing[:, None]
    delta[:, 10:20] -= swing[:, None]
    loss = (10 + np.vstack([np.zeros(200), np.cumsum(delta, axis=0)])).astype(np.float32)
    p_y = np.full_like(loss, 0.5)
    return Ledger(np.arange(steps), loss, p_y, p_y > 0.6, np.arange(200), np.zeros(200, dtype=np.int64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_test_rejects_chance_anticorrelation_of_random_walks_and_keeps_a_planted_swing(seed):
    ledger = _random_walks(steps=10, seed=seed)
    delta = np.diff(ledger.loss.astype(np.float64), axis=0)
    movers = np.argsort(-np.abs(delta).sum(axis=0))[:40]
    # the split alone finds strongly anti-correlated groups in 9 loss changes of pure noise
    assert min(found[3] for found in _pairs(delta[:, movers], 3, 0.5)) <= -0.5
    assert opposing_signals(ledger) == []

    pairs = opposing_signals(_random_walks(steps=20, seed=seed, oscillation=2.0))
    assert len(pairs) >= 1 and pairs[0].p_value <= 0.01
    a, b = sorted([set(pairs[0].group_a.tolist()), set(pairs[0].group_b.tolist())], key=min)
    # every planted member is found (measured: 10 + 10, once 10 + 11)
    assert a >= set(range(10)) and b >= set(range(10, 20))
    assert len(a & set(range(10))) / len(a) >= 0.8 and len(b & set(range(10, 20))) / len(b) >= 0.8


def test_window_restricts_the_detection_to_its_steps():
    ledger = _random_walks(steps=40, seed=0, oscillation=2.0)
    pairs = opposing_signals(ledger, window=(10, 30))
    assert pairs and pairs[0].steps.tolist() == list(range(10, 30))
    assert set(pairs[0].oscillation_steps.tolist()) <= set(range(11, 30))


@pytest.mark.parametrize("shape", [(30, 8), (8, 30)])
def test_leading_patterns_are_the_leading_left_singular_vectors(shape):
    matrix = np.random.default_rng(0).normal(size=shape)
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    patterns = _leading_patterns(matrix, 3)
    np.testing.assert_allclose(np.abs(np.sum(patterns * u[:, :3], axis=0)), 1.0, atol=1e-8)


def test_opposing_signals_rejects_settings_that_cannot_form_a_pair():
    ledger = _random_walks(steps=10, seed=0)
    for settings in ({"candidates": 1}, {"permutations": 0}, {"membership": 1.0}):
        with pytest.raises(ValueError, match="opposing_signals needs"):
            opposing_signals(ledger, **settings)


def test_data_map_needs_probabilities_and_a_step_and_gives_a_frame():
    loss = np.ones((3, 2), dtype=np.float32)
    regression = Ledger(np.arange(3), loss, np.full_like(loss, np.nan), loss > 2, np.arange(2), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="no p\\(y\\)"):
        data_map(regression)
    with pytest.raises(ValueError, match="holds no ledger step"):
        data_map(regression, window=(5, 9))
    classified = Ledger(np.arange(3), loss, np.full_like(loss, 0.7), loss > 0, np.array([4, 9]), np.array([1, 0]))
    frame = data_map(classified).to_dataframe()
    assert frame["example"].tolist() == [4, 9] and frame["region"].tolist() == ["easy", "easy"]
    assert list(frame.columns) == ["example", "label", "confidence", "variability", "correctness", "forgetting",
                                   "never_learned", "region"]
