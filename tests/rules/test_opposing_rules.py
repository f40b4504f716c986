"""The rules that relate opposing groups to loss spikes and to sharpening, on planted runs: a
ledger whose two planted groups' losses move against each other at every step, a training loss
with or without a spike, and a Hessian probe's λ_max that rises or stays flat."""

from __future__ import annotations

import numpy as np
from helpers import clean_loss, write_run

import dynlens as dl

STEPS = 120


def _ledger(seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """60 examples: 0–9 and 10–19 tug against each other (one's loss rises by what the other's
    falls, at random steps), the rest decay quietly."""
    rng = np.random.default_rng(seed)
    swing = np.cumsum(rng.choice([-1.0, 1.0], size=STEPS + 1)) * 0.05
    records = {}
    for t in range(STEPS + 1):
        loss = 0.8 * np.exp(-t / 60) + 0.01 * rng.random(60)
        loss[:10] = 1.0 + swing[t] + 0.01 * rng.random(10)
        loss[10:20] = 1.0 - swing[t] + 0.01 * rng.random(10)
        loss = np.clip(loss, 0.01, None)
        p_y = np.exp(-loss)
        records[t] = {"loss": loss.astype(np.float32), "p_y": p_y.astype(np.float32),
                      "correct": (p_y > 0.5).astype(np.uint8)}
    records[0]["labels"] = np.repeat([0, 1, 2], 20)
    return records


def _run(tmp_path, spike: bool, sharpening: bool):
    loss = clean_loss(STEPS)
    if spike:
        loss[59] = 10 * loss[50]  # step 60
    sharpness = {t: {"sharpness": (1.0 + t / 60 if sharpening else 1.0) + 0.001 * (t % 3),
                     "sharpness_ratio": 0.5}
                 for t in range(0, STEPS + 1, 10)}
    path = write_run(tmp_path / "run", STEPS, loss=loss, basic=False,
                     measurements={"opposing_signals": _ledger(), "hessian": sharpness})
    return dl.load_run(path)


def _by_rule(run, name):
    return [f for f in dl.diagnose(run) if f.rule == name]


def test_a_spike_while_the_planted_groups_tug_is_attributed_to_them(tmp_path):
    run = _run(tmp_path, spike=True, sharpening=False)
    assert _by_rule(run, "opposing_groups")  # the planted pair is found
    found = _by_rule(run, "spike_with_opposing_groups")
    assert len(found) == 1
    assert found[0].evidence["spike_step"] == 60 and found[0].severity == "warning"
    assert min(abs(s - 60) for s in found[0].evidence["opposite_moves"]) <= 2
    assert all(5 <= found[0].evidence[k] <= 10 for k in ("group_a_size", "group_b_size"))
    groups = _by_rule(run, "opposing_groups")[0].evidence
    planted = (set(range(10)), set(range(10, 20)))
    a, b = set(groups["group_a"]), set(groups["group_b"])
    assert (a <= planted[0] and b <= planted[1]) or (a <= planted[1] and b <= planted[0])


def test_without_a_spike_or_sharpening_the_pair_alone_is_reported(tmp_path):
    run = _run(tmp_path, spike=False, sharpening=False)
    assert _by_rule(run, "opposing_groups")
    assert _by_rule(run, "spike_with_opposing_groups") == []
    assert _by_rule(run, "opposing_groups_while_sharpening") == []


def test_sharpness_rising_over_the_pairs_steps_is_reported_with_it(tmp_path):
    run = _run(tmp_path, spike=False, sharpening=True)
    found = _by_rule(run, "opposing_groups_while_sharpening")
    assert len(found) == 1
    assert found[0].evidence["sharpness_max"] >= 1.5 * found[0].evidence["sharpness_start"]
    assert dl.reports.plot_opposing_groups(run) is not None  # with λ_max on its own axis
