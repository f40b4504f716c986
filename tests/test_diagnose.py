"""The diagnosis mechanism; also home of ``write_synthetic_run``, the run writer the rule and
report tests share (``from test_diagnose import write_synthetic_run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import dynlens as dl
from dynlens.diagnose import Finding, diagnose, registered_rules, rule
from dynlens.store import RunWriter

LAYERS = ["0", "2", "4"]
BASIC_PROBES = ["train", "grad_norm", "param_norm", "update_size", "distance_from_init"]


def clean_loss(steps: int, seed: int = 0) -> np.ndarray:
    """A smoothly decaying loss with a little noise, for steps 1..steps."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, steps + 1)
    return 2.3 * np.exp(-s / (steps / 3)) + 0.05 + 0.01 * rng.standard_normal(steps) ** 2


def write_synthetic_run(path: Path | str, steps: int = 400, loss: np.ndarray | None = None,
                        grad_norm: np.ndarray | None = None, name: str = "synthetic",
                        config: dict[str, Any] | None = None, model_class: str = "MLP",
                        events: list[tuple[int, str, str, str, str | None]] = (),
                        status: str = "finished", seed: int = 0) -> Path:
    """Write a run with every basic probe, as the Lens records them: train/loss for steps
    1..steps, the other probes for steps 0..steps (one per_layer entry per layer of LAYERS).
    ``loss`` (length steps) and ``grad_norm`` (length steps + 1) default to a clean run;
    ``events`` are (step, level, probe, message, traceback)."""
    rng = np.random.default_rng(seed)
    loss = clean_loss(steps, seed) if loss is None else np.asarray(loss, dtype=float)
    if grad_norm is None:
        grad_norm = 1.0 + 0.05 * rng.standard_normal(steps + 1)
    writer = RunWriter(path, overwrite=True)
    writer.set_meta({
        "name": name, "config": config if config is not None else {"lr": 0.1, "batch": 32},
        "model": {"class": model_class, "parameters": 1234, "trainable_parameters": 1234,
                  "tensors": [{"name": f"{layer}.weight", "shape": [4, 4], "dtype": "float32",
                               "trainable": True} for layer in LAYERS],
                  "buffers": 0, "device": "cpu", "text": f"{model_class}(\n  (0): Linear()\n)"},
        "optimizer": {"class": "SGD", "defaults": {"lr": 0.1}, "param_groups": 1},
        "layers": LAYERS,
        "probes": [{"name": p, "class": p.title(), "schedule": "every 1", "mode": "eval"}
                   for p in BASIC_PROBES],
        "versions": {"dynlens": dl.__version__}, "started": "2025-01-01T00:00:00+00:00",
        "status": status,
    })
    per_layer_share = np.array([0.5, 0.7, 0.5])
    param = 10.0
    for step in range(steps + 1):
        if step >= 1:
            writer.scalar(step, "train", "loss", loss[step - 1])
            writer.scalar(step, "train", "lr", 0.1)
        g = float(grad_norm[step])
        writer.scalar(step, "grad_norm", "total", g)
        writer.array(step, "grad_norm", "per_layer", g * per_layer_share)
        param += 0.001
        writer.scalar(step, "param_norm", "total", param)
        writer.array(step, "param_norm", "per_layer", param * per_layer_share)
        update = 0.1 * g if step else 0.0
        writer.scalar(step, "update_size", "total", update)
        writer.scalar(step, "update_size", "relative", update / param)
        writer.array(step, "update_size", "per_layer", update * per_layer_share)
        writer.scalar(step, "distance_from_init", "absolute", 0.01 * step)
        writer.scalar(step, "distance_from_init", "relative", 0.001 * step)
        writer.array(step, "distance_from_init", "per_layer", 0.001 * step * per_layer_share)
        for e_step, level, probe, message, tb in events:
            if e_step == step:
                writer.event(step, level, probe, message, tb)
        writer.commit()
    writer.close()
    return Path(path)


def test_findings_are_sorted_most_severe_first_then_by_step(tmp_path):
    loss = clean_loss(400)
    loss[300] = 50.0
    loss[380:] = np.nan
    run = dl.load_run(write_synthetic_run(tmp_path / "run", loss=loss))
    findings = diagnose(run)
    severities = [f.severity for f in findings]
    assert severities == sorted(severities, key=("critical", "warning", "info").index)
    assert findings[0].rule == "divergence"


def test_a_rule_that_raises_gives_an_info_finding_and_the_others_still_run(tmp_path):
    @rule("test_broken_rule")
    def broken(run):
        raise ValueError("boom")

    try:
        loss = clean_loss(400)
        loss[250] = 40.0
        findings = diagnose(dl.load_run(write_synthetic_run(tmp_path / "run", loss=loss)))
        broken_findings = [f for f in findings if f.rule == "test_broken_rule"]
        assert len(broken_findings) == 1 and broken_findings[0].severity == "info"
        assert "boom" in broken_findings[0].evidence["error"]
        assert any(f.rule == "loss_spike" for f in findings)
    finally:
        import sys
        sys.modules["dynlens.diagnose"]._RULES.pop("test_broken_rule", None)


def test_diagnose_accepts_a_path_and_every_finding_names_its_rule(tmp_path):
    loss = clean_loss(400)
    loss[200] = 30.0
    findings = dl.diagnose(str(write_synthetic_run(tmp_path / "run", loss=loss)))
    assert findings and all(isinstance(f, Finding) and f.rule for f in findings)
    assert set(registered_rules()) >= {"loss_spike", "divergence", "stalled_training",
                                       "gradient_norm", "probe_failures"}
