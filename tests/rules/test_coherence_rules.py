"""The coherence rules fire on synthetic runs made to show each phenomenon and stay silent on
clean ones."""

from __future__ import annotations

import numpy as np
from helpers import write_run

import dynlens as dl

M = 64
STEPS = 400
EVERY = 20


def coherence_run(path, m_coherence=None, noise_scale=None, grad_norms=None, loss=None, config=None):
    """A run with a training loss at every step and coherence records every EVERY steps."""
    rng = np.random.default_rng(0)
    records = {}
    for i, s in enumerate(range(0, STEPS + 1, EVERY)):
        records[s] = {
            "m_coherence": 12.0 if m_coherence is None else m_coherence(s),
            "noise_scale": 80.0 if noise_scale is None else noise_scale(s),
            "size": M,
            "grad_norms": 1 + 0.1 * rng.random(M) if grad_norms is None else grad_norms(s, i),
        }
    loss = 2.3 * np.exp(-np.arange(1, STEPS + 1) / 150) + 0.05 if loss is None else loss
    return dl.load_run(write_run(path, STEPS, loss=loss, basic=False, layers=["0", "2"],
                                 config=config if config is not None else {"batch_size": 64},
                                 measurements={"coherence": records}))


def findings(run, name):
    return [f for f in dl.diagnose(run) if f.rule == name]


def test_a_clean_run_gives_no_coherence_finding(tmp_path):
    run = coherence_run(tmp_path / "run")
    assert [f for f in dl.diagnose(run) if f.probe == "coherence"] == []


def test_coherence_collapse_fires_when_coherence_drops_to_the_orthogonal_limit_while_loss_falls(tmp_path):
    run = coherence_run(tmp_path / "run", m_coherence=lambda s: 15.0 if s < 200 else 1.2)
    [finding] = findings(run, "coherence_collapse")
    assert finding.steps == (200, 400) and finding.severity == "warning"
    assert finding.evidence["peak_m_coherence"] == 15.0
    assert finding.evidence["m_coherence_since_collapse"] == 1.2
    assert finding.evidence["train_loss_latest"] < finding.evidence["train_loss_at_collapse"]
    assert "Chatterjee" in finding.reference and "memoris" in finding.title


def test_coherence_collapse_stays_silent_when_the_loss_has_stopped_falling(tmp_path):
    flat = np.full(STEPS, 0.7)
    run = coherence_run(tmp_path / "run", m_coherence=lambda s: 15.0 if s < 200 else 1.2, loss=flat)
    assert findings(run, "coherence_collapse") == []


def test_coherence_collapse_stays_silent_once_the_training_set_is_fitted(tmp_path):
    fitted = 2.3 * np.exp(-np.arange(1, STEPS + 1) / 15)  # near 0 from step 100
    run = coherence_run(tmp_path / "run", m_coherence=lambda s: 15.0 if s < 200 else 1.2, loss=fitted)
    assert findings(run, "coherence_collapse") == []


def test_coherence_collapse_stays_silent_when_coherence_recovers(tmp_path):
    run = coherence_run(tmp_path / "run", m_coherence=lambda s: 1.2 if 100 <= s < 300 else 15.0)
    assert findings(run, "coherence_collapse") == []


def test_batch_far_below_the_noise_scale_is_reported_with_the_factor(tmp_path):
    run = coherence_run(tmp_path / "run", noise_scale=lambda s: 512.0 + s, config={"batch": 32})
    [finding] = findings(run, "batch_vs_noise_scale")
    assert "below the gradient noise scale" in finding.title
    assert finding.evidence["batch_size"] == 32
    assert 16 < finding.evidence["ratio_noise_scale_to_batch"] < 30
    assert "McCandlish" in finding.reference


def test_batch_far_above_the_noise_scale_is_reported(tmp_path):
    run = coherence_run(tmp_path / "run", noise_scale=lambda s: 20.0, config={"batch_size": 1024})
    [finding] = findings(run, "batch_vs_noise_scale")
    assert "51x above" in finding.title


def test_an_infinite_noise_scale_bounds_it_below_by_the_probe_batch(tmp_path):
    run = coherence_run(tmp_path / "run", noise_scale=lambda s: float("inf"), config={"batch_size": 4})
    [finding] = findings(run, "batch_vs_noise_scale")
    assert "16x below" in finding.title and "at least 64" in finding.title


def test_noise_scale_rule_is_skipped_without_a_batch_size_in_the_config(tmp_path):
    run = coherence_run(tmp_path / "run", noise_scale=lambda s: 5000.0, config={})
    assert findings(run, "batch_vs_noise_scale") == []


def test_a_few_examples_dominating_the_gradient_are_named(tmp_path):
    def norms(step, i):
        values = np.ones(M)
        if step >= 300:
            values[[7, 40]] = 20.0  # 2 × 400 of 62 + 800: 93 % of Σ‖g_i‖²
        return values

    run = coherence_run(tmp_path / "run", grad_norms=norms)
    [finding] = findings(run, "dominant_examples")
    assert finding.steps == (300, 400)
    assert {7, 40} <= set(finding.evidence["examples"])
    assert finding.evidence["share_of_squared_gradient_norm"] > 0.9
    assert finding.evidence["measurements_affected"] == 6
