"""Diagnosis: rules over a stored run that say what happened, when, and what to try.

A rule is a function ``rule(run) -> iterable of Finding``, registered with :func:`rule`. Rules
live beside the phenomenon they belong to (``dynlens/rules/<phenomenon>.py``, the same name as
the measure, probe and figure modules) and are all imported by ``dynlens.rules``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from dynlens.store import Run

__all__ = ["Finding", "rule", "diagnose", "SEVERITIES", "registered_rules"]

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


Rule = Callable[[Run], Iterable[Finding]]
_RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register a diagnosis rule under ``name`` (decorator). Re-registering replaces it."""

    def register(fn: Rule) -> Rule:
        _RULES[name] = fn
        return fn

    return register


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
                findings.append(finding if finding.rule else _with_rule(finding, name))
        except Exception as err:  # noqa: BLE001 - one broken rule must not hide the others
            findings.append(Finding(
                title=f"Diagnosis rule {name!r} failed", severity="info", steps=(0, run.last_step),
                evidence={"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()},
                suggestion="Report this as a dynlens bug, with the run if you can share it.",
                rule=name,
            ))
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.steps[0]))


def _with_rule(finding: Finding, name: str) -> Finding:
    from dataclasses import replace

    return replace(finding, rule=name)
