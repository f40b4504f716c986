"""Figures of the NTK probe: the kernel's distance from initialisation, its velocity and the
relative parameter change, its alignment with the task (overall and per layer), its top
eigenvalues over steps, its spectrum at chosen steps, and the kernel itself sorted by class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.probes.ntk import NTK
from dynlens.reports.basic import plot_per_layer
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    COLORS,
    RunLike,
    chosen,
    mark_findings,
    new_figure,
    plot_matrices_by_class,
    plot_series,
    report_style,
    run_labels,
    runs_and_findings,
)
from dynlens.store import Run

__all__ = ["plot_kernel_motion", "plot_kernel_alignment", "plot_kernel_alignment_per_layer",
           "plot_kernel_eigenvalues", "plot_kernel_spectra", "plot_kernel_by_class"]

PROBE = NTK.name
MAX_KERNEL_STEPS = 3  # the spectra and images drawn: first, middle and last stored


@figure(NTK, "Kernel distance from initialisation and velocity")
def plot_kernel_motion(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """1 − cos(K_t, K_0), the distance per step between measurements and, where recorded, the
    relative parameter change ‖θ_t − θ_0‖/‖θ_0‖, on log axes (small kernel and parameter motion
    together: the lazy regime)."""
    runs, findings = runs_and_findings(runs, findings)
    runs = [r for r in runs if "distance_from_init" in r.scalar_names(PROBE)]
    if not runs:
        return None
    panels = [("distance_from_init", "kernel distance from init"), ("velocity", "distance per step")]
    if any("parameter_change" in r.scalar_names(PROBE) for r in runs):
        panels.append(("parameter_change", "parameter change ‖θ−θ₀‖/‖θ₀‖"))
    with report_style():
        fig, axes = new_figure("Empirical NTK: how far and how fast the kernel moves", nrows=len(panels), height=2.6)
        for ax, (name, label) in zip(axes[:, 0], panels, strict=True):
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


def _kernel_records(run: Run, name: str) -> list[tuple[int, np.ndarray]]:
    """The array ``name`` of the NTK probe at its first, middle and last stored steps."""
    return chosen(run.arrays(PROBE, name), MAX_KERNEL_STEPS)


@figure(NTK, "Kernel spectrum at chosen steps")
def plot_kernel_spectra(runs: RunLike | Sequence[RunLike],
                        findings: Sequence[Finding] | None = None) -> Figure | None:
    """Every eigenvalue of the kernel, largest first, at up to three steps of each run (first,
    middle, last measured), on a log axis (eigenvalues ≤ 0, rounding of a singular kernel, are
    left out): how the kernel's spectrum spreads or concentrates as it learns."""
    runs, _ = runs_and_findings(runs, findings or [])
    runs = [r for r in runs if "eigenvalues" in r.array_names(PROBE)]
    if not runs:
        return None
    labels = run_labels(runs)
    with report_style():
        fig, axes = new_figure("Empirical NTK: eigenvalues of the kernel at chosen steps", nrows=len(runs),
                               height=2.8, sharex=False)
        for row, (run, label) in enumerate(zip(runs, labels, strict=True)):
            ax = axes[row, 0]
            for i, (step, eigenvalues) in enumerate(_kernel_records(run, "eigenvalues")):
                index = np.arange(1, len(eigenvalues) + 1)
                positive = eigenvalues > 0
                ax.plot(index[positive], eigenvalues[positive], marker=".", color=COLORS[i % len(COLORS)],
                        label=f"step {step}")
            ax.set_yscale("log")
            ax.set_xlabel("eigenvalue index (largest first)" + (f" — {label}" if len(runs) > 1 else ""))
            ax.set_ylabel("eigenvalue")
            ax.legend(loc="best")
    return fig


@figure(NTK, "The kernel sorted by class")
def plot_kernel_by_class(runs: RunLike | Sequence[RunLike],
                         findings: Sequence[Finding] | None = None) -> Figure | None:
    """The kernel normalised to Θ(x_i, x_j)/√(Θ(x_i, x_i) Θ(x_j, x_j)) at up to three steps of
    each run, the examples ordered by class: a kernel that has learnt the task shows
    within-class blocks on the diagonal (Baratin et al. 2021)."""
    runs, _ = runs_and_findings(runs, findings or [])
    runs = [r for r in runs if "kernel" in r.array_names(PROBE)]
    if not runs:
        return None
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        classes = dict(run.arrays(PROBE, "targets"))
        rows.append((label, [(step, _normalised(kernel)) for step, kernel in _kernel_records(run, "kernel")], classes))
    with report_style():
        return plot_matrices_by_class("Empirical NTK, normalised, examples by class", rows,
                                      colorbar_label="Θ(x_i, x_j) / √(Θ_ii Θ_jj)")


def _normalised(kernel: np.ndarray) -> np.ndarray:
    """K_ij/√(K_ii K_jj), NaN where a diagonal entry is not positive."""
    kernel = kernel.astype(np.float64)
    diagonal = np.diagonal(kernel)
    scale = np.sqrt(np.where(diagonal > 0, diagonal, np.nan))
    return kernel / np.outer(scale, scale)
