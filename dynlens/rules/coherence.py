"""Diagnosis rules over the gradient coherence probe (``coherence``).

* ``coherence_collapse``: the m-coherence falls to within ``COLLAPSE_LIMIT`` (2) of the orthogonal
  limit (1: each step on an example helps only that example) after having been at least
  ``COLLAPSE_FACTOR`` (3) times higher, and stays there for the last measurements while the
  training loss still falls by at least ``LOSS_FALL`` (10 %) and is still at least
  ``FITTED_FRACTION`` (5 %) of its initial value (not yet fitted): the network fits examples one
  by one — memorisation, as Chatterjee & Zielinski (2022) show for random labels.
* ``batch_vs_noise_scale``: the median gradient noise scale B_simple of the second half of the run
  is ``NOISE_FACTOR`` (8) times above or below the training batch size (``config["batch_size"]``
  or ``config["batch"]``; the rule is skipped when the run has neither). McCandlish et al. 2018:
  B_simple estimates the critical batch size.
* ``dominant_examples``: at some measurement the ``DOMINANT_FRACTION`` (5 %) of probe examples with
  the largest gradient norms carry at least ``DOMINANT_SHARE`` (50 %) of Σ‖g_i‖² (for equal
  norms they would carry 5 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd

from dynlens.diagnose import Finding, rule
from dynlens.diagnose import evidence_number as _g
from dynlens.probes.base import TRAINING
from dynlens.probes.coherence import Coherence
from dynlens.store import Run

PROBE = Coherence.name
COLLAPSE_LIMIT = 2.0
COLLAPSE_FACTOR = 3.0
LOSS_FALL = 0.10
FITTED_FRACTION = 0.05
NOISE_FACTOR = 8.0
DOMINANT_FRACTION = 0.05
DOMINANT_SHARE = 0.5
DOMINANT_MIN_EXAMPLES = 10

_COHERENCE_REFERENCE = (
    "Chatterjee & Zielinski 2022, \"On the Generalization Mystery in Deep Learning\" "
    "(coherence of per-example gradients; random labels)"
)
_NOISE_REFERENCE = (
    "McCandlish, Kaplan, Amodei & OpenAI Dota Team 2018, \"An Empirical Model of Large-Batch "
    "Training\" (gradient noise scale, critical batch size)"
)
_DOMINANT_REFERENCE = (
    "Paul, Ganguli & Dziugaite 2021, \"Deep Learning on a Data Diet: Finding Important Examples "
    "Early in Training\" (gradient-norm scores); Katharopoulos & Fleuret 2018, \"Not All Samples "
    "Are Created Equal\""
)



def _loss_between(loss: pd.Series, first: int, last: int) -> float:
    """Mean training loss over the steps [first, last] (NaN if none)."""
    window = loss[(loss.index >= first) & (loss.index <= last)]
    window = window[np.isfinite(window)]
    return float(window.mean()) if len(window) else math.nan


@rule("coherence_collapse", probe=Coherence)
def coherence_collapse(run: Run) -> Iterator[Finding]:
    """m-coherence collapsed toward the orthogonal limit while the training loss still falls."""
    coherence = run.series(PROBE, "m_coherence").dropna()
    if len(coherence) < 3:
        return
    values = coherence.to_numpy()
    steps = coherence.index.to_numpy()
    low = values <= COLLAPSE_LIMIT
    if not low[-1]:
        return
    start = len(values) - 1
    while start > 0 and low[start - 1]:
        start -= 1
    if start == 0 or len(values) - start < 2:
        return
    peak_index = int(np.argmax(values[:start]))
    collapsed = float(np.mean(values[start:]))
    if values[peak_index] < COLLAPSE_FACTOR * max(collapsed, 1e-12):
        return
    first, last = int(steps[start]), int(steps[-1])
    span = max((last - first) // 4, 1)
    loss = run.series(TRAINING, "loss")
    loss_start = _loss_between(loss, first, first + span)
    loss_end = _loss_between(loss, last - span, last)
    if not (math.isfinite(loss_start) and math.isfinite(loss_end)) or loss_end > (1 - LOSS_FALL) * loss_start:
        return
    # once every example is fitted the gradients are tiny and a few stragglers dominate them:
    # coherence then falls too, but that is convergence, not memorisation
    finite_loss = loss[np.isfinite(loss)]
    initial = float(finite_loss.iloc[: max(1, len(finite_loss) // 20)].mean()) if len(finite_loss) else math.nan
    if not loss_start >= FITTED_FRACTION * initial:
        return
    size = run.series(PROBE, "size").dropna()
    yield Finding(
        title=(f"Gradient coherence collapsed to the orthogonal limit from step {first} while the "
               f"loss still falls: the network is memorising"),
        severity="warning",
        steps=(first, last),
        evidence={
            "peak_m_coherence": _g(values[peak_index]),
            "peak_step": int(steps[peak_index]),
            "m_coherence_since_collapse": _g(collapsed),
            "orthogonal_limit": 1.0,
            "probe_batch_size": int(size.iloc[-1]) if len(size) else None,
            "train_loss_at_collapse": _g(loss_start),
            "train_loss_latest": _g(loss_end),
        },
        reference=_COHERENCE_REFERENCE,
        suggestion=(
            "Each step now helps only the example it was taken on: the loss falls by fitting "
            "examples one at a time, which generalises poorly. Check the labels for noise, watch "
            "the validation loss from this step, and try early stopping, more data or "
            "augmentation, or stronger regularisation (weight decay)."
        ),
        probe=PROBE,
    )


def _batch_size(run: Run) -> int | None:
    config = run.config
    for key in ("batch_size", "batch"):
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


@rule("batch_vs_noise_scale", probe=Coherence)
def batch_vs_noise_scale(run: Run) -> Iterator[Finding]:
    """The training batch size is far from the gradient noise scale (critical batch size)."""
    batch = _batch_size(run)
    noise = run.series(PROBE, "noise_scale").dropna()
    if batch is None or len(noise) == 0:
        return
    late = noise[noise.index >= noise.index[len(noise) // 2]]
    size = run.series(PROBE, "size").dropna()
    probe_size = int(size.iloc[-1]) if len(size) else None
    infinite = bool((late == np.inf).mean() > 0.5)
    if infinite:
        # the unbiased ‖G‖² estimate is ≤ 0: the noise scale exceeds what the probe batch resolves
        if probe_size is None:
            return
        scale, bound = float(probe_size), "at least"
    else:
        finite = late[np.isfinite(late) & (late > 0)]
        if len(finite) == 0:
            return
        scale, bound = float(finite.median()), "about"
    ratio = scale / batch
    first, last = int(late.index[0]), int(late.index[-1])
    evidence = {
        "batch_size": batch,
        "noise_scale": _g(scale) if not infinite else f">= {probe_size} (noise dominates the probe batch)",
        "ratio_noise_scale_to_batch": _g(ratio),
        "measurements": int(len(late)),
        "probe_batch_size": probe_size,
    }
    if ratio >= NOISE_FACTOR:
        yield Finding(
            title=f"Your batch ({batch}) is {ratio:.0f}x below the gradient noise scale ({bound} {scale:.0f})",
            severity="info", steps=(first, last), evidence=evidence, reference=_NOISE_REFERENCE,
            suggestion=(
                "Steps are dominated by gradient noise: a batch up to about the noise scale "
                "(with the learning rate scaled up accordingly) would take about as many examples "
                "but far fewer steps to reach the same loss. B_simple is an estimate of the "
                "critical batch size (it ignores curvature); it usually grows as the loss falls."
            ),
            probe=PROBE,
        )
    elif ratio <= 1 / NOISE_FACTOR and not infinite:
        yield Finding(
            title=f"Your batch ({batch}) is {1 / ratio:.0f}x above the gradient noise scale (about {scale:.0f})",
            severity="info", steps=(first, last), evidence=evidence, reference=_NOISE_REFERENCE,
            suggestion=(
                "Beyond the noise scale a larger batch barely reduces the number of steps: most "
                "of each batch's examples are spent for little progress. A smaller batch (closer "
                "to the noise scale) and more steps would use the data more efficiently."
            ),
            probe=PROBE,
        )


@rule("dominant_examples", probe=Coherence)
def dominant_examples(run: Run) -> Iterator[Finding]:
    """A few probe examples carry most of the per-example gradient energy Σ‖g_i‖²."""
    records = run.arrays(PROBE, "grad_norms")
    hits = []
    for step, norms in records:
        norms = np.asarray(norms, dtype=np.float64)
        m = norms.size
        energy = norms ** 2
        total = float(energy.sum())
        if m < DOMINANT_MIN_EXAMPLES or not math.isfinite(total) or total <= 0:
            continue
        k = max(1, math.ceil(DOMINANT_FRACTION * m))
        top = np.argsort(-energy, kind="stable")[:k]
        share = float(energy[top].sum() / total)
        if share >= DOMINANT_SHARE:
            hits.append((share, step, top, norms))
    if not hits:
        return
    share, step, top, norms = max(hits, key=lambda h: (h[0], h[1]))
    yield Finding(
        title=(f"{len(top)} of {norms.size} probe examples carry {share:.0%} of the gradient "
               f"(step {step})"),
        severity="info",
        steps=(min(h[1] for h in hits), max(h[1] for h in hits)),
        evidence={
            "share_of_squared_gradient_norm": _g(share),
            "examples": [int(i) for i in top],
            "their_gradient_norms": [_g(norms[i]) for i in top],
            "median_gradient_norm": _g(np.median(norms)),
            "measurements_affected": len(hits),
            "measurements": len(records),
        },
        reference=_DOMINANT_REFERENCE,
        suggestion=(
            "Look at these probe examples (indices into the probe batch): mislabelled, duplicated "
            "or out-of-distribution examples often dominate the gradient. Fix or drop them, or "
            "limit their pull with per-example gradient clipping or label smoothing."
        ),
        probe=PROBE,
    )
