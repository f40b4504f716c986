"""Figures of the Hessian probe: the sharpness over steps against the optimizer's stability
threshold, the spectral density at chosen steps (log-scale y, outliers marked), and the trace.

Each takes a Run, a run directory or a list of them (overlaid) and the findings to mark
(``None``: diagnose the runs), and returns a Figure or None::

    dl.reports.plot_sharpness(["runs/lr0.1", "runs/lr0.01"])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.linalg import smooth_density
from dynlens.probes.hessian import Hessian
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    COLORS,
    RunLike,
    chosen,
    log_scale_if_spans_decades,
    mark_findings,
    new_figure,
    plot_line,
    report_style,
    run_labels,
    runs_and_findings,
)
from dynlens.store import Run

__all__ = ["plot_sharpness", "plot_density", "plot_trace", "density_outliers"]

PROBE = Hessian.name
MAX_DENSITY_STEPS = 3
GRID_POINTS = 800


def _sharpness_name(run: Run) -> str:
    """The sharpness compared with the threshold: Adam's preconditioned one where recorded."""
    names = run.scalar_names(PROBE)
    return "preconditioned_sharpness" if "preconditioned_sharpness" in names else "sharpness"


def density_outliers(nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A boolean mask of the SLQ nodes beyond the bulk: above q₉₉ + (q₉₉ − q₁) or below
    q₁ − (q₉₉ − q₁), q_p the weighted p-th percentile of the density (Papyan 2019: the outliers
    of a C-class problem sit well apart from the bulk near 0)."""
    order = np.argsort(nodes)
    cumulative = np.cumsum(weights[order]) / max(weights.sum(), 1e-300)
    low = nodes[order][np.searchsorted(cumulative, 0.01)]
    high = nodes[order][min(np.searchsorted(cumulative, 0.99), len(nodes) - 1)]
    width = max(high - low, 1e-12)
    return (nodes > high + width) | (nodes < low - width)


@figure(PROBE, "Sharpness and stability threshold")
def plot_sharpness(runs: RunLike | Sequence[RunLike],
                   findings: Sequence[Finding] | None = None) -> Figure | None:
    """λ_max over steps (solid; Adam: the preconditioned sharpness) with the optimizer's stability
    threshold (dashed, same colour), runs overlaid; below, λ_min where it was measured."""
    runs, findings = runs_and_findings(runs, findings)
    runs = [r for r in runs if "sharpness" in r.scalar_names(PROBE)]
    if not runs:
        return None
    with_min = [r for r in runs if "lambda_min" in r.scalar_names(PROBE)]
    labels = run_labels(runs)
    with report_style():
        fig, axes = new_figure("Sharpness λ_max and the stability threshold (Cohen et al. 2021)",
                               nrows=2 if with_min else 1, height=2.8)
        ax = axes[0, 0]
        plotted = []
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            color = COLORS[i % len(COLORS)]
            name = _sharpness_name(run)
            series = run.series(PROBE, name).dropna()
            what = "preconditioned λ_max(P⁻¹H)" if name != "sharpness" else "λ_max"
            prefix = f"{label} — " if len(runs) > 1 else ""
            plot_line(ax, series.index.to_numpy(), series.to_numpy(), color=color, label=prefix + what)
            plotted.append(series.to_numpy())
            threshold = run.series(PROBE, "threshold").dropna()
            if len(threshold):
                plot_line(ax, threshold.index.to_numpy(), threshold.to_numpy(), color=color,
                          linestyle="--", linewidth=1.0, label=prefix + "threshold")
        log_scale_if_spans_decades(ax, plotted)
        ax.set_ylabel("top eigenvalue")
        mark_findings(ax, findings, PROBE)
        ax.legend(loc="best")
        if with_min:
            ax2 = axes[1, 0]
            for i, run in enumerate(runs):
                if run in with_min:
                    series = run.series(PROBE, "lambda_min").dropna()
                    plot_line(ax2, series.index.to_numpy(), series.to_numpy(),
                              color=COLORS[i % len(COLORS)], label=labels[i] if len(runs) > 1 else None)
            ax2.axhline(0.0, color="#888888", linewidth=0.8)
            ax2.set_ylabel("λ_min")
            mark_findings(ax2, findings, PROBE)
            if len(runs) > 1:
                ax2.legend(loc="best")
    return fig


@figure(PROBE, "Hessian spectral density")
def plot_density(runs: RunLike | Sequence[RunLike],
                 findings: Sequence[Finding] | None = None) -> Figure | None:
    """The SLQ spectral density (Gaussian-smoothed, log-scale y) at up to three steps of each run
    (first, middle, last measured), the outlier eigenvalues beyond the bulk marked with ticks."""
    runs, _ = runs_and_findings(runs, findings or [])
    runs = [r for r in runs if "density_nodes" in r.array_names(PROBE)]
    if not runs:
        return None
    labels = run_labels(runs)
    with report_style():
        fig, axes = new_figure("Hessian spectral density (stochastic Lanczos quadrature)",
                               nrows=len(runs), height=2.8, sharex=False)
        for row, (run, label) in enumerate(zip(runs, labels, strict=True)):
            ax = axes[row, 0]
            nodes_by_step = dict(run.arrays(PROBE, "density_nodes"))
            weights_by_step = dict(run.arrays(PROBE, "density_weights"))
            steps = chosen([s for s in nodes_by_step if s in weights_by_step], MAX_DENSITY_STEPS)
            low = min(float(nodes_by_step[s].min()) for s in steps)
            high = max(float(nodes_by_step[s].max()) for s in steps)
            span = max(high - low, 1e-12)
            grid = np.linspace(low - 0.05 * span, high + 0.05 * span, GRID_POINTS)
            sigma = span / 200
            for i, step in enumerate(steps):
                nodes, weights = nodes_by_step[step], weights_by_step[step]
                color = COLORS[i % len(COLORS)]
                density = np.maximum(smooth_density(nodes, weights, grid, sigma), 1e-12)
                ax.plot(grid, density, color=color, label=f"step {step}")
                outliers = nodes[density_outliers(nodes, weights)]
                if len(outliers):
                    ax.plot(outliers, np.full(len(outliers), 1e-11), linestyle="none", marker="|",
                            markersize=14, color=color)
            ax.set_yscale("log")
            ax.set_ylim(bottom=1e-12)
            ax.set_xlabel("eigenvalue" + (f" — {label}" if len(runs) > 1 else ""))
            ax.set_ylabel("density")
            ax.legend(loc="best", title="ticks: outliers")
    return fig


@figure(PROBE, "Hessian trace")
def plot_trace(runs: RunLike | Sequence[RunLike],
               findings: Sequence[Finding] | None = None) -> Figure | None:
    """tr(H) over steps with a ±2 standard-error band (Hutch++), runs overlaid; below, for SGD,
    η·tr(H)/2, which exceeds 1 where the minimum is not linearly stable for SGD (Wu & Su 2023)."""
    runs, findings = runs_and_findings(runs, findings)
    runs = [r for r in runs if "trace" in r.scalar_names(PROBE)]
    if not runs:
        return None
    with_ratio = [r for r in runs if "sgd_trace_ratio" in r.scalar_names(PROBE)]
    labels = run_labels(runs)
    with report_style():
        fig, axes = new_figure("Hessian trace tr(H) (Hutch++)", nrows=2 if with_ratio else 1, height=2.6)
        ax = axes[0, 0]
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            color = COLORS[i % len(COLORS)]
            trace = run.series(PROBE, "trace").dropna()
            stderr = run.series(PROBE, "trace_stderr").reindex(trace.index).fillna(0.0)
            plot_line(ax, trace.index.to_numpy(), trace.to_numpy(), color=color,
                      label=label if len(runs) > 1 else None)
            ax.fill_between(trace.index.to_numpy(), (trace - 2 * stderr).to_numpy(),
                            (trace + 2 * stderr).to_numpy(), color=color, alpha=0.15, linewidth=0)
        ax.set_ylabel("tr(H)")
        mark_findings(ax, findings, PROBE)
        if len(runs) > 1:
            ax.legend(loc="best")
        if with_ratio:
            ax2 = axes[1, 0]
            for i, run in enumerate(runs):
                if run in with_ratio:
                    ratio = run.series(PROBE, "sgd_trace_ratio").dropna()
                    plot_line(ax2, ratio.index.to_numpy(), ratio.to_numpy(), color=COLORS[i % len(COLORS)])
            ax2.axhline(1.0, color="#888888", linestyle="--", linewidth=0.9)
            ax2.set_ylabel("η·tr(H)/2")
    return fig
