"""Which figure functions draw which probe's section of a report.

A figure function takes ``(runs, findings)`` — a list of runs (one, or several to compare) and
the findings to mark — and returns a matplotlib Figure, or None when the runs hold nothing it
can draw. Modules register theirs with :func:`figure`; the report draws, for each probe present
in a run, every figure registered for it, in registration order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dynlens.diagnose import Finding
from dynlens.probes.base import Probe, probe_name
from dynlens.store import Run

__all__ = ["figure", "figures_for", "FigureSpec"]

FigureFn = Callable[[Sequence[Run], Sequence[Finding]], Any]


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure: the probe it belongs to, its title and its function."""

    probe: str
    title: str
    fn: FigureFn


_FIGURES: list[FigureSpec] = []


def figure(probe: str | type[Probe], title: str) -> Callable[[FigureFn], FigureFn]:
    """Register ``fn(runs, findings) -> Figure | None`` as a figure of ``probe``'s section
    (``probe``: the probe's class, e.g. ``figure(Hessian, "Sharpness")``, or its name).

    Raises:
        ValueError: ``probe`` names no probe that exists (:func:`dynlens.probes.base.probe_name`).
    """
    probe = probe_name(probe)

    def register(fn: FigureFn) -> FigureFn:
        _FIGURES[:] = [f for f in _FIGURES if not (f.probe == probe and f.title == title)]
        _FIGURES.append(FigureSpec(probe, title, fn))
        return fn

    return register


def figures_for(probe: str) -> list[FigureSpec]:
    """The figures registered for ``probe`` (import ``dynlens.reports`` first to load them all)."""
    return [f for f in _FIGURES if f.probe == probe]
