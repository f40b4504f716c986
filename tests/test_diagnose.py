"""The diagnosis mechanism: findings in order of severity, a failing rule reported, not raised."""

from __future__ import annotations

import numpy as np
from helpers import clean_loss, write_run

import dynlens as dl
from dynlens.diagnose import Finding, diagnose, registered_rules, rule


def test_findings_are_sorted_most_severe_first_then_by_step(tmp_path):
    loss = clean_loss(400)
    loss[300] = 50.0
    loss[380:] = np.nan
    run = dl.load_run(write_run(tmp_path / "run", loss=loss))
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
        findings = diagnose(dl.load_run(write_run(tmp_path / "run", loss=loss)))
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
    findings = dl.diagnose(str(write_run(tmp_path / "run", loss=loss)))
    assert findings and all(isinstance(f, Finding) and f.rule for f in findings)
    assert set(registered_rules()) >= {"loss_spike", "divergence", "stalled_training",
                                       "gradient_norm", "probe_failures"}
