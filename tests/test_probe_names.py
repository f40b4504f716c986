"""One name per probe: rules and figures are registered by the probe's class (or a checked name),
so a misspelt name fails where it is written."""

from __future__ import annotations

import pytest
from helpers import tiny_problem

import dynlens as dl
import dynlens.reports  # noqa: F401 - registers the built-in figures
from dynlens.diagnose import _RULE_PROBES, Finding, registered_rules, rule, rule_probe
from dynlens.probes.base import LENS, TRAINING, probe_name, probe_names
from dynlens.reports.registry import _FIGURES, figure


def test_every_built_in_rule_and_figure_belongs_to_a_probe_that_exists():
    known = probe_names()
    assert {TRAINING, LENS, dl.probes.Hessian.name, dl.probes.Coherence.name} <= known
    rules = registered_rules()
    assert rules and all(_RULE_PROBES[name] in known | {None} for name in rules)
    assert rule_probe("edge_of_stability") == dl.probes.Hessian.name
    assert rule_probe("loss_spike") == TRAINING
    assert _FIGURES and all(spec.probe in known for spec in _FIGURES)
    # every probe that writes records has a section with at least one figure
    built_in = [type(p) for p in dl.probes.basic() + dl.probes.default()]
    assert all(any(spec.probe == cls.name for spec in _FIGURES) for cls in built_in)


def test_a_misspelt_probe_name_fails_when_the_rule_or_figure_is_registered():
    with pytest.raises(ValueError, match="no probe is named 'hesian'"):
        rule("misspelt", probe="hesian")
    with pytest.raises(ValueError, match="no probe is named 'coherense'"):
        figure("coherense", "A figure")
    with pytest.raises(TypeError):
        probe_name(3)  # type: ignore[arg-type]
    assert probe_name(dl.probes.Hessian) == probe_name(dl.probes.Hessian()) == "hessian"


def test_a_users_probe_is_known_once_its_class_exists_and_its_findings_link_to_it(tmp_path):
    class Mine(dl.Probe):
        name = "mine_for_names_test"

        def measure(self, ctx):
            return {"value": 1.0}

    @rule("mine_fires", probe=Mine)
    def fires(run):
        yield Finding(title="it fired", severity="info", steps=(0, 0))

    try:
        model, loss_fn, batch = tiny_problem()
        with dl.Lens(model, loss_fn, batch, run_dir=tmp_path, probes=[Mine(every=1)], basic=False, budget=None):
            pass
        found = [f for f in dl.diagnose(tmp_path) if f.rule == "mine_fires"]
        assert [f.probe for f in found] == ["mine_for_names_test"]  # the rule's probe, filled in
    finally:
        import sys

        module = sys.modules["dynlens.diagnose"]
        module._RULES.pop("mine_fires", None)
        module._RULE_PROBES.pop("mine_fires", None)
