"""Figures of the opposing-signals probe: each pair of opposing groups' losses over steps beside
the overall loss, and the data map (variability against confidence)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dynlens.diagnose import Finding
from dynlens.probes.base import TRAINING
from dynlens.probes.opposing_signals import OpposingSignals
from dynlens.reports.registry import figure
from dynlens.reports.style import (
    COLORS,
    RunLike,
    mark_findings,
    new_figure,
    plot_line,
    report_style,
    runs_and_findings,
)
from dynlens.rules.opposing_signals import (
    MIN_MEASUREMENTS,
    data_map,
    pairs_of,
    stored_ledger,
)

__all__ = ["plot_opposing_groups", "plot_opposing_inputs", "plot_data_map"]

PROBE = OpposingSignals.name
MAX_PAIRS = 3


@figure(OpposingSignals, "Opposing groups")
def plot_opposing_groups(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """For the first run with a ledger: each opposing pair's two groups' mean losses over steps
    (up to three pairs), with the training loss and, where the Hessian probe ran, λ_max (its own
    scale, right) on the same step axis."""
    runs, findings = runs_and_findings(runs, findings)
    for run in runs:
        if stored_ledger(run, MIN_MEASUREMENTS) is None:
            continue
        pairs = pairs_of(run)[:MAX_PAIRS]
        if not pairs:
            return None
        loss = run.series(TRAINING, "loss")
        sharpness = (run.series("hessian", "sharpness").dropna() if "hessian" in run.probes()
                     else loss.iloc[:0])
        with report_style():
            fig, axes = new_figure("Opposing groups: mean loss of each group", nrows=len(pairs), height=2.8)
            for ax, pair in zip(axes[:, 0], pairs, strict=True):
                plot_line(ax, pair.steps, pair.loss_a, color=COLORS[0], label=f"group a ({len(pair.group_a)})")
                plot_line(ax, pair.steps, pair.loss_b, color=COLORS[1], label=f"group b ({len(pair.group_b)})")
                if not loss.empty:
                    plot_line(ax, loss.index.to_numpy(), loss.to_numpy(), color="#7F8C8D", label="training loss")
                ax.set_ylabel("loss")
                if not sharpness.empty:  # λ_max on the same step axis, its own scale
                    twin = ax.twinx()
                    plot_line(twin, sharpness.index.to_numpy(), sharpness.to_numpy(), color=COLORS[2],
                              label="λ_max")
                    twin.set_ylabel("λ_max", color=COLORS[2])
                ax.set_title(f"ρ = {pair.correlation:.2f}, p = {pair.p_value:.2g}", loc="left")
                mark_findings(ax, findings, PROBE)
                ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        return fig
    return None


@figure(OpposingSignals, "What opposing groups share")
def plot_opposing_inputs(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """For the first run with opposing pairs and stored inputs: each pair's shared input signal
    (both groups' mean input less the mean of all tracked examples) and each group's own, as
    images for image inputs (channels × height × width, 1 or 3 channels) and otherwise as bars
    of the features that differ most (up to three pairs)."""
    runs, _ = runs_and_findings(runs, findings)
    for run in runs:
        stored = run.arrays(PROBE, "inputs")
        pairs = [p for p in pairs_of(run) if p.shared_input_signal is not None][:MAX_PAIRS] if stored else []
        if not pairs:
            continue
        shape = stored[0][1].shape[1:]
        image = len(shape) == 3 and shape[0] in (1, 3)
        with report_style():
            fig, axes = new_figure("What opposing groups share: mean input less the mean of all examples",
                                   nrows=len(pairs), ncols=3, width=9.0, height=2.6, sharex=False)
            for row, pair in zip(axes, pairs, strict=True):
                signals = [("shared", pair.shared_input_signal), (f"group a ({len(pair.group_a)})", pair.input_signal_a),
                           (f"group b ({len(pair.group_b)})", pair.input_signal_b)]
                for ax, (title, signal) in zip(row, signals, strict=True):
                    ax.set_title(title, loc="left")
                    if image:
                        _show_image(ax, np.asarray(signal).reshape(shape))
                    else:
                        _show_bars(ax, np.asarray(signal))
        return fig
    return None


def _show_image(ax: Any, signal: np.ndarray) -> None:
    """A (C, H, W) signal as an image: one channel on a diverging map centred at 0, three
    channels rescaled to [0, 1] around 0.5."""
    scale = float(np.abs(signal).max()) or 1.0
    if signal.shape[0] == 1:
        ax.imshow(signal[0], cmap="RdBu_r", vmin=-scale, vmax=scale)
    else:
        ax.imshow(np.clip(0.5 + 0.5 * signal.transpose(1, 2, 0) / scale, 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def _show_bars(ax: Any, signal: np.ndarray, top: int = 12) -> None:
    """The ``top`` features of largest magnitude, by index."""
    order = np.argsort(-np.abs(signal))[:top]
    ax.bar([str(i) for i in order], signal[order], color=COLORS[0])
    ax.axhline(0.0, color="#7F8C8D", linewidth=0.8)
    ax.set_xlabel("input feature")


@figure(OpposingSignals, "Data map")
def plot_data_map(runs: RunLike | Sequence[RunLike], findings: Sequence[Finding] | None = None) -> Figure | None:
    """Variability against confidence of each tracked example (Swayamdipta et al. 2020),
    coloured by correctness; one panel per run."""
    runs, _ = runs_and_findings(runs, findings)
    ledgers = [(run, stored_ledger(run, 2)) for run in runs]
    frames = [(run, data_map(ledger)) for run, ledger in ledgers if ledger is not None]
    if not frames:
        return None
    with report_style():
        fig, axes = new_figure("Data map: confidence and variability of each example", ncols=len(frames),
                               width=4.5 * len(frames), height=4.0, sharex=False)
        for ax, (run, frame) in zip(axes[0], frames, strict=True):
            points = ax.scatter(frame["variability"], frame["confidence"], c=frame["correctness"], cmap="viridis",
                                vmin=0, vmax=1, s=10)
            ax.set_xlabel("variability (std of p(y))")
            ax.set_ylabel("confidence (mean p(y))")
            ax.set_title(run.name, loc="left")
            ax.set_xlim(-0.01, max(0.5, float(np.nanmax(frame["variability"])) + 0.01))
        fig.colorbar(points, ax=axes[0, -1], label="correctness")
    return fig
