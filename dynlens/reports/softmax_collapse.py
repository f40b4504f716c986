"""Figures of the softmax-collapse probe: collapse by dtype, the margins against each dtype's
absorption margin, naive loss minimisation, and attention-logit growth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.measures.softmax import COLLAPSE_DTYPES, MARGIN_QUANTILES, absorption_margin
from dynlens.probes.softmax_collapse import SoftmaxCollapse
from dynlens.reports.basic import plot_per_layer
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    COLORS,
    RunLike,
    mark_findings,
    new_figure,
    plot_line,
    plot_series,
    report_style,
    run_labels,
    runs_and_findings,
)
from dynlens.store import Run

__all__ = ["plot_collapse", "plot_margins", "plot_nlm", "plot_attention_logits"]

PROBE = SoftmaxCollapse.name


@figure(SoftmaxCollapse, "Softmax collapse by dtype")
def plot_collapse(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """The collapsed share of the probe batch over steps in float32, bfloat16 and float16, and
    the share whose loss is exactly 0."""
    runs, findings = runs_and_findings(runs, findings)
    runs = [r for r in runs if "fraction" in r.scalar_names(PROBE)]
    if not runs:
        return None
    lines = [(f"fraction_{name}", name, {"color": COLORS[i % len(COLORS)]}) for i, name in enumerate(COLLAPSE_DTYPES)]
    lines.append(("zero_loss_fraction", "loss exactly 0", {"color": "#7F8C8D", "linestyle": ":"}))
    return _overlay("Softmax collapse: share of examples with Σ exp(z − max z) == 1", runs, findings, lines,
                    "share of the probe batch", (-0.02, 1.02))


@figure(SoftmaxCollapse, "Margins against each dtype's absorption margin")
def plot_margins(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """The margin z_y − max_{j≠y} z_j over steps (median, 5–95% and min–max bands), with the
    absorption margin ln 2^p of each dtype: past it, the other classes vanish in that dtype."""
    runs, findings = runs_and_findings(runs, findings)
    stacks = []
    for run in runs:
        records = run.arrays(PROBE, "margin_quantiles")
        if records:
            steps = np.array([s for s, _ in records])
            stacks.append((run, steps, np.stack([np.asarray(a, dtype=float) for _, a in records])))
    if not stacks:
        return None
    q = list(MARGIN_QUANTILES)
    labels = dict(zip([id(r) for r in runs], run_labels(runs), strict=True))
    with report_style():
        fig, axes = new_figure("Margins z_y − max z_j≠y of the probe batch", nrows=len(stacks), height=3.0)
        for ax, (run, steps, values) in zip(axes[:, 0], stacks, strict=True):
            ax.fill_between(steps, values[:, q.index(0.0)], values[:, q.index(1.0)], color=COLORS[0], alpha=0.12,
                            label="min–max")
            ax.fill_between(steps, values[:, q.index(0.05)], values[:, q.index(0.95)], color=COLORS[0], alpha=0.25,
                            label="5–95%")
            plot_line(ax, steps, values[:, q.index(0.5)], color=COLORS[0], label="median")
            for i, (name, dtype) in enumerate(COLLAPSE_DTYPES.items()):
                ax.axhline(absorption_margin(dtype), color=COLORS[(i + 1) % len(COLORS)], linestyle="--",
                           linewidth=0.9, label=f"{name} absorbs past {absorption_margin(dtype):.1f}")
            ax.set_ylabel("margin")
            if len(stacks) > 1:
                ax.set_title(labels[id(run)], loc="left")
            mark_findings(ax, findings, PROBE)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


@figure(SoftmaxCollapse, "Naive loss minimisation")
def plot_nlm(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """cos(−∇L, θ) and the optimizer's cos(θ_t − θ_{t−1}, θ_{t−1}) over steps: near 1, descent
    mostly scales the weights."""
    runs, findings = runs_and_findings(runs, findings)
    names = [n for n in ("nlm_cosine", "update_cosine") if any(n in r.scalar_names(PROBE) for r in runs)]
    if not names:
        return None
    lines = [(name, "cos(−∇L, θ)" if name == "nlm_cosine" else "cos(update, θ)", {"color": COLORS[i % len(COLORS)]})
             for i, name in enumerate(names)]
    return _overlay("Naive loss minimisation: alignment with θ", runs, findings, lines, "cosine", (-1.02, 1.02))


@figure(SoftmaxCollapse, "Largest attention logit per layer")
def plot_attention_logits(runs: RunLike | Sequence[RunLike],
                          findings: Sequence[Finding] | None = None) -> Figure | None:
    """max_ij q_i·k_j/√d of each attention layer over steps."""
    return plot_per_layer(runs, PROBE, findings, name="attention_max_logit",
                          ylabel="largest attention logit per layer")


def _overlay(title: str, runs: Sequence[Run], findings: Sequence[Finding],
             lines: Sequence[tuple[str, str, dict[str, Any]]], ylabel: str, ylim: tuple[float, float]) -> Figure:
    """One axis with the scalars ``lines`` ((name, label, style)) of every run overlaid."""
    with report_style():
        fig, axes = new_figure(title, height=3.0)
        ax = axes[0, 0]
        for name, label, style in lines:
            plot_series(ax, runs, PROBE, name, label=label, **style)
        ax.set_ylabel(ylabel)
        ax.set_ylim(*ylim)
        mark_findings(ax, findings, PROBE)
        ax.legend(loc="best")
    return fig
