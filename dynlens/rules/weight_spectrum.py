"""Diagnosis rules over the weight-spectrum probe (``weight_spectrum``).

* ``stable_rank_collapse``: a weight matrix whose stable rank ‖W‖_F²/σ_max² started at
  ``MIN_INITIAL_RANK`` (4) or more and fell to ``COLLAPSE_FRACTION`` (a quarter) of its first
  measured value or less: its energy has gathered in a few directions (Feng et al. 2022 on
  rank diminishing; Martin & Mahoney 2021 on how training reshapes weight spectra).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dynlens.diagnose import Finding, evidence_number, rule
from dynlens.probes.weight_spectrum import WeightSpectrum
from dynlens.store import Run

PROBE = WeightSpectrum.name
MIN_INITIAL_RANK = 4.0
COLLAPSE_FRACTION = 0.25

_REFERENCE = (
    "Feng, Yang, Li, Wang, Hu & Zhang 2022, \"Rank Diminishing in Deep Neural Networks\" (NeurIPS); "
    "Martin & Mahoney 2021, \"Implicit Self-Regularization in Deep Neural Networks\" (JMLR)"
)


@rule("stable_rank_collapse", probe=WeightSpectrum)
def stable_rank_collapse(run: Run) -> Iterator[Finding]:
    """One finding per weight matrix whose stable rank collapsed (module docstring)."""
    records = run.arrays(PROBE, "stable_rank")
    if len(records) < 2:
        return
    labels = run.array_labels(PROBE, "stable_rank")
    steps = np.array([step for step, _ in records])
    ranks = np.stack([np.asarray(values, dtype=float) for _, values in records])
    names = labels if labels is not None and len(labels) == ranks.shape[1] else [str(i) for i in range(ranks.shape[1])]
    for column, name in enumerate(names):
        series = ranks[:, column]
        finite = np.isfinite(series)
        if finite.sum() < 2:
            continue
        first = float(series[finite][0])
        lowest_at = int(np.nanargmin(series))
        lowest = float(series[lowest_at])
        if first < MIN_INITIAL_RANK or lowest > COLLAPSE_FRACTION * first:
            continue
        yield Finding(
            title=f"Stable rank of {name} fell from {first:.3g} to {lowest:.3g}",
            severity="warning",
            steps=(int(steps[finite][0]), int(steps[lowest_at])),
            evidence={"matrix": name, "first": evidence_number(first), "lowest": evidence_number(lowest),
                      "lowest_step": int(steps[lowest_at]), "fraction": evidence_number(lowest / first)},
            reference=_REFERENCE,
            suggestion=(
                "The matrix now acts mostly along a few directions. If that was not expected, try "
                "a smaller learning rate or warm-up (large steps align weights with a few gradient "
                "directions), check for dead units feeding it, and compare with weight decay off; "
                "the weight-spectrum figure shows which matrices and when."
            ),
        )
