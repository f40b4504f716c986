"""Diagnosis rules over the Hessian probe (``hessian``; definitions in :mod:`dynlens.measures.stability`).

The ratio r = ``sharpness_ratio`` is λ_max over the optimizer's stability threshold (2/η for
gradient descent, (2+2β)/η with momentum; for Adam the preconditioned sharpness over
(2+2β₁)/((1−β₁)η)).

* ``progressive_sharpening``: before the edge of stability is reached (the first measurement
  with r ≥ 0.9, or the whole run), λ_max grows by at least ``SHARPENING_FACTOR`` (1.5×) with a
  rank correlation against the step of at least ``SHARPENING_TREND`` (0.8).
* ``edge_of_stability``: r within ``EOS_BAND`` (10 %) of 1 for a sustained window: at least
  ``EOS_FRACTION`` (80 %) of ``EOS_WINDOW`` (5) consecutive measurements. Reports the step it
  began (the first measurement within the band of the first such window).
* ``sharpness_far_above_threshold``: r ≥ ``FAR_ABOVE`` (1.5) at two consecutive measurements, or
  ≥ ``FAR_ABOVE_CRITICAL`` (2) once: gradient descent is unstable along the top eigenvector.
* ``negative_curvature``: λ_min < 0 with |λ_min| ≥ ``SADDLE_FRACTION`` (10 %) of λ_max at
  ``SADDLE_MIN_MEASUREMENTS`` (3) consecutive measurements: a saddle region.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from dynlens.diagnose import Finding, rule
from dynlens.diagnose import evidence_number as _g
from dynlens.probes.hessian import Hessian
from dynlens.store import Run

PROBE = Hessian.name
SHARPENING_FACTOR = 1.5
SHARPENING_TREND = 0.8
SHARPENING_MIN_MEASUREMENTS = 4
EOS_BAND = 0.10
EOS_WINDOW = 5
EOS_FRACTION = 0.8
FAR_ABOVE = 1.5
FAR_ABOVE_CRITICAL = 2.0
SADDLE_FRACTION = 0.10
SADDLE_MIN_MEASUREMENTS = 3

_COHEN_2021 = (
    "Cohen, Kaur, Li, Kolter & Talwalkar 2021, \"Gradient Descent on Neural Networks Typically "
    "Occurs at the Edge of Stability\" (ICLR)"
)
_COHEN_2022 = (
    "Cohen et al. 2022, \"Adaptive Gradient Methods at the Edge of Stability\" (preconditioned "
    "sharpness for Adam)"
)
_SADDLE = (
    "Dauphin et al. 2014, \"Identifying and attacking the saddle point problem in high-dimensional "
    "non-convex optimization\"; Sagun et al. 2017, \"Empirical Analysis of the Hessian of "
    "Over-Parametrized Neural Networks\""
)



def _series(run: Run, name: str) -> pd.Series:
    return run.series(PROBE, name).dropna()


def _is_adam(run: Run) -> bool:
    optimizer = run.meta.get("optimizer") or {}
    return str(optimizer.get("class", "")).lower().startswith("adam")


def _reference(run: Run) -> str:
    return _COHEN_2022 if _is_adam(run) else _COHEN_2021


def _eos_windows(ratio: pd.Series) -> list[tuple[int, int]]:
    """Index ranges [i, j] (inclusive) of maximal stretches covered by qualifying windows."""
    inside = (ratio.to_numpy() - 1).__abs__() <= EOS_BAND
    n = len(inside)
    covered = np.zeros(n, dtype=bool)
    for i in range(0, n - EOS_WINDOW + 1):
        window = inside[i : i + EOS_WINDOW]
        if window.mean() >= EOS_FRACTION:
            first = i + int(np.argmax(window))
            last = i + EOS_WINDOW - 1 - int(np.argmax(window[::-1]))
            covered[first : last + 1] = True
    stretches, i = [], 0
    while i < n:
        if covered[i]:
            j = i
            while j + 1 < n and covered[j + 1]:
                j += 1
            stretches.append((i, j))
            i = j + 1
        else:
            i += 1
    return stretches


@rule("progressive_sharpening", probe=Hessian)
def progressive_sharpening(run: Run) -> Iterator[Finding]:
    """λ_max grows steadily before the edge of stability (Cohen et al. 2021; module docstring)."""
    sharpness = _series(run, "sharpness")
    ratio = _series(run, "sharpness_ratio")
    if _is_adam(run):
        sharpness = _series(run, "preconditioned_sharpness")
    end_step = sharpness.index.max() if len(sharpness) else 0
    reached = ratio[ratio >= 1 - EOS_BAND]
    if len(reached):
        end_step = int(reached.index[0])
    segment = sharpness[sharpness.index <= end_step]
    if len(segment) < SHARPENING_MIN_MEASUREMENTS or segment.iloc[0] <= 0:
        return
    factor = float(segment.iloc[-1] / segment.iloc[0])
    trend = float(spearmanr(segment.index.to_numpy(), segment.to_numpy()).statistic)
    if factor < SHARPENING_FACTOR or not trend >= SHARPENING_TREND:
        return
    first, last = int(segment.index[0]), int(segment.index[-1])
    yield Finding(
        title=f"Progressive sharpening: λ_max rose {factor:.1f}× over steps {first}–{last}",
        severity="info",
        steps=(first, last),
        evidence={"sharpness_start": _g(segment.iloc[0]), "sharpness_end": _g(segment.iloc[-1]),
                  "factor": _g(factor), "rank_correlation_with_step": _g(trend),
                  "preconditioned": _is_adam(run)},
        reference=_reference(run),
        suggestion=("Expected with full-batch or large-batch training: the sharpness grows until it "
                    "meets the stability threshold 2/η. A smaller learning rate lets it grow further; "
                    "learning-rate warm-up keeps early steps stable while it does."),
        probe=PROBE,
    )


@rule("edge_of_stability", probe=Hessian)
def edge_of_stability(run: Run) -> Iterator[Finding]:
    """λ_max hovers within 10% of the stability threshold for a sustained window (Cohen et al.
    2021, 2022); the finding names the step it began."""
    ratio = _series(run, "sharpness_ratio")
    if len(ratio) < EOS_WINDOW:
        return
    stretches = _eos_windows(ratio)
    if not stretches:
        return
    i, j = stretches[0]
    window = ratio.iloc[i : j + 1]
    start, last = int(window.index[0]), int(window.index[-1])
    threshold = _series(run, "threshold")
    evidence = {"start_step": start, "last_step_in_band": last, "measurements": len(window),
                "median_ratio": _g(window.median()), "min_ratio": _g(window.min()),
                "max_ratio": _g(window.max()),
                "fraction_in_band": _g(float(((window - 1).abs() <= EOS_BAND).mean()))}
    if len(threshold):
        evidence["threshold"] = _g(threshold.iloc[-1])
    what = "preconditioned sharpness" if _is_adam(run) else "λ_max"
    yield Finding(
        title=f"Edge of stability from step {start}: {what} hovers at the stability threshold",
        severity="info",
        steps=(start, last),
        evidence=evidence,
        reference=_reference(run),
        suggestion=("Training is at the edge of stability: the loss may fall non-monotonically and "
                    "oscillate along the top eigenvector, but it usually keeps decreasing. To leave "
                    "the regime, lower the learning rate (the threshold 2/η rises); to exploit it, "
                    "keep η and watch for spikes."),
        probe=PROBE,
    )


@rule("sharpness_far_above_threshold", probe=Hessian)
def sharpness_far_above_threshold(run: Run) -> Iterator[Finding]:
    """λ_max well above the stability threshold: the steps are unstable along the top eigenvector."""
    ratio = _series(run, "sharpness_ratio")
    if ratio.empty:
        return
    above = (ratio >= FAR_ABOVE).to_numpy()
    consecutive = bool(np.any(above[1:] & above[:-1])) if len(above) > 1 else False
    peak = float(ratio.max())
    if not (consecutive or peak >= FAR_ABOVE_CRITICAL):
        return
    steps = ratio.index[above]
    peak_step = int(ratio.idxmax())
    yield Finding(
        title=f"Sharpness {peak:.1f}× the stability threshold at step {peak_step}: unstable steps",
        severity="critical" if peak >= FAR_ABOVE_CRITICAL else "warning",
        steps=(int(steps[0]), int(steps[-1])),
        evidence={"max_ratio": _g(peak), "step_of_max": peak_step,
                  "measurements_above": int(above.sum()), "far_above": FAR_ABOVE},
        reference=_reference(run),
        suggestion=("The step size is far beyond what the curvature allows (η·λ_max/2 ≫ 1): expect "
                    "loss spikes or divergence. Lower the learning rate, add warm-up or gradient "
                    "clipping, or check for a learning-rate schedule that jumped."),
        probe=PROBE,
    )


@rule("negative_curvature", probe=Hessian)
def negative_curvature(run: Run) -> Iterator[Finding]:
    """A large negative eigenvalue at consecutive measurements: a saddle region."""
    lam_min = _series(run, "lambda_min")
    sharpness = _series(run, "sharpness")
    both = pd.concat([lam_min, sharpness], axis=1, keys=["min", "max"]).dropna()
    if both.empty:
        return
    relative = -both["min"] / both["max"].abs().clip(lower=1e-300)
    large = (relative >= SADDLE_FRACTION).to_numpy()
    best, length, end = 0, 0, -1
    for k, flag in enumerate(large):
        length = length + 1 if flag else 0
        if length > best:
            best, end = length, k
    if best < SADDLE_MIN_MEASUREMENTS:
        return
    window = both.iloc[end - best + 1 : end + 1]
    worst = relative.iloc[end - best + 1 : end + 1]
    persists = end == len(both) - 1
    yield Finding(
        title=(f"Large negative curvature (λ_min down to {window['min'].min():.3g}, "
               f"{worst.max():.0%} of λ_max): a saddle region"),
        severity="warning" if persists else "info",
        steps=(int(window.index[0]), int(window.index[-1])),
        evidence={"lambda_min": _g(window["min"].min()), "max_relative": _g(worst.max()),
                  "measurements": best, "until_last_measurement": persists},
        reference=_SADDLE,
        suggestion=("Directions of negative curvature mean the iterate sits near a saddle, not a "
                    "minimum. Normal early in training; if it persists, gradient noise (smaller "
                    "batches), momentum or a larger learning rate help escape it."),
        probe=PROBE,
    )
