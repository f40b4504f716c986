"""Diagnosis rules over the basic probes (training loss, gradient norm) and the run's events.

* ``loss_spike``: a step's training loss above ``SPIKE_FACTOR`` (3) times the median of the
  ``SPIKE_WINDOW`` (50) losses before it (Rosenfeld & Risteski 2024; Wortsman et al. 2023).
* ``divergence``: NaN or Inf in the loss, the gradient norm or the parameter norm.
* ``stalled_training``: the loss stays flat (its median changes by less than 1 % across a window
  of a tenth of the run) while the gradient norm stays at least a tenth of its early value and
  the loss is far from zero (dynlens heuristic).
* ``gradient_norm`` (exploding or vanishing gradients): the total gradient norm rises above 100
  times, or falls below 1/1000 of, its median over the first tenth of the run (Pascanu, Mikolov &
  Bengio 2013); vanishing only counts while the loss is still above a tenth of its start.
* ``probe_failures``: a probe that raised (error events) or was switched off (warning events).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from dynlens.diagnose import Finding, rule
from dynlens.diagnose import evidence_number as _g
from dynlens.probes.base import TRAINING
from dynlens.probes.basic import GradNorm, ParamNorm
from dynlens.store import Run

SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
SPIKE_MERGE_GAP = 5
MAX_SPIKE_FINDINGS = 5
STALL_CHANGE = 0.01
EXPLODE_FACTOR = 100.0
VANISH_FACTOR = 1e-3

_SPIKE_REFERENCE = (
    "Rosenfeld & Risteski 2024, \"Outliers with Opposing Signals Have an Outsized Effect on "
    "Neural Network Optimization\"; Wortsman et al. 2023, \"Small-scale proxies for large-scale "
    "Transformer training instabilities\""
)
_GRADIENT_REFERENCE = (
    "Pascanu, Mikolov & Bengio 2013, \"On the difficulty of training recurrent neural networks\""
)


def _episodes(steps: np.ndarray, gap: int) -> list[tuple[int, int, np.ndarray]]:
    """Group sorted steps into runs whose consecutive steps are at most ``gap`` apart."""
    if len(steps) == 0:
        return []
    breaks = np.flatnonzero(np.diff(steps) > gap) + 1
    return [(int(g[0]), int(g[-1]), g) for g in np.split(steps, breaks)]



def spike_ratios(run: Run) -> pd.Series:
    """The steps whose training loss exceeds ``SPIKE_FACTOR`` × the running median of the
    ``SPIKE_WINDOW`` losses before them (at least ``SPIKE_MIN_HISTORY``, median > 0), with that
    ratio; empty when there are none (or too few losses)."""
    loss = run.series(TRAINING, "loss")
    if len(loss) <= SPIKE_MIN_HISTORY:
        return pd.Series(dtype=float)
    finite = loss.where(np.isfinite(loss))
    median = finite.rolling(SPIKE_WINDOW, min_periods=SPIKE_MIN_HISTORY).median().shift(1)
    ratio = finite / median.where(median > 0)
    return ratio[ratio > SPIKE_FACTOR]


@rule("loss_spike", probe=TRAINING)
def loss_spike(run: Run) -> Iterator[Finding]:
    """Steps whose loss exceeds SPIKE_FACTOR × the running median of the SPIKE_WINDOW losses
    before them (at least SPIKE_MIN_HISTORY of them, median > 0). Nearby spike steps (within
    SPIKE_MERGE_GAP) form one episode; the MAX_SPIKE_FINDINGS largest episodes are reported,
    the rest summarised in one finding."""
    spikes = spike_ratios(run)
    if spikes.empty:
        return
    loss = run.series(TRAINING, "loss")
    episodes = []
    for first, last, steps in _episodes(spikes.index.to_numpy(), SPIKE_MERGE_GAP):
        peak_step = int(spikes.loc[steps].idxmax())
        episodes.append((float(spikes.loc[peak_step]), first, last, peak_step))
    episodes.sort(reverse=True)
    for peak_ratio, first, last, peak in episodes[:MAX_SPIKE_FINDINGS]:
        where = f"step {first}" if first == last else f"steps {first}–{last}"
        yield Finding(
            title=f"Loss spike at {where}: {peak_ratio:.1f}× the running median",
            severity="warning", steps=(first, last), probe=TRAINING,
            evidence={"peak_step": peak, "loss": _g(loss[peak]),
                      "running_median": _g(loss[peak] / peak_ratio), "ratio": _g(peak_ratio),
                      "threshold_factor": SPIKE_FACTOR, "window_steps": SPIKE_WINDOW},
            reference=_SPIKE_REFERENCE,
            suggestion=(
                "Lower the learning rate or lengthen warmup; clip the gradient norm; with Adam, "
                "try a larger epsilon or a smaller beta2. Check whether a few examples drive the "
                "spike (the coherence probe's largest per-example gradient norms) and whether sharpness crossed 2/lr "
                "(dl.probes.Hessian)."
            ),
        )
    if len(episodes) > MAX_SPIKE_FINDINGS:
        rest = episodes[MAX_SPIKE_FINDINGS:]
        yield Finding(
            title=f"{len(rest)} more loss spikes (smaller than those above)",
            severity="info", steps=(min(e[1] for e in rest), max(e[2] for e in rest)),
            probe=TRAINING,
            evidence={"episodes": len(rest), "spike_steps": int(sum(1 for _ in spikes.index)),
                      "largest_ratio": _g(rest[0][0]), "threshold_factor": SPIKE_FACTOR},
            reference=_SPIKE_REFERENCE,
            suggestion="Frequent spikes point to a learning rate near the edge of stability.",
        )


@rule("divergence", probe=TRAINING)
def divergence(run: Run) -> Iterator[Finding]:
    """NaN or Inf in the training loss, the total gradient norm or the total parameter norm."""
    checks = [(TRAINING, "loss", "loss"), (GradNorm.name, "total", "gradient norm"),
              (ParamNorm.name, "total", "parameter norm")]
    bad: list[tuple[int, str, int, pd.Series]] = []
    for probe, name, label in checks:
        series = run.series(probe, name)
        nonfinite = series[~np.isfinite(series.to_numpy())]
        if not nonfinite.empty:
            bad.append((int(nonfinite.index[0]), label, len(nonfinite), series))
    if not bad:
        return
    bad.sort(key=lambda b: b[0])
    first, label, count, series = bad[0]
    before = series.loc[:first - 1]
    before = before[np.isfinite(before.to_numpy())]
    evidence = {"first_nonfinite_step": first, "quantity": label,
                "nonfinite_records": count,
                "last_finite_step": int(before.index[-1]) if len(before) else None,
                "last_finite_value": _g(before.iloc[-1]) if len(before) else None}
    for _, other, other_count, _ in bad[1:]:
        evidence[f"nonfinite_{other.replace(' ', '_')}_records"] = other_count
    yield Finding(
        title=f"Training diverged: {label} is NaN/Inf from step {first}",
        severity="critical", steps=(first, run.last_step), probe=TRAINING,
        evidence=evidence,
        reference="dynlens check (IEEE 754 non-finite values); see Wortsman et al. 2023 for "
                  "the usual causes in Transformers",
        suggestion=(
            "Lower the learning rate, add warmup and gradient clipping; look for log(0), "
            "division by zero or overflow in float16 (use bfloat16 or loss scaling). The steps "
            "just before the first NaN usually show a loss or gradient-norm spike."
        ),
    )


@rule("stalled_training", probe=TRAINING)
def stalled_training(run: Run) -> Iterator[Finding]:
    """Windows of a tenth of the run (at least 50 loss records) where the loss median changes by
    less than STALL_CHANGE (relative) between the first and last quarter of the window, the
    loss is above a tenth of its initial value, and the gradient norm's median is at least a
    tenth of its early median. Consecutive stalled windows are merged into one finding."""
    loss = run.series(TRAINING, "loss")
    loss = loss[np.isfinite(loss.to_numpy())]
    grad = run.series(GradNorm.name, "total")
    grad = grad[np.isfinite(grad.to_numpy())]
    n = len(loss)
    width = max(50, n // 10)
    if n < 2 * width or len(grad) < 4:
        return
    quarter = max(width // 4, 1)
    values, steps = loss.to_numpy(), loss.index.to_numpy()
    initial = float(np.median(values[:quarter]))
    grad_early = float(np.median(grad.to_numpy()[: max(len(grad) // 10, 2)]))
    if initial <= 0 or grad_early <= 0:
        return
    stalled: list[tuple[int, int, float, float, float]] = []
    for start in range(0, n - width + 1, width // 2):
        window = values[start:start + width]
        head, tail = float(np.median(window[:quarter])), float(np.median(window[-quarter:]))
        change = abs(tail - head) / abs(head)
        first, last = int(steps[start]), int(steps[start + width - 1])
        g = grad.loc[first:last].to_numpy()
        if len(g) == 0:
            continue
        g_median = float(np.median(g))
        if change < STALL_CHANGE and tail > 0.1 * initial and g_median >= 0.1 * grad_early:
            stalled.append((first, last, change, tail, g_median))
    if not stalled:
        return
    merged = [list(stalled[0])]
    for first, last, change, tail, g_median in stalled[1:]:
        if first <= merged[-1][1]:
            merged[-1][1] = last
            merged[-1][2] = max(merged[-1][2], change)
            merged[-1][3], merged[-1][4] = tail, g_median
        else:
            merged.append([first, last, change, tail, g_median])
    for first, last, change, tail, g_median in merged:
        yield Finding(
            title=f"Training stalled from step {first} to {last}: flat loss, gradient still large",
            severity="warning", steps=(int(first), int(last)), probe=TRAINING,
            evidence={"relative_loss_change": _g(change), "loss": _g(tail),
                      "initial_loss": _g(initial), "grad_norm_median": _g(g_median),
                      "early_grad_norm_median": _g(grad_early),
                      "flat_threshold": STALL_CHANGE},
            reference="dynlens heuristic (plateaus: Saxe, McClelland & Ganguli 2014; "
                      "Dauphin et al. 2014 on saddle points)",
            suggestion=(
                "The optimizer moves but the loss does not improve: the learning rate may be too "
                "high (bouncing across a valley) or too low for the gradient scale; try a "
                "learning-rate sweep, a schedule with decay, or check the data/labels pipeline "
                "(shuffled or constant labels give exactly this picture)."
            ),
        )


@rule("gradient_norm", probe=GradNorm)
def gradient_norm(run: Run) -> Iterator[Finding]:
    """Exploding (above EXPLODE_FACTOR × the early median) or vanishing (below VANISH_FACTOR ×
    the early median while the loss is above a tenth of its start) total gradient norm."""
    grad = run.series(GradNorm.name, "total")
    grad = grad[np.isfinite(grad.to_numpy())]
    if len(grad) < 10:
        return
    early = float(np.median(grad.to_numpy()[: max(len(grad) // 10, 5)]))
    if early <= 0:
        return
    high = grad[grad > EXPLODE_FACTOR * early]
    if not high.empty:
        peak = int(high.idxmax())
        yield Finding(
            title=f"Exploding gradient norm: {grad[peak] / early:.3g}× its early value at step {peak}",
            severity="critical" if grad[peak] > 1e2 * EXPLODE_FACTOR * early else "warning",
            steps=(int(high.index[0]), int(high.index[-1])), probe=GradNorm.name,
            evidence={"peak_step": peak, "grad_norm": _g(grad[peak]), "early_median": _g(early),
                      "ratio": _g(grad[peak] / early), "steps_above": len(high),
                      "threshold_factor": EXPLODE_FACTOR},
            reference=_GRADIENT_REFERENCE,
            suggestion="Clip the gradient norm (torch.nn.utils.clip_grad_norm_), lower the "
                       "learning rate or add warmup; check normalisation layers and initialisation.",
        )
    low = grad[grad < VANISH_FACTOR * early]
    if low.empty:
        return
    loss = run.series(TRAINING, "loss")
    loss = loss[np.isfinite(loss.to_numpy())]
    if len(loss):
        initial = float(np.median(loss.to_numpy()[: max(len(loss) // 10, 1)]))
        at = loss.reindex(low.index).dropna()
        low = low.loc[at.index[at > 0.1 * initial]] if initial > 0 else low.iloc[:0]
    if len(low) < 3:
        return
    yield Finding(
        title=f"Vanishing gradient norm from step {int(low.index[0])} while the loss is still high",
        severity="warning", steps=(int(low.index[0]), int(low.index[-1])), probe=GradNorm.name,
        evidence={"first_step": int(low.index[0]), "grad_norm_min": _g(low.min()),
                  "early_median": _g(early), "ratio": _g(low.min() / early),
                  "steps_below": len(low), "threshold_factor": VANISH_FACTOR},
        reference=_GRADIENT_REFERENCE,
        suggestion="Check for dead ReLUs, saturated activations or a collapsed softmax; use "
                   "residual connections, normalisation, a better initialisation or a larger "
                   "learning rate.",
    )


@rule("probe_failures")
def probe_failures(run: Run) -> Iterator[Finding]:
    """One finding per probe that raised (error events) or was switched off (warning events
    containing "switched off")."""
    events = run.events()
    if events.empty:
        return
    events = events[events["probe"].notna()]
    for probe, group in events.groupby("probe", sort=False):
        errors = group[group["level"] == "error"]
        off = group[(group["level"] == "warning")
                    & group["message"].str.contains("switched off", regex=False)]
        if errors.empty and off.empty:
            continue
        steps = group["step"].dropna()
        first = int(steps.min()) if len(steps) else 0
        last = int(steps.max()) if len(steps) else run.last_step
        message = str((errors if not errors.empty else off)["message"].iloc[0])
        if not off.empty:
            off_step = off["step"].dropna()
            at = f" at step {int(off_step.iloc[0])}" if len(off_step) else ""
            title = f"Probe '{probe}' was switched off{at} after failing"
        else:
            title = f"Probe '{probe}' failed {len(errors)} time{'s' if len(errors) != 1 else ''}"
        yield Finding(
            title=title, severity="warning", steps=(first, last), probe=str(probe),
            evidence={"probe": str(probe), "errors": len(errors),
                      "switched_off": not off.empty, "first_error": message[:500]},
            reference="dynlens: a probe that raises is recorded and switched off, training goes on (dynlens.lens)",
            suggestion="Read the traceback in the Events section; fix the cause (for example, "
                       "out of memory: a smaller probe_batch or a sparser schedule) and rerun. "
                       "Its measurements are missing for the failed steps.",
        )
