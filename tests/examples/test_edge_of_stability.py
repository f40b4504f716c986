"""examples/edge_of_stability.py: λ_max rises to 2/η and hovers within 10 % of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers import single_thread  # noqa: F401  (autouse: one torch thread)

import dynlens as dl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "edge_of_stability.py"


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("edge_of_stability", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sharpness_rises_to_and_hovers_at_two_over_eta(tmp_path: Path) -> None:
    lr = 0.5
    run_dir = _load().main(steps=700, lr=lr, every=10, run_dir=str(tmp_path / "run"), report=False)
    sharpness = dl.load_run(run_dir).series("hessian", "sharpness")
    threshold = 2 / lr
    assert sharpness[0] < 0.5 * threshold  # it starts far below the threshold
    hover = sharpness[sharpness.index >= 400]
    assert len(hover) >= 25
    assert ((hover / threshold - 1).abs() <= 0.10).all(), hover.describe()
    findings = {f.rule: f for f in dl.diagnose(run_dir)}
    assert "progressive_sharpening" in findings and "edge_of_stability" in findings
    assert findings["edge_of_stability"].evidence["start_step"] <= 400
