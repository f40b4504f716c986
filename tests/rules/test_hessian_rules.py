"""The hessian diagnosis rules fire on synthetic runs that show their phenomenon and stay silent
on a clean run."""

from __future__ import annotations

from pathlib import Path

from helpers import hessian_run, sharpening_then_eos

import dynlens as dl
from dynlens.rules import hessian as rules


def _titles(findings) -> list[str]:  # noqa: ANN001
    return [f.title for f in findings]


def test_progressive_sharpening_fires_on_a_rising_sharpness(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, sharpening_then_eos())
    findings = list(rules.progressive_sharpening(run))
    assert len(findings) == 1
    assert findings[0].evidence["factor"] > 3 and findings[0].steps == (0, 120)
    assert "Cohen" in findings[0].reference and findings[0].suggestion


def test_edge_of_stability_fires_with_the_step_it_began(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, sharpening_then_eos())
    findings = list(rules.edge_of_stability(run))
    assert len(findings) == 1
    assert findings[0].evidence["start_step"] == 120  # 3.5/4 = 0.875 at step 110 is outside the band
    assert findings[0].steps[1] == 260
    assert findings[0].evidence["threshold"] == 4.0


def test_far_above_threshold_is_critical(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, [1.0, 2.0, 4.0, 9.0, 12.0, 3.0])
    findings = list(rules.sharpness_far_above_threshold(run))
    assert len(findings) == 1 and findings[0].severity == "critical"
    assert findings[0].evidence["step_of_max"] == 40 and findings[0].evidence["max_ratio"] == 3.0


def test_negative_curvature_fires_on_a_sustained_saddle(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, [1.0] * 6, lambda_min=[-0.01, -0.3, -0.4, -0.35, -0.3, -0.02])
    findings = list(rules.negative_curvature(run))
    assert len(findings) == 1
    assert findings[0].steps == (10, 40) and findings[0].evidence["lambda_min"] == -0.4
    assert findings[0].severity == "info"  # over by the end of the run


def test_adam_runs_cite_the_preconditioned_sharpness(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, sharpening_then_eos(), threshold=4.0, optimizer="AdamW")
    [finding] = rules.edge_of_stability(run)
    assert "preconditioned" in finding.title and "2022" in finding.reference


def test_clean_run_gives_no_hessian_finding(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, [1.0, 1.05, 0.98, 1.02, 1.0, 1.01, 0.99, 1.0], lambda_min=[-0.01] * 8)
    hessian_rules = {"progressive_sharpening", "edge_of_stability", "sharpness_far_above_threshold",
                     "negative_curvature"}
    assert [f for f in dl.diagnose(run) if f.rule in hessian_rules] == []


def test_short_overshoot_at_the_edge_is_not_called_unstable(tmp_path: Path) -> None:
    run = hessian_run(tmp_path, [1.0, 2.0, 3.5, 4.8, 5.2, 4.0, 4.1, 4.0])
    assert list(rules.sharpness_far_above_threshold(run)) == []
