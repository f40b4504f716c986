"""Figures of the weight-spectrum probe: each weight matrix's top singular value and stable
rank over training, one line per matrix (a heat map beyond ten)."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.probes.weight_spectrum import WeightSpectrum
from dynlens.reports.basic import plot_per_layer
from dynlens.reports.registry import figure
from dynlens.reports.style import RunLike

__all__ = ["plot_top_singular_value", "plot_stable_rank"]

PROBE = WeightSpectrum.name


@figure(WeightSpectrum, "Top singular value per weight matrix")
def plot_top_singular_value(runs: RunLike | Sequence[RunLike],
                            findings: Sequence[Finding] | None = None) -> Figure | None:
    """σ_max(W) of each weight matrix over steps (the spectral norm)."""
    return plot_per_layer(runs, PROBE, findings, name="top_singular_value",
                          ylabel="σ_max(W) per weight matrix")


@figure(WeightSpectrum, "Stable rank per weight matrix")
def plot_stable_rank(runs: RunLike | Sequence[RunLike],
                     findings: Sequence[Finding] | None = None) -> Figure | None:
    """‖W‖_F²/σ_max² of each weight matrix over steps (its findings marked)."""
    return plot_per_layer(runs, PROBE, findings, name="stable_rank",
                          ylabel="stable rank per weight matrix")
