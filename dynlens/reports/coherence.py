"""Figures of the gradient coherence probe: m-coherence over steps (overall and per class), the
gradient noise scale against the batch size in use, the stiffness matrix at chosen steps, and
the examples with the largest gradient norms.

Each takes a Run, a run directory or a list of them (overlaid where that reads well) and the
findings to mark (``None``: diagnose the runs), and returns a Figure or None::

    dl.reports.plot_coherence(["runs/real", "runs/shuffled"])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.probes.coherence import Coherence
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    COLORS,
    STEP_LABEL,
    RunLike,
    chosen,
    log_scale_if_spans_decades,
    mark_findings,
    new_figure,
    plot_line,
    plot_matrices_by_class,
    report_style,
    run_labels,
    runs_and_findings,
)
from dynlens.store import Run

__all__ = ["plot_coherence", "plot_noise_scale", "plot_stiffness", "plot_grad_norms"]

PROBE = Coherence.name
MAX_CLASS_LINES = 10
MAX_MATRIX_STEPS = 3
TOP_EXAMPLES = 15


def _with(runs: Sequence[Run], name: str, array: bool = False) -> list[Run]:
    return [r for r in runs if name in (r.array_names(PROBE) if array else r.scalar_names(PROBE))]


def _batch_size(run: Run) -> int | None:
    for key in ("batch_size", "batch"):
        value = run.config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


@figure(PROBE, "Gradient coherence")
def plot_coherence(runs: RunLike | Sequence[RunLike],
                   findings: Sequence[Finding] | None = None) -> Figure | None:
    """m-coherence ‖Σ g_i‖²/Σ‖g_i‖² over steps (about how many examples a step on one example
    helps; 1 = orthogonal gradients), runs overlaid, and below it the m-coherence of each class."""
    runs, findings = runs_and_findings(runs, findings)
    runs = _with(runs, "m_coherence")
    if not runs:
        return None
    with_classes = _with(runs, "per_class", array=True)
    labels = run_labels(runs)
    with report_style():
        fig, axes = new_figure("Gradient coherence (Chatterjee & Zielinski 2022)",
                               nrows=2 if with_classes else 1, height=2.8)
        ax = axes[0, 0]
        values = []
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            series = run.series(PROBE, "m_coherence")
            plot_line(ax, series.index.to_numpy(), series.to_numpy(), color=COLORS[i % len(COLORS)],
                      label=label if len(runs) > 1 else "whole probe batch")
            values.append(series.to_numpy())
        ax.axhline(1.0, color="#7F8C8D", linestyle=":", linewidth=1, label="orthogonal limit (1)")
        log_scale_if_spans_decades(ax, values + [np.ones(1)])
        ax.set_ylabel("m-coherence")
        mark_findings(ax, findings, PROBE)
        ax.legend(loc="best")
        if with_classes:
            ax = axes[1, 0]
            class_values = []
            for i, run in enumerate(runs):
                records = run.arrays(PROBE, "per_class")
                classes = run.arrays(PROBE, "classes")
                if not records:
                    continue
                steps = np.array([s for s, _ in records])
                table: dict[int, np.ndarray] = {}
                for k, ((_, per_class), (_, names)) in enumerate(zip(records, classes, strict=True)):
                    for c, v in zip(names.tolist(), per_class.tolist(), strict=True):
                        table.setdefault(int(c), np.full(len(steps), np.nan))[k] = v
                for j, (c, series) in enumerate(sorted(table.items())[:MAX_CLASS_LINES]):
                    color = COLORS[(i if len(runs) > 1 else j) % len(COLORS)]
                    label = f"class {c}" if len(runs) == 1 else (f"{labels[i]}" if j == 0 else None)
                    plot_line(ax, steps, series, color=color, linewidth=0.9, alpha=0.85, label=label)
                    class_values.append(series)
            ax.axhline(1.0, color="#7F8C8D", linestyle=":", linewidth=1)
            log_scale_if_spans_decades(ax, class_values + [np.ones(1)])
            ax.set_ylabel("m-coherence per class")
            ax.legend(loc="best", ncol=2)
    return fig


@figure(PROBE, "Gradient noise scale vs batch size")
def plot_noise_scale(runs: RunLike | Sequence[RunLike],
                     findings: Sequence[Finding] | None = None) -> Figure | None:
    """The gradient noise scale B_simple = tr(Σ)/‖G‖² over steps (McCandlish et al. 2018), with
    the training batch size from the run's config as a dashed line. Where noise dominates the
    probe batch (B_simple = +inf) the probe batch size m is drawn as a lower bound (▲)."""
    runs, findings = runs_and_findings(runs, findings)
    runs = _with(runs, "noise_scale")
    if not runs:
        return None
    labels = run_labels(runs)
    with report_style():
        fig, axes = new_figure("Gradient noise scale vs batch size (McCandlish et al. 2018)")
        ax = axes[0, 0]
        values = []
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            color = COLORS[i % len(COLORS)]
            noise = run.series(PROBE, "noise_scale")
            finite = noise.where(np.isfinite(noise))
            plot_line(ax, finite.index.to_numpy(), finite.to_numpy(), color=color, marker="o",
                      markersize=3, label=f"{label}: noise scale" if len(runs) > 1 else "noise scale B_simple")
            values.append(finite.dropna().to_numpy())
            size = run.series(PROBE, "size")
            infinite = noise[noise == np.inf]
            if len(infinite) and len(size):
                ax.plot(infinite.index, np.full(len(infinite), size.iloc[-1]), "^", color=color,
                        markersize=5, label="≥ probe batch (noise dominates)")
                values.append(np.array([size.iloc[-1]]))
            batch = _batch_size(run)
            if batch is not None:
                ax.axhline(batch, color=color, linestyle="--", linewidth=1,
                           label=f"{label}: batch size {batch}" if len(runs) > 1 else f"batch size {batch}")
                values.append(np.array([float(batch)]))
        log_scale_if_spans_decades(ax, values, decades=1.0)
        ax.set_ylabel("examples")
        mark_findings(ax, findings, PROBE)
        ax.legend(loc="best")
    return fig


@figure(PROBE, "Stiffness matrix")
def plot_stiffness(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None,
                   steps: Sequence[int] | None = None) -> Figure | None:
    """The stiffness matrix cos(g_i, g_j) (Fort et al. 2019) at chosen steps (default: first,
    middle, last stored), examples ordered by class so that within-class blocks lie on the
    diagonal; one row of panels per run."""
    runs, _ = runs_and_findings(runs, findings if findings is not None else [])
    runs = _with(runs, "stiffness", array=True)
    if not runs:
        return None
    rows = []
    for run in runs:
        records = run.arrays(PROBE, "stiffness")
        picked = ([r for r in records if r[0] in set(steps)] if steps is not None
                  else chosen(records, MAX_MATRIX_STEPS))
        classes = dict(run.arrays(PROBE, "labels"))
        if picked:
            rows.append((run, picked, classes))
    if not rows:
        return None
    labels = dict(zip([id(r) for r in runs], run_labels(runs), strict=True))
    with report_style():
        return plot_matrices_by_class("Stiffness cos(g_i, g_j) (Fort et al. 2019)",
                                      [(labels[id(run)], picked, classes) for run, picked, classes in rows],
                                      colorbar_label="cosine")


@figure(PROBE, "Largest per-example gradient norms")
def plot_grad_norms(runs: RunLike | Sequence[RunLike],
                    findings: Sequence[Finding] | None = None) -> Figure | None:
    """Top: the largest per-example gradient norms ‖g_i‖ at the last measurement (probe-batch
    index on each bar), one panel per run. Bottom: the largest and the median ‖g_i‖ over steps."""
    runs, findings = runs_and_findings(runs, findings)
    runs = _with(runs, "grad_norms", array=True)
    if not runs:
        return None
    labels = run_labels(runs)
    with report_style():
        fig = Figure(figsize=(7.5, 5.6), layout="constrained")
        fig.suptitle("Per-example gradient norms", fontsize=12, fontweight="bold", x=0.01,
                     horizontalalignment="left")
        grid = fig.add_gridspec(2, len(runs))
        bottom = fig.add_subplot(grid[1, :])
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            color = COLORS[i % len(COLORS)]
            records = run.arrays(PROBE, "grad_norms")
            step, norms = records[-1]
            top = np.argsort(-norms, kind="stable")[:TOP_EXAMPLES]
            ax = fig.add_subplot(grid[0, i])
            ax.bar(np.arange(len(top)), norms[top], color=color)
            ax.axhline(np.median(norms), color="#7F8C8D", linestyle=":", linewidth=1, label="median")
            ax.set_xticks(np.arange(len(top)), [str(int(j)) for j in top], fontsize=7, rotation=90)
            ax.set_xlabel("probe example")
            ax.set_ylabel("‖g_i‖")
            ax.set_title(f"{label + ', ' if len(runs) > 1 else ''}step {step}", fontsize=9)
            ax.legend(loc="upper right")
            steps = np.array([s for s, _ in records])
            plot_line(bottom, steps, np.array([np.max(n) for _, n in records]), color=color,
                      label=f"{label}: largest" if len(runs) > 1 else "largest")
            plot_line(bottom, steps, np.array([np.median(n) for _, n in records]), color=color,
                      linestyle="--", label=f"{label}: median" if len(runs) > 1 else "median")
        bottom.set_xlabel(STEP_LABEL)
        bottom.set_ylabel("‖g_i‖")
        bottom.set_yscale("log")
        mark_findings(bottom, findings, PROBE)
        bottom.legend(loc="best")
    return fig
