"""Diagnosis rules over the softmax-collapse probe (``softmax_collapse``; Prieto et al. 2025,
Wortsman et al. 2023). Each finding names its remedy as a one-line change (``dl.remedies``).

* ``softmax_collapse``: at least ``COLLAPSE_SHARE`` (10%) of the probe batch collapsed in the
  dtype the loss is computed in, at some measurement.
* ``collapse_imminent``: not collapsed yet, but the median margin has passed
  ``IMMINENT_FRACTION`` (75%) of the loss dtype's absorption margin.
* ``naive_loss_minimisation``: cos(−∇L, θ) ≥ ``NLM_COSINE`` (0.9) at ``NLM_MEASUREMENTS`` (2)
  consecutive measurements: descent mostly scales the weights.
* ``attention_logit_growth``: a layer's largest attention logit reached ``ATTENTION_LIMIT``
  (1,000) or grew ``ATTENTION_GROWTH`` (10) times from its first measurement.
* ``output_logit_divergence``: the mean log Z of the output softmax fell below
  −``LOG_Z_LIMIT`` (20).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dynlens.diagnose import Finding, evidence_number, rule
from dynlens.measures.softmax import absorption_margin
from dynlens.probes.softmax_collapse import SoftmaxCollapse
from dynlens.store import Run

PROBE = SoftmaxCollapse.name
COLLAPSE_SHARE = 0.10
IMMINENT_FRACTION = 0.75
NLM_COSINE = 0.9
NLM_MEASUREMENTS = 2
ATTENTION_LIMIT = 1e3
ATTENTION_GROWTH = 10.0
LOG_Z_LIMIT = 20.0

_PRIETO = ("Prieto, Barsbey, Mediano & Birdal 2025, \"Grokking at the Edge of Numerical Stability\" "
           "(ICLR)")
_WORTSMAN = ("Wortsman et al. 2023, \"Small-scale proxies for large-scale Transformer training "
             "instabilities\"")


def _loss_dtype(run: Run) -> str:
    for probe in run.meta.get("probes") or []:
        if probe.get("name") == PROBE:
            return str(probe.get("dtype", "torch.float32")).removeprefix("torch.")
    return "float32"


@rule("softmax_collapse", probe=SoftmaxCollapse)
def softmax_collapse(run: Run) -> Iterator[Finding]:
    """Collapse under way in the loss's dtype (module docstring)."""
    fraction = run.series(PROBE, "fraction").dropna()
    over = fraction[fraction >= COLLAPSE_SHARE]
    if over.empty:
        return
    dtype = _loss_dtype(run)
    first, peak = int(over.index[0]), int(fraction.idxmax())
    yield Finding(
        title=f"Softmax collapse in {dtype}: {fraction.max():.0%} of the probe batch at step {peak}",
        severity="warning", steps=(first, int(fraction.index[-1])),
        evidence={"dtype": dtype, "first_step": first, "peak_step": peak,
                  "peak_fraction": evidence_number(fraction.max()),
                  "last_fraction": evidence_number(fraction.iloc[-1])},
        reference=_PRIETO,
        suggestion=("Collapsed examples have exactly zero loss and stop teaching the model (grokking "
                    "stalls). Train with StableMax: loss_fn=dl.remedies.stablemax_cross_entropy; or "
                    "compute the logits' loss in float64, or add weight decay."),
    )


@rule("collapse_imminent", probe=SoftmaxCollapse)
def collapse_imminent(run: Run) -> Iterator[Finding]:
    """Margins approaching the loss dtype's absorption margin (module docstring)."""
    fraction = run.series(PROBE, "fraction").dropna()
    median = run.series(PROBE, "margin_median").dropna()
    if median.empty or (not fraction.empty and fraction.max() >= COLLAPSE_SHARE):
        return
    dtype = _loss_dtype(run)
    edge = absorption_margin(getattr(torch, dtype, torch.float32))
    near = median[median >= IMMINENT_FRACTION * edge]
    if near.empty:
        return
    yield Finding(
        title=f"Softmax collapse approaching in {dtype}: median margin {median.iloc[-1]:.3g} of {edge:.3g}",
        severity="info", steps=(int(near.index[0]), int(median.index[-1])),
        evidence={"dtype": dtype, "absorption_margin": evidence_number(edge),
                  "median_margin": evidence_number(median.iloc[-1])},
        reference=_PRIETO,
        suggestion=("Past the absorption margin the other classes' terms round away. "
                    "loss_fn=dl.remedies.stablemax_cross_entropy avoids it; so does weight decay."),
    )


@rule("naive_loss_minimisation", probe=SoftmaxCollapse)
def naive_loss_minimisation(run: Run) -> Iterator[Finding]:
    """Descent aligned with θ (module docstring)."""
    cosine = run.series(PROBE, "nlm_cosine").dropna()
    high = (cosine >= NLM_COSINE).to_numpy()
    run_length = 0
    for i, is_high in enumerate(high):
        run_length = run_length + 1 if is_high else 0
        if run_length >= NLM_MEASUREMENTS:
            start = int(cosine.index[i - run_length + 1])
            yield Finding(
                title=f"Naive loss minimisation: cos(−∇L, θ) = {cosine.iloc[i]:.2f} from step {start}",
                severity="warning", steps=(start, int(cosine.index[-1])),
                evidence={"cosine": evidence_number(cosine.iloc[i]), "from_step": start,
                          "last_cosine": evidence_number(cosine.iloc[-1])},
                reference=_PRIETO,
                suggestion=("The loss now falls mostly by scaling the weights, which drives softmax "
                            "collapse. Wrap the optimizer: optimizer = dl.remedies.OrthoGrad(optimizer); "
                            "or add weight decay."),
            )
            return


@rule("attention_logit_growth", probe=SoftmaxCollapse)
def attention_logit_growth(run: Run) -> Iterator[Finding]:
    """Attention logits growing without bound (module docstring)."""
    records = run.arrays(PROBE, "attention_max_logit")
    labels = run.array_labels(PROBE, "attention_max_logit") or []
    if len(records) < 2 or not labels:
        return
    first = np.asarray(records[0][1], dtype=float)
    for step, values in records[1:]:
        values = np.asarray(values, dtype=float)
        if values.shape != first.shape:
            continue
        grew = (values >= ATTENTION_LIMIT) | ((first > 0) & (values >= ATTENTION_GROWTH * first))
        if grew.any():
            layer = int(np.argmax(np.where(grew, values, -np.inf)))
            yield Finding(
                title=f"Attention logits growing in {labels[layer]}: {values[layer]:.3g} at step {step}",
                severity="warning", steps=(int(records[0][0]), int(step)),
                evidence={"layer": labels[layer], "first": evidence_number(first[layer]),
                          "value": evidence_number(values[layer]), "step": int(step)},
                reference=_WORTSMAN,
                suggestion=("Runs whose attention logits grew past ~1e4 diverged. Normalise queries and "
                            "keys (qk-layernorm: a LayerNorm on q and k before q·kᵀ) or lower the learning rate."),
            )
            return


@rule("output_logit_divergence", probe=SoftmaxCollapse)
def output_logit_divergence(run: Run) -> Iterator[Finding]:
    """The output softmax's log Z drifting far below 0 (module docstring)."""
    log_z = run.series(PROBE, "log_z_mean").dropna()
    low = log_z[log_z <= -LOG_Z_LIMIT]
    if low.empty:
        return
    yield Finding(
        title=f"Output logits diverging: mean log Z {low.iloc[-1]:.3g} at step {int(low.index[-1])}",
        severity="warning", steps=(int(low.index[0]), int(log_z.index[-1])),
        evidence={"log_z_mean": evidence_number(low.iloc[-1]), "first_step": int(low.index[0])},
        reference=_WORTSMAN,
        suggestion="Add the z-loss to the training loss: loss = loss + dl.remedies.z_loss(logits, weight=1e-4).",
    )
