"""Figures of the basic probes: training loss and learning rate, gradient norm, parameter norm,
update size, distance from initialisation, and their per-layer views.

Each ``plot_*`` function takes a Run, a run directory or a list of them (overlaid for
comparison) and the findings to mark (``None``: diagnose the runs), and returns a matplotlib
Figure, or None when the runs hold nothing to draw. They are registered as the figures of the
probes' report sections and can be called from a notebook::

    dl.reports.plot_loss("runs/exp1")
    dl.reports.plot_grad_norm(["runs/lr0.1", "runs/lr0.01"])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.probes.base import TRAINING
from dynlens.probes.basic import DistanceFromInit, GradNorm, ParamNorm, UpdateSize
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    COLORS,
    RunLike,
    log_scale_if_spans_decades,
    mark_findings,
    new_figure,
    plot_line,
    plot_series,
    report_style,
    run_labels,
    runs_and_findings,
)
from dynlens.store import Run

__all__ = [
    "plot_loss", "plot_grad_norm", "plot_param_norm", "plot_update_size",
    "plot_distance_from_init", "plot_per_layer",
]

MAX_LAYER_LINES = 10
MAX_HEATMAP_COLUMNS = 1500


def _has(runs: Sequence[Run], probe: str, name: str) -> bool:
    return any(name in run.scalar_names(probe) for run in runs)


def _panels(title: str, runs: Sequence[Run], findings: Sequence[Finding], probe: str,
            panels: Sequence[tuple[str, str, str]]) -> Figure | None:
    """One axis per (probe, name, y label) panel that some run holds, runs overlaid."""
    panels = [p for p in panels if _has(runs, p[0], p[1])]
    if not panels:
        return None
    with report_style():
        fig, axes = new_figure(title, nrows=len(panels), height=2.6 if len(panels) > 1 else 3.0)
        for ax, (panel_probe, name, ylabel) in zip(axes[:, 0], panels, strict=True):
            values = plot_series(ax, runs, panel_probe, name)
            log_scale_if_spans_decades(ax, values)
            ax.set_ylabel(ylabel)
            mark_findings(ax, findings, probe)
            if probe != TRAINING:
                mark_findings(ax, findings, TRAINING)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
    return fig


@figure(TRAINING, "Training loss and learning rate")
def plot_loss(runs: RunLike | Sequence[RunLike],
              findings: Sequence[Finding] | None = None) -> Figure | None:
    """Training loss (the loss passed to ``Lens.step``, per optimizer step) and, below it, the
    learning rate of each parameter group."""
    runs, findings = runs_and_findings(runs, findings)
    panels = [(TRAINING, "loss", "training loss")]
    lr_names = sorted({n for run in runs for n in run.scalar_names(TRAINING) if n.startswith("lr")})
    panels += [(TRAINING, n, "learning rate" if n == "lr" else f"learning rate ({n[3:]})")
               for n in lr_names]
    return _panels("Training loss", runs, findings, TRAINING, panels)


@figure(GradNorm, "Gradient norm")
def plot_grad_norm(runs: RunLike | Sequence[RunLike],
                   findings: Sequence[Finding] | None = None) -> Figure | None:
    """Euclidean norm of the gradient over all trainable parameters, ‖∇L‖₂."""
    runs, findings = runs_and_findings(runs, findings)
    return _panels("Gradient norm", runs, findings, GradNorm.name,
                   [(GradNorm.name, "total", "‖gradient‖₂")])


@figure(ParamNorm, "Parameter norm")
def plot_param_norm(runs: RunLike | Sequence[RunLike],
                    findings: Sequence[Finding] | None = None) -> Figure | None:
    """Euclidean norm of all trainable parameters, ‖θ‖₂."""
    runs, findings = runs_and_findings(runs, findings)
    return _panels("Parameter norm", runs, findings, ParamNorm.name,
                   [(ParamNorm.name, "total", "‖θ‖₂")])


@figure(UpdateSize, "Update size")
def plot_update_size(runs: RunLike | Sequence[RunLike],
                     findings: Sequence[Finding] | None = None) -> Figure | None:
    """Size of each optimizer step, ‖θ_t − θ_{t−1}‖₂, and relative to ‖θ_{t−1}‖₂."""
    runs, findings = runs_and_findings(runs, findings)
    return _panels("Update size", runs, findings, UpdateSize.name,
                   [(UpdateSize.name, "total", "‖Δθ‖₂"),
                    (UpdateSize.name, "relative", "‖Δθ‖₂ / ‖θ‖₂")])


@figure(DistanceFromInit, "Distance from initialisation")
def plot_distance_from_init(runs: RunLike | Sequence[RunLike],
                            findings: Sequence[Finding] | None = None) -> Figure | None:
    """Distance from the initial parameters, ‖θ_t − θ_0‖₂, absolute and relative to ‖θ_0‖₂
    (Chizat et al. 2019: small relative change = lazy regime)."""
    runs, findings = runs_and_findings(runs, findings)
    return _panels("Distance from initialisation", runs, findings, DistanceFromInit.name,
                   [(DistanceFromInit.name, "relative", "‖θ − θ₀‖₂ / ‖θ₀‖₂"),
                    (DistanceFromInit.name, "absolute", "‖θ − θ₀‖₂")])


_PER_LAYER_LABELS = {
    GradNorm.name: "‖gradient‖₂ per layer",
    ParamNorm.name: "‖θ‖₂ per layer",
    UpdateSize.name: "‖Δθ‖₂ per layer",
    DistanceFromInit.name: "‖θ − θ₀‖₂ / ‖θ₀‖₂ per layer",
}


def plot_per_layer(runs: RunLike | Sequence[RunLike], probe: str,
                   findings: Sequence[Finding] | None = None,
                   name: str = "per_layer", ylabel: str | None = None) -> Figure | None:
    """The per-layer array ``probe/name`` over steps, one panel per run: one line per entry
    (up to 10), else a heat map of log10 of the values (entries × steps). Entries are named by
    the array's own labels (:class:`dynlens.probes.base.Labelled`), else by the run's layers.

    Raises:
        ValueError: an unlabelled array's length differs from the run's number of layers (the
            probe must label it: which entry is which cannot be guessed).
    """
    runs, findings = runs_and_findings(runs, findings)
    stacks = []
    for run in runs:
        records = run.arrays(probe, name)
        if records:
            steps = np.fromiter((s for s, _ in records), dtype=np.int64, count=len(records))
            stacks.append((run, steps, np.stack([np.ravel(a) for _, a in records])))
    if not stacks:
        return None
    labels = dict(zip([id(r) for r in runs], run_labels(runs), strict=True))
    ylabel = ylabel or _PER_LAYER_LABELS.get(probe, f"{probe} {name}")
    with report_style():
        fig, axes = new_figure(f"{ylabel.split(' per layer')[0]}: per layer", nrows=len(stacks),
                               height=3.0)
        for ax, (run, steps, values) in zip(axes[:, 0], stacks, strict=True):
            own = run.array_labels(probe, name)
            layers = list(own if own is not None else run.meta.get("layers") or [])
            if len(layers) != values.shape[1]:
                raise ValueError(
                    f"{probe}/{name} has {values.shape[1]} entries a step and the run "
                    f"{'labels them' if own is not None else 'has layers'} {len(layers)}: "
                    "a probe's array that does not line up with the run's layers must carry its "
                    "own labels (return dl.probes.base.Labelled(values, labels))")
            if len(layers) <= MAX_LAYER_LINES:
                for i, layer in enumerate(layers):
                    plot_line(ax, steps, values[:, i], label=layer or "(root)",
                              color=COLORS[i % len(COLORS)])
                log_scale_if_spans_decades(ax, values)
                ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5),
                          title="layer" if own is None else None)
                ax.set_ylabel(ylabel)
            else:
                _heatmap(fig, ax, steps, values, layers)
            if len(stacks) > 1:
                ax.set_title(labels[id(run)], loc="left")
            mark_findings(ax, findings, probe)
    return fig


def _heatmap(fig: Figure, ax, steps: np.ndarray, values: np.ndarray, layers: list[str]) -> None:
    """log10(values) as an image, layers on the y axis, at most MAX_HEATMAP_COLUMNS steps
    (each column the maximum over its bin of steps)."""
    size = int(np.ceil(len(steps) / MAX_HEATMAP_COLUMNS))
    if size > 1:
        bins = int(np.ceil(len(steps) / size))
        pad = bins * size - len(steps)
        padded = np.concatenate([values, np.full((pad, values.shape[1]), np.nan)])
        values = np.nanmax(padded.reshape(bins, size, -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        image = np.log10(np.where(values > 0, values, np.nan)).T
    shown = ax.imshow(image, aspect="auto", interpolation="nearest", origin="lower",
                      extent=(float(steps[0]), float(steps[-1]), -0.5, len(layers) - 0.5),
                      cmap="viridis")
    ticks = np.arange(0, len(layers), int(np.ceil(len(layers) / 12)))
    ax.set_yticks(ticks, [layers[i] for i in ticks])
    ax.set_ylabel("layer")
    ax.grid(False)
    fig.colorbar(shown, ax=ax, label="log10 value")


def _per_layer_figure(probe: str):
    def draw(runs: RunLike | Sequence[RunLike],
             findings: Sequence[Finding] | None = None) -> Figure | None:
        return plot_per_layer(runs, probe, findings)

    draw.__name__ = f"plot_{probe}_per_layer"
    draw.__doc__ = f"The per-layer view of {probe} (see plot_per_layer)."
    return draw


for _probe in (GradNorm, ParamNorm, UpdateSize, DistanceFromInit):
    figure(_probe, "Per layer")(_per_layer_figure(_probe.name))
