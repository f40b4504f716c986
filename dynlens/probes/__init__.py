"""Probes: a measurement, a schedule and the records it writes (``dl.probes.Hessian(every=100)``).

``basic()`` lists the cheap probes every Lens adds; ``default()`` lists every built-in probe
(``Lens(probes="default")``).
"""

from __future__ import annotations

from dynlens.probes.base import Context, Probe
from dynlens.probes.basic import DistanceFromInit, GradNorm, ParamNorm, UpdateSize
from dynlens.probes.coherence import Coherence
from dynlens.probes.hessian import Hessian
from dynlens.probes.ntk import NTK
from dynlens.probes.opposing_signals import OpposingSignals
from dynlens.probes.softmax_collapse import SoftmaxCollapse
from dynlens.probes.weight_spectrum import WeightSpectrum

__all__ = [
    "Probe",
    "Context",
    "GradNorm",
    "ParamNorm",
    "UpdateSize",
    "DistanceFromInit",
    "Hessian",
    "Coherence",
    "WeightSpectrum",
    "SoftmaxCollapse",
    "OpposingSignals",
    "NTK",
    "basic",
    "default",
]


def basic() -> list[Probe]:
    """New instances of the basic probes (every 50 steps by default: a few passes over the
    parameters each)."""
    return [GradNorm(), ParamNorm(), UpdateSize(), DistanceFromInit()]


def default() -> list[Probe]:
    """New instances of every built-in probe beyond the basic ones, with their default schedules."""
    return [Hessian(), Coherence(), WeightSpectrum(), SoftmaxCollapse(), OpposingSignals(), NTK()]
