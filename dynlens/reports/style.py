"""The shared look of dynlens figures, and helpers every figure module uses.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, no global state):
call :func:`new_figure` inside ``with report_style():`` and draw. Nothing here changes the global
``rcParams``; :data:`STYLE` is applied only inside :func:`report_style`.

Helpers:

* :func:`as_runs` — a Run, a path, or a list of them → a list of :class:`~dynlens.store.Run`.
* :func:`runs_and_findings` — :func:`as_runs`, with the findings to mark (diagnosed if ``None``).
* :func:`plot_series` — overlay one scalar of several runs (long series are downsampled to a
  min/max envelope, so a one-step spike stays visible).
* :func:`mark_findings` — vertical markers (one step) or spans (a step range) where findings fire.
* :func:`log_scale_if_spans_decades` — log y axis when the values span more than two decades.
* :func:`chosen` — up to a few records spread over a run (first, middle, last).
* :func:`plot_matrices_by_class` — square matrices over examples at chosen steps, one row of
  panels per run, the examples ordered by class.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dynlens.diagnose import Finding, diagnose
from dynlens.store import Run, load_run

__all__ = [
    "STYLE", "STEP_LABEL", "SEVERITY_COLORS", "COLORS", "report_style", "as_runs", "run_labels",
    "new_figure", "plot_series", "plot_line", "downsample", "mark_findings",
    "log_scale_if_spans_decades", "runs_and_findings", "RunLike", "chosen", "plot_matrices_by_class",
]

RunLike = Run | str | os.PathLike  # type: ignore[type-arg]

STEP_LABEL = "step (optimizer steps)"
MAX_POINTS = 2000

#: Colour-blind-safe cycle (Okabe & Ito 2008) used for runs and layers.
COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
SEVERITY_COLORS = {"critical": "#C0392B", "warning": "#E67E22", "info": "#7F8C8D"}

STYLE: dict[str, Any] = {
    "figure.facecolor": "white",
    "figure.dpi": 100,
    "axes.facecolor": "white",
    "axes.edgecolor": "#444444",
    "axes.grid": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.prop_cycle": matplotlib.cycler(color=COLORS),
    "grid.color": "#DDDDDD",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.3,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "font.size": 10,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "svg.fonttype": "none",  # text stays text in SVG: small files, escaped by matplotlib
    "svg.hashsalt": "dynlens",  # deterministic ids in the SVG
}


@contextlib.contextmanager
def report_style() -> Iterator[None]:
    """Apply :data:`STYLE` for the duration of the block (``matplotlib.rc_context``)."""
    with matplotlib.rc_context(STYLE):
        yield


def as_runs(runs: RunLike | Sequence[RunLike]) -> list[Run]:
    """A Run, a run directory, or a sequence of them, as a list of opened runs."""
    if isinstance(runs, (Run, str, os.PathLike)):
        runs = [runs]
    return [r if isinstance(r, Run) else load_run(r) for r in runs]


def runs_and_findings(runs: RunLike | Sequence[RunLike],
                      findings: Sequence[Finding] | None) -> tuple[list[Run], list[Finding]]:
    """:func:`as_runs` of ``runs``, and ``findings`` as a list (``None``: diagnose the runs)."""
    runs = as_runs(runs)
    if findings is None:
        findings = [f for run in runs for f in diagnose(run)]
    return runs, list(findings)


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Legend labels: the run names, made unique with the directory name where they clash."""
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.path.name})" for n, r in zip(names, runs, strict=True)]


def new_figure(title: str, nrows: int = 1, ncols: int = 1, width: float = 7.5,
               height: float = 3.0, sharex: bool = True) -> tuple[Figure, np.ndarray]:
    """A Figure with a ``nrows × ncols`` grid of axes (always a 2-D array) and a title; call it
    inside :func:`report_style`. Every bottom axis is labelled with :data:`STEP_LABEL`."""
    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, sharex=sharex, squeeze=False))
    fig.suptitle(title, fontsize=12, fontweight="bold", x=0.01, horizontalalignment="left")
    for ax in axes[-1]:
        ax.set_xlabel(STEP_LABEL)
    return fig, axes


def downsample(steps: np.ndarray, values: np.ndarray,
               max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` points that keep each bin's minimum and maximum (in step
    order), so spikes and dips survive; shorter series are returned unchanged. NaN values
    stay NaN (a bin that is all NaN gives NaN)."""
    n = len(values)
    if n <= max_points:
        return steps, values
    size = int(np.ceil(n / (max_points // 2)))
    bins = int(np.ceil(n / size))
    pad = bins * size - n
    v = np.concatenate([values.astype(float), np.full(pad, np.nan)]).reshape(bins, size)
    s = np.concatenate([steps.astype(float), np.full(pad, np.nan)]).reshape(bins, size)
    finite = np.isfinite(v)
    lo_i = np.argmin(np.where(finite, v, np.inf), axis=1)
    hi_i = np.argmax(np.where(finite, v, -np.inf), axis=1)
    rows = np.arange(bins)
    first, second = np.minimum(lo_i, hi_i), np.maximum(lo_i, hi_i)
    x = np.stack([s[rows, first], s[rows, second]], axis=1).ravel()
    y = np.stack([v[rows, first], v[rows, second]], axis=1).ravel()
    # A bin with NaN or Inf keeps it visible as a gap: the line breaks there.
    bad = ~finite.all(axis=1)
    y[np.repeat(bad & ~finite.any(axis=1), 2)] = np.nan
    keep = ~np.isnan(x)
    return x[keep], y[keep]


def plot_line(ax: Axes, steps: np.ndarray, values: np.ndarray, **kwargs: Any) -> None:
    """``ax.plot`` of a (downsampled) series; a series of one point is drawn as a marker."""
    x, y = downsample(np.asarray(steps), np.asarray(values, dtype=float))
    if len(x) == 1:
        kwargs.setdefault("marker", "o")
    ax.plot(x, y, **kwargs)


def plot_series(ax: Axes, runs: Sequence[Run], probe: str, name: str, label: str | None = None,
                **kwargs: Any) -> list[np.ndarray]:
    """Overlay the scalar ``probe/name`` of every run on ``ax`` (one colour per run) and return
    the plotted values (for :func:`log_scale_if_spans_decades`). ``label`` names the quantity;
    with several runs the legend shows ``run name`` (and ``label`` after it, if given)."""
    plotted = []
    labels = run_labels(runs)
    for i, (run, run_label) in enumerate(zip(runs, labels, strict=True)):
        series = run.series(probe, name)
        if series.empty:
            continue
        if len(runs) > 1:
            line_label = f"{run_label} — {label}" if label else run_label
        else:
            line_label = label
        kw = dict(kwargs)
        if len(runs) > 1:
            kw.setdefault("color", COLORS[i % len(COLORS)])
        plot_line(ax, series.index.to_numpy(), series.to_numpy(), label=line_label, **kw)
        plotted.append(series.to_numpy())
    return plotted


def mark_findings(ax: Axes, findings: Sequence[Finding], probe: str | None = None) -> None:
    """Mark on ``ax`` the steps where findings fire (call it after plotting the data): a dashed
    line at a single step or a short range, a shaded span over a longer range, coloured by
    severity. ``probe`` keeps only that probe's findings (a finding of no probe belongs to no
    figure: its rule reads several probes' records); ``None`` marks all."""
    seen: set[str] = set()
    low, high = ax.get_xlim()
    narrow = 0.005 * abs(high - low)  # a span thinner than this would not show: draw a line
    for f in findings:
        if probe is not None and f.probe != probe:
            continue
        color = SEVERITY_COLORS.get(f.severity, "#7F8C8D")
        label = None if f.severity in seen else f"{f.severity} finding"
        seen.add(f.severity)
        first, last = f.steps
        if last - first <= narrow:
            ax.axvline(first, color=color, linestyle="--", linewidth=0.9, alpha=0.8, label=label,
                       zorder=0)
        else:
            ax.axvspan(first, last, color=color, alpha=0.12, label=label, zorder=0, linewidth=0)


def log_scale_if_spans_decades(ax: Axes, values: Sequence[np.ndarray] | np.ndarray,
                               decades: float = 2.0) -> bool:
    """Switch ``ax`` to a log y axis when the positive finite values span more than
    ``decades`` powers of ten and none is ≤ 0. Returns whether it did."""
    arrays = [np.asarray(values, dtype=float).ravel()] if isinstance(values, np.ndarray) else [
        np.asarray(v, dtype=float).ravel() for v in values]
    if not arrays:
        return False
    all_values = np.concatenate(arrays)
    finite = all_values[np.isfinite(all_values)]
    if finite.size == 0 or (finite <= 0).any():
        return False
    if np.log10(finite.max() / finite.min()) > decades:
        ax.set_yscale("log")
        return True
    return False


def chosen(records: Sequence[Any], count: int) -> list[Any]:
    """At most ``count`` of ``records`` spread evenly from the first to the last (all of them
    when there are no more)."""
    records = list(records)
    if len(records) <= count:
        return records
    picks = np.unique(np.linspace(0, len(records) - 1, count).round().astype(int))
    return [records[i] for i in picks]


def plot_matrices_by_class(title: str, rows: Sequence[tuple[str, Sequence[tuple[int, np.ndarray]],
                                                            dict[int, np.ndarray]]],
                           colorbar_label: str, ylabel: str = "examples (by class)") -> Figure:
    """One row of panels per run: each ``(name, [(step, matrix)], {step: classes})`` draws its
    matrices (values in [−1, 1], a diverging map) with the examples ordered by their class at
    that step (stable: in their own order within a class; unordered where the step has no
    classes), thin lines between the classes; ``name`` titles the panels when there are
    several rows. Call inside :func:`report_style`."""
    ncols = max(len(matrices) for _, matrices, _ in rows)
    fig = Figure(figsize=(2.8 * ncols + 0.8, 2.7 * len(rows) + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    fig.suptitle(title, fontsize=12, fontweight="bold", x=0.01, horizontalalignment="left")
    image = None
    for r, (name, matrices, classes) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.grid(False)
            if c >= len(matrices):
                ax.set_visible(False)
                continue
            step, matrix = matrices[c]
            known = step in classes and len(classes[step]) == len(matrix)
            order = np.argsort(classes[step], kind="stable") if known else np.arange(len(matrix))
            image = ax.imshow(matrix[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            if known:  # thin lines between the classes
                ordered = np.asarray(classes[step])[order]
                for edge in np.flatnonzero(ordered[1:] != ordered[:-1]) + 0.5:
                    ax.axhline(edge, color="#333333", linewidth=0.6)
                    ax.axvline(edge, color="#333333", linewidth=0.6)
            ax.set_title(f"{name}, step {step}" if len(rows) > 1 else f"step {step}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(ylabel)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=colorbar_label)
    return fig
