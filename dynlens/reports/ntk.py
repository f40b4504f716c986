"""Figures of the NTK probe: the kernel's distance from initialisation and its velocity, its
alignment with the task (overall and per layer), and its top eigenvalues."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.probes.ntk import NTK
from dynlens.reports.basic import plot_per_layer
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    RunLike,
    mark_findings,
    new_figure,
    plot_series,
    report_style,
    runs_and_findings,
)

__all__ = ["plot_kernel_motion", "plot_kernel_alignment", "plot_kernel_alignment_per_layer",
           "plot_kernel_eigenvalues"]

PROBE = NTK.name


@figure(NTK, "Kernel distance from initialisation and velocity")
def plot_kernel_motion(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """1 − cos(K_t, K_0) and the distance per step between measurements, on log axes."""
    runs, findings = runs_and_findings(runs, findings)
    runs = [r for r in runs if "distance_from_init" in r.scalar_names(PROBE)]
    if not runs:
        return None
    with report_style():
        fig, axes = new_figure("Empirical NTK: how far and how fast the kernel moves", nrows=2, height=2.6)
        for ax, (name, label) in zip(axes[:, 0], [("distance_from_init", "distance from init"),
                                                  ("velocity", "distance per step")], strict=True):
            plot_series(ax, runs, PROBE, name)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            mark_findings(ax, findings, PROBE)
        axes[-1, 0].set_xscale("symlog")
        if len(runs) > 1:
            axes[0, 0].legend(loc="best")
    return fig


@figure(NTK, "Kernel–target alignment")
def plot_kernel_alignment(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """The centred alignment of the kernel with the targets over steps."""
    runs, findings = runs_and_findings(runs, findings)
    runs = [r for r in runs if "alignment" in r.scalar_names(PROBE)]
    if not runs:
        return None
    with report_style():
        fig, axes = new_figure("Empirical NTK: centred kernel–target alignment", height=3.0)
        plot_series(axes[0, 0], runs, PROBE, "alignment")
        axes[0, 0].set_ylabel("alignment")
        mark_findings(axes[0, 0], findings, PROBE)
        if len(runs) > 1:
            axes[0, 0].legend(loc="best")
    return fig


@figure(NTK, "Alignment per layer")
def plot_kernel_alignment_per_layer(runs: RunLike | Sequence[RunLike],
                                    findings: Sequence[Finding] | None = None) -> Figure | None:
    """Each layer's kernel's alignment with the targets (a heat map beyond ten layers)."""
    return plot_per_layer(runs, PROBE, findings, name="alignment_per_layer", ylabel="alignment per layer")


@figure(NTK, "Top eigenvalues of the kernel")
def plot_kernel_eigenvalues(runs: RunLike | Sequence[RunLike],
                            findings: Sequence[Finding] | None = None) -> Figure | None:
    """The kernel's largest eigenvalues over steps."""
    return plot_per_layer(runs, PROBE, findings, name="top_eigenvalues", ylabel="top eigenvalues of the NTK")
