"""Diagnosis: rules over a stored run that say what happened, when, and what to try.

A rule is a function ``rule(run) -> iterable of Finding``, registered with :func:`rule`. Rules
live beside the phenomenon they belong to (``dynlens/rules/<phenomenon>.py``, the same name as
the measure, probe and figure modules) and are all imported by ``dynlens.rules``.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from dynlens.probes.base import Probe, probe_name
from dynlens.store import Run

__all__ = ["Finding", "rule", "diagnose", "SEVERITIES", "registered_rules", "rule_probe", "evidence_number"]

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("critical", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One thing a rule found in a run.

    Attributes:
        title: one line saying what happened ("Loss spike at step 412").
        severity: "info", "warning" or "critical".
        steps: (first, last) step the finding covers.
        evidence: the numbers that triggered it, by name (JSON-friendly values).
        reference: the paper (or source) that describes the phenomenon.
        suggestion: what to try.
        probe: the probe whose section holds the evidence (the report links to it).
        rule: the name of the rule that fired.
    """

    title: str
    severity: Severity
    steps: tuple[int, int]
    evidence: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    suggestion: str = ""
    probe: str | None = None
    rule: str = ""


def evidence_number(x: float) -> float:
    """A number for a finding's evidence: rounded to 4 significant digits (inf and nan kept)."""
    x = float(x)
    return x if not math.isfinite(x) else float(f"{x:.4g}")


Rule = Callable[[Run], Iterable[Finding]]
_RULES: dict[str, Rule] = {}
_RULE_PROBES: dict[str, str | None] = {}


def rule(name: str, probe: str | type[Probe] | None = None) -> Callable[[Rule], Rule]:
    """Register a diagnosis rule under ``name`` (decorator). Re-registering replaces it.

    ``probe`` is the probe whose records the rule reads: its class (``probe=Hessian``) or name.
    Its findings that name no probe are that probe's (the report links them to its section and
    marks them on its figures); a rule over several probes passes None and names each finding's.

    Raises:
        ValueError: ``probe`` names no probe that exists (:func:`dynlens.probes.base.probe_name`).
    """
    probe_name_ = None if probe is None else probe_name(probe)

    def register(fn: Rule) -> Rule:
        _RULES[name] = fn
        _RULE_PROBES[name] = probe_name_
        return fn

    return register


def rule_probe(name: str) -> str | None:
    """The probe the rule ``name`` was registered for (None: several, or none)."""
    registered_rules()
    return _RULE_PROBES.get(name)


def registered_rules() -> dict[str, Rule]:
    """Every registered rule by name (the built-in ones are imported first)."""
    import dynlens.rules  # noqa: F401 - registers the built-in rules

    return dict(_RULES)


def diagnose(run: Run | str) -> list[Finding]:
    """Run every registered rule over ``run`` and return its findings, most severe first
    (then by first step). A rule that raises gives an "info" finding with its error instead
    of stopping the diagnosis."""
    from dynlens.store import load_run

    if not isinstance(run, Run):
        run = load_run(run)
    findings: list[Finding] = []
    for name, fn in registered_rules().items():
        try:
            for finding in fn(run):
                findings.append(_completed(finding, name, _RULE_PROBES.get(name)))
        except Exception as err:  # noqa: BLE001 - one broken rule must not hide the others
            findings.append(Finding(
                title=f"Diagnosis rule {name!r} failed", severity="info", steps=(0, run.last_step),
                evidence={"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()},
                suggestion="Report this as a dynlens bug, with the run if you can share it.",
                rule=name,
            ))
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.steps[0]))


def _completed(finding: Finding, name: str, probe: str | None) -> Finding:
    """The finding with the rule's name, and its probe where it names none."""
    from dataclasses import replace

    if finding.rule and (finding.probe is not None or probe is None):
        return finding
    return replace(finding, rule=finding.rule or name,
                   probe=finding.probe if finding.probe is not None else probe)
