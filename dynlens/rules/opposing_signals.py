"""The loss ledger read back from a run, opposing signals and the data map of a run, and the
diagnosis rules over them (the ``opposing_signals`` probe; Rosenfeld & Risteski 2024;
Swayamdipta et al. 2020; Toneva et al. 2019).

* ``opposing_groups``: :func:`dynlens.measures.opposing.opposing_signals` reports a pair (its
  permutation test at p ≤ 0.01 and the groups' loss changes anti-correlated at ρ ≤ −0.5).
* ``spike_with_opposing_groups``: a loss spike (the ``loss_spike`` rule's) within
  ``SPIKE_NEAR`` steps of a step where an opposing pair's losses moved in opposite directions:
  the pair is a candidate cause of the spike (Rosenfeld & Risteski 2024, §4).
* ``opposing_groups_while_sharpening``: the Hessian probe's λ_max rose by at least
  ``SHARPENING_RISE`` (50%) over an opposing pair's steps, or crossed the optimizer's stability
  threshold there (``sharpness_ratio`` ≥ 1): the paper relates the pairs' balance to progressive
  sharpening and the edge of stability.
* ``forgotten_examples``: at least ``FORGOTTEN_SHARE`` (5%) of the tracked examples were
  learnt and then forgotten at least ``FORGOTTEN_EVENTS`` (2) times, or never learnt: likely
  label noise or ambiguous examples (Toneva et al. 2019).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dynlens.diagnose import Finding, evidence_number, rule
from dynlens.measures.opposing import Ledger, OpposingPair
from dynlens.measures.opposing import data_map as _data_map
from dynlens.measures.opposing import opposing_signals as _opposing_signals
from dynlens.probes.hessian import Hessian
from dynlens.probes.opposing_signals import OpposingSignals
from dynlens.rules.basic import spike_ratios
from dynlens.store import Run, load_run

__all__ = ["ledger_of", "stored_ledger", "pairs_of", "opposing_signals", "data_map"]

PROBE = OpposingSignals.name
HESSIAN = Hessian.name
MIN_MEASUREMENTS = 8  # fewer ledger rows than this: too short to read oscillations or forgetting from
FORGOTTEN_SHARE = 0.05
FORGOTTEN_EVENTS = 2
SPIKE_NEAR = 2  # steps between a loss spike and a step where the pair moved in opposite directions
SHARPENING_RISE = 1.5

_ROSENFELD = ("Rosenfeld & Risteski 2024, \"Outliers with Opposing Signals Have an Outsized Effect on "
              "Neural Network Optimization\" (ICLR)")
_TONEVA = ("Toneva et al. 2019, \"An Empirical Study of Example Forgetting during Deep Neural Network "
           "Learning\"; Swayamdipta et al. 2020, \"Dataset Cartography\"")


def ledger_of(run_or_ledger: Run | Ledger | str) -> Ledger:
    """The ledger of a run's ``opposing_signals`` probe (or the ledger itself).

    Raises:
        ValueError: the run has no ledger (attach ``dl.probes.OpposingSignals``).
    """
    if isinstance(run_or_ledger, Ledger):
        return run_or_ledger
    run = run_or_ledger if isinstance(run_or_ledger, Run) else load_run(run_or_ledger)
    records = {name: run.arrays(PROBE, name) for name in ("loss", "p_y", "correct")}
    if not records["loss"]:
        raise ValueError(f"run {run.name!r} has no loss ledger: attach dl.probes.OpposingSignals() to its Lens")
    steps = sorted(set.intersection(*({s for s, _ in r} for r in records.values())))
    pick = {name: dict(r) for name, r in records.items()}
    ids = run.array_labels(PROBE, "loss") or [str(i) for i in range(len(pick["loss"][steps[0]]))]
    labels = run.arrays(PROBE, "labels")
    inputs = run.arrays(PROBE, "inputs")
    along = dict(run.arrays(PROBE, "along_top"))
    along_top = None
    if along:
        along_top = np.full((len(steps), len(ids)), np.nan, dtype=np.float32)
        for row, s in enumerate(steps):
            if s in along:
                along_top[row] = along[s]
    return Ledger(
        steps=np.asarray(steps, dtype=np.int64),
        loss=np.stack([pick["loss"][s] for s in steps]).astype(np.float32),
        p_y=np.stack([pick["p_y"][s] for s in steps]).astype(np.float32),
        correct=np.stack([pick["correct"][s] for s in steps]) > 0.5,
        example_ids=np.asarray([int(i) for i in ids], dtype=np.int64),
        labels=np.asarray(labels[0][1], dtype=np.int64) if labels else np.full(len(ids), -1, dtype=np.int64),
        inputs=np.asarray(inputs[0][1], dtype=np.float32).reshape(len(ids), -1) if inputs else None,
        along_top=along_top,
    )


def opposing_signals(run_or_ledger: Run | Ledger | str, **options: Any) -> list[OpposingPair]:
    """``dl.opposing_signals``: the pairs of example groups with opposing signals in a run (or
    a ledger); options as :func:`dynlens.measures.opposing.opposing_signals`."""
    return _opposing_signals(ledger_of(run_or_ledger), **options)


def data_map(run_or_ledger: Run | Ledger | str, **options: Any) -> Any:
    """``dl.data_map``: a DataFrame with a row per example: ``example``, ``confidence``,
    ``variability``, ``correctness``, ``forgetting`` (and ``region``, ``label``); options as
    :func:`dynlens.measures.opposing.data_map`."""
    return _data_map(ledger_of(run_or_ledger), **options).to_dataframe()


def stored_ledger(run: Run, minimum: int) -> Ledger | None:
    """The run's ledger when it holds at least ``minimum`` measurements, else None (read once:
    rules and figures pass it on instead of reading the run's arrays again)."""
    if len(run.arrays(PROBE, "correct")) < minimum:
        return None
    return ledger_of(run)


def pairs_of(run: Run) -> list[OpposingPair]:
    """The run's opposing pairs (none without a ledger of ``MIN_MEASUREMENTS``), found once for
    the run as it stands: the rules and the figure share them (the detection's permutation test
    is the costly part of a report)."""
    def find() -> list[OpposingPair]:
        ledger = stored_ledger(run, MIN_MEASUREMENTS)
        return [] if ledger is None else opposing_signals(ledger)

    return run._kept(("opposing_pairs",), find)


def _pair_evidence(pair: OpposingPair) -> dict[str, Any]:
    return {"group_a_size": len(pair.group_a), "group_b_size": len(pair.group_b),
            "correlation": evidence_number(pair.correlation), "p_value": evidence_number(pair.p_value)}


@rule("opposing_groups", probe=OpposingSignals)
def opposing_groups(run: Run) -> Iterator[Finding]:
    """One finding per pair of opposing groups (module docstring)."""
    for pair in pairs_of(run):
        first, last = (int(pair.steps[0]), int(pair.steps[-1])) if len(pair.steps) else (0, run.last_step)
        yield Finding(
            title=(f"Opposing signals: {len(pair.group_a)} and {len(pair.group_b)} examples whose losses "
                   f"move against each other (ρ = {pair.correlation:.2f})"),
            severity="warning", steps=(first, last),
            evidence={"group_a": [int(i) for i in pair.group_a[:20]], "group_b": [int(i) for i in pair.group_b[:20]],
                      "correlation": evidence_number(pair.correlation), "p_value": evidence_number(pair.p_value),
                      "labels_a": {str(k): v for k, v in pair.labels_a.items()},
                      "labels_b": {str(k): v for k, v in pair.labels_b.items()},
                      **({} if pair.along_top_agreement is None else {
                          "along_top_a": evidence_number(pair.along_top_a),
                          "along_top_b": evidence_number(pair.along_top_b),
                          "along_top_agreement": evidence_number(pair.along_top_agreement)})},
            reference=_ROSENFELD,
            suggestion=("These groups pull the weights in opposite directions; their balance can make the loss "
                        "oscillate and spike at large step sizes. Look at what the groups share; a smaller "
                        "learning rate or warm-up, or SAM/gradient clipping, damps the oscillation."),
        )


@rule("spike_with_opposing_groups", probe=OpposingSignals)
def spike_with_opposing_groups(run: Run) -> Iterator[Finding]:
    """A loss spike next to a step where an opposing pair moved apart (module docstring)."""
    pairs = pairs_of(run)
    if not pairs:
        return
    spikes = spike_ratios(run)
    for step, ratio in spikes.items():
        for index, pair in enumerate(pairs):
            moved = np.asarray(pair.oscillation_steps, dtype=np.int64)
            near = moved[np.abs(moved - int(step)) <= SPIKE_NEAR]
            if len(near) == 0:
                continue
            yield Finding(
                title=(f"The loss spike at step {int(step)} comes as {len(pair.group_a)} and "
                       f"{len(pair.group_b)} opposing examples move against each other"),
                severity="warning", steps=(int(near.min()), int(near.max())),
                evidence={"spike_step": int(step), "spike_ratio": evidence_number(float(ratio)),
                          "pair": index, "opposite_moves": [int(s) for s in near], **_pair_evidence(pair)},
                reference=_ROSENFELD,
                suggestion=("The spike is likely these groups' tug of war: a step that lowers one group's loss "
                            "raises the other's. Look at the feature they share (the report's groups); a "
                            "smaller learning rate, warm-up or gradient clipping damps it."),
            )
            break  # one pair per spike: the strongest (pairs come most significant first)


@rule("opposing_groups_while_sharpening", probe=OpposingSignals)
def opposing_groups_while_sharpening(run: Run) -> Iterator[Finding]:
    """λ_max rising or crossing its threshold over an opposing pair's steps (module docstring)."""
    pairs = pairs_of(run)
    if not pairs or HESSIAN not in run.probes():
        return
    sharpness = run.series(HESSIAN, "sharpness").dropna()
    ratio = run.series(HESSIAN, "sharpness_ratio").dropna() if "sharpness_ratio" in run.scalar_names(HESSIAN) \
        else None
    for index, pair in enumerate(pairs):
        first, last = int(pair.steps[0]), int(pair.steps[-1])
        inside = sharpness[(sharpness.index >= first) & (sharpness.index <= last)]
        before = sharpness[sharpness.index <= first]
        start = before.iloc[-1] if len(before) else (inside.iloc[0] if len(inside) else None)
        if start is None or len(inside) == 0 or not start > 0:
            continue
        rise = float(inside.max()) / float(start)
        crossed = ratio is not None and bool((ratio[(ratio.index >= first) & (ratio.index <= last)] >= 1).any())
        if rise < SHARPENING_RISE and not crossed:
            continue
        yield Finding(
            title=(f"Sharpness rose ×{rise:.1f}" + (" past the stability threshold" if crossed else "")
                   + f" while {len(pair.group_a)} and {len(pair.group_b)} examples pulled in opposite directions"),
            severity="info", steps=(first, last),
            evidence={"pair": index, "sharpness_start": evidence_number(float(start)),
                      "sharpness_max": evidence_number(float(inside.max())), "crossed_threshold": crossed,
                      **_pair_evidence(pair)},
            reference=_ROSENFELD,
            suggestion=("The paper ties opposing groups to progressive sharpening and the edge of stability: the "
                        "network grows sharp along the direction that separates them. Compare the pair's "
                        "oscillation steps with the sharpness figure; a smaller step size keeps both stable."),
        )


@rule("forgotten_examples", probe=OpposingSignals)
def forgotten_examples(run: Run) -> Iterator[Finding]:
    """Many examples forgotten or never learnt (module docstring)."""
    ledger = stored_ledger(run, MIN_MEASUREMENTS)
    if ledger is None:
        return
    frame = data_map(ledger)
    forgotten = (frame["forgetting"] >= FORGOTTEN_EVENTS) | frame.get("never_learned", False)
    share = float(forgotten.mean())
    if share < FORGOTTEN_SHARE:
        return
    worst = frame[forgotten].sort_values("confidence")["example"].head(20).tolist()
    yield Finding(
        title=f"{share:.0%} of the tracked examples were forgotten repeatedly or never learnt",
        severity="info", steps=(0, run.last_step),
        evidence={"share": evidence_number(share), "examples": [int(i) for i in worst]},
        reference=_TONEVA,
        suggestion=("Look at these examples first: repeatedly forgotten and low-confidence examples are often "
                    "mislabelled or ambiguous (the data map's hard region)."),
    )
