"""The basic rules fire on synthetic runs made to show each phenomenon, and stay silent on a
clean run."""

from __future__ import annotations

import numpy as np
from helpers import clean_loss, write_run

import dynlens as dl


def _findings(tmp_path, **kwargs):
    return dl.diagnose(dl.load_run(write_run(tmp_path / "run", **kwargs)))


def _by_rule(findings, name):
    return [f for f in findings if f.rule == name]


def test_clean_run_gives_no_warning_or_critical_finding(tmp_path):
    findings = _findings(tmp_path, steps=1000)
    assert [f for f in findings if f.severity != "info"] == []


def test_loss_spike_fires_at_the_spike_step_with_its_ratio(tmp_path):
    loss = clean_loss(400)
    loss[249] = 10 * loss[240]  # step 250
    spikes = _by_rule(_findings(tmp_path, loss=loss), "loss_spike")
    assert len(spikes) == 1
    spike = spikes[0]
    assert spike.severity == "warning" and spike.steps == (250, 250)
    assert spike.evidence["peak_step"] == 250 and spike.evidence["ratio"] > 3
    assert "Rosenfeld" in spike.reference and spike.suggestion


def test_many_loss_spikes_are_capped_and_summarised(tmp_path):
    loss = clean_loss(1000)
    loss[100::50] *= 8
    spikes = _by_rule(_findings(tmp_path, steps=1000, loss=loss), "loss_spike")
    assert len([s for s in spikes if s.severity == "warning"]) == 5
    assert spikes[-1].severity == "info" and "more loss spikes" in spikes[-1].title


def test_nan_loss_is_critical_divergence_from_the_first_nan_step(tmp_path):
    loss = clean_loss(400)
    loss[299:] = np.nan  # from step 300
    found = _by_rule(_findings(tmp_path, loss=loss), "divergence")
    assert len(found) == 1
    assert found[0].severity == "critical" and found[0].steps == (300, 400)
    assert found[0].evidence["first_nonfinite_step"] == 300
    assert found[0].evidence["last_finite_step"] == 299


def test_infinite_gradient_norm_is_divergence(tmp_path):
    grad = np.ones(401)
    grad[350] = np.inf
    found = _by_rule(_findings(tmp_path, grad_norm=grad), "divergence")
    assert found and found[0].evidence["quantity"] == "gradient norm"
    assert found[0].steps[0] == 350


def test_flat_loss_with_steady_gradient_is_stalled_training(tmp_path):
    rng = np.random.default_rng(1)
    loss = 2.3 + 0.002 * rng.standard_normal(1000)
    stalls = _by_rule(_findings(tmp_path, steps=1000, loss=loss), "stalled_training")
    assert len(stalls) == 1 and stalls[0].severity == "warning"
    assert stalls[0].steps[0] <= 100 and stalls[0].steps[1] >= 900
    assert stalls[0].evidence["relative_loss_change"] < 0.01


def test_flat_loss_with_vanished_gradient_is_not_a_stall(tmp_path):
    loss = np.full(1000, 2.3)
    grad = np.concatenate([np.ones(50), np.full(951, 1e-3)])
    assert _by_rule(_findings(tmp_path, steps=1000, loss=loss, grad_norm=grad),
                    "stalled_training") == []


def test_exploding_gradient_norm_fires_at_its_peak(tmp_path):
    grad = np.ones(401)
    grad[300:320] = np.geomspace(10, 1e4, 20)
    found = _by_rule(_findings(tmp_path, grad_norm=grad), "gradient_norm")
    assert len(found) == 1 and "Exploding" in found[0].title
    assert found[0].evidence["peak_step"] == 319 and found[0].steps == (307, 319)  # 10·10^(3i/19) > 100 from i = 7


def test_vanishing_gradient_norm_with_high_loss_fires(tmp_path):
    loss = np.linspace(2.3, 2.0, 400)
    grad = np.concatenate([np.ones(100), np.full(301, 1e-5)])
    found = _by_rule(_findings(tmp_path, loss=loss, grad_norm=grad), "gradient_norm")
    assert len(found) == 1 and "Vanishing" in found[0].title
    assert found[0].steps[0] == 100


def test_small_gradient_after_convergence_is_not_vanishing(tmp_path):
    loss = np.geomspace(2.3, 1e-4, 400)
    grad = np.geomspace(1.0, 1e-6, 401)
    assert _by_rule(_findings(tmp_path, loss=loss, grad_norm=grad), "gradient_norm") == []


def test_failed_and_switched_off_probes_are_reported(tmp_path):
    events = [
        (5, "error", "hessian", "RuntimeError: out of memory", "Traceback ...\nRuntimeError"),
        (6, "error", "hessian", "RuntimeError: out of memory", "Traceback ..."),
        (7, "error", "hessian", "RuntimeError: out of memory", "Traceback ..."),
        (7, "warning", "hessian", "probe 'hessian' switched off after 3 failures in a row", None),
        (9, "error", "ntk", "ValueError: bad", "Traceback ..."),
        (9, "info", None, "a note", None),
    ]
    found = {f.evidence["probe"]: f for f in
             _by_rule(_findings(tmp_path, events=events), "probe_failures")}
    assert set(found) == {"hessian", "ntk"}
    assert "switched off at step 7" in found["hessian"].title
    assert found["hessian"].evidence["errors"] == 3 and found["hessian"].steps == (5, 7)
    assert found["ntk"].title == "Probe 'ntk' failed 1 time"
    assert all(f.severity == "warning" for f in found.values())
