"""Diagnosis rules over the NTK probe (``ntk``; Chizat et al. 2019, Fort et al. 2020, Baratin et
al. 2021).

* ``lazy_regime``: over at least ``MIN_MEASUREMENTS`` (3) measurements the kernel stays within
  ``LAZY_DISTANCE`` (0.05) of its initial one (kernel distance) and, where the probe recorded
  it, the parameters within ``LAZY_PARAMETER_CHANGE`` (0.05) of theirs (‖θ − θ₀‖/‖θ₀‖), while
  the training loss falls to half its first value or less: the network trains as its
  linearisation (the kernel regime). The kernel distance is second order in the kernel's
  relative change, so it stays small longer than the parameters: in
  ``examples/ntk_lazy_vs_rich.py`` a width-32 network ends 4.3e-3 from its kernel while its
  parameters moved 14%, and widths 128 to 2,048 move theirs 3.9% to 0.27%.
* ``kernel_alignment_rising``: the centred kernel–target alignment rises by ``ALIGNMENT_RISE``
  (0.1) or more: the kernel is learning the task (feature learning).
* ``fast_then_slow_kernel``: the kernel's velocity falls ``VELOCITY_DROP`` (10) times or more
  from its first measurements to its last: a fast early phase, then a slow one (Fort et al. 2020).
* ``ill_conditioned_kernel``: the kernel's condition number reaches ``CONDITION_LIMIT`` (1e8):
  gradient descent in the kernel regime barely moves along its smallest directions.
"""

from __future__ import annotations

from collections.abc import Iterator

from dynlens.diagnose import Finding, evidence_number, rule
from dynlens.probes.base import TRAINING
from dynlens.probes.ntk import NTK
from dynlens.store import Run

PROBE = NTK.name
MIN_MEASUREMENTS = 3
LAZY_DISTANCE = 0.05
LAZY_PARAMETER_CHANGE = 0.05
ALIGNMENT_RISE = 0.1
VELOCITY_DROP = 10.0
CONDITION_LIMIT = 1e8

_CHIZAT = "Chizat, Oyallon & Bach 2019, \"On Lazy Training in Differentiable Programming\" (NeurIPS)"
_FORT = ("Fort et al. 2020, \"Deep learning versus kernel learning: an empirical study of loss landscape "
         "geometry and the time evolution of the Neural Tangent Kernel\" (NeurIPS)")
_BARATIN = "Baratin et al. 2021, \"Implicit Regularization via Neural Feature Alignment\" (AISTATS)"


@rule("lazy_regime", probe=NTK)
def lazy_regime(run: Run) -> Iterator[Finding]:
    """Kernel still, loss falling (module docstring)."""
    distance = run.series(PROBE, "distance_from_init").dropna()
    loss = run.series(TRAINING, "loss").dropna()
    if len(distance) < MIN_MEASUREMENTS or len(loss) < 2 or distance.max() > LAZY_DISTANCE:
        return
    change = (run.series(PROBE, "parameter_change").dropna() if "parameter_change" in run.scalar_names(PROBE)
              else None)
    if change is not None and (change.empty or change.max() > LAZY_PARAMETER_CHANGE):
        return
    first, last = float(loss.iloc[: max(1, len(loss) // 20)].mean()), float(loss.iloc[-max(1, len(loss) // 20):].mean())
    if not (first > 0 and last <= first / 2):
        return
    moved = "" if change is None else f" and its parameters {change.max():.2g}"
    evidence = {"max_distance": evidence_number(distance.max()), "loss_first": evidence_number(first),
                "loss_last": evidence_number(last)}
    if change is not None:
        evidence["max_parameter_change"] = evidence_number(change.max())
    yield Finding(
        title=f"Lazy (kernel) regime: the NTK moved {distance.max():.2g} from its start{moved} while the loss halved",
        severity="info", steps=(int(distance.index[0]), int(distance.index[-1])),
        evidence=evidence,
        reference=_CHIZAT,
        suggestion=("The network is close to its linearisation: features are not being learnt. Wider "
                    "networks, larger output scale or smaller learning rates push toward this regime; "
                    "a smaller width or output scale, or a larger learning rate, away from it."),
    )


@rule("kernel_alignment_rising", probe=NTK)
def kernel_alignment_rising(run: Run) -> Iterator[Finding]:
    """Alignment rising (module docstring)."""
    alignment = run.series(PROBE, "alignment").dropna()
    if len(alignment) < 2 or alignment.max() - alignment.iloc[0] < ALIGNMENT_RISE:
        return
    peak = int(alignment.idxmax())
    yield Finding(
        title=f"The kernel is learning the task: alignment {alignment.iloc[0]:.2f} → {alignment.max():.2f}",
        severity="info", steps=(int(alignment.index[0]), peak),
        evidence={"first": evidence_number(alignment.iloc[0]), "peak": evidence_number(alignment.max()),
                  "peak_step": peak},
        reference=_BARATIN,
        suggestion="Feature learning: the tangent kernel turns toward the targets (the per-layer figure says where).",
    )


@rule("fast_then_slow_kernel", probe=NTK)
def fast_then_slow_kernel(run: Run) -> Iterator[Finding]:
    """A fast early kernel phase, then a slow one (module docstring)."""
    velocity = run.series(PROBE, "velocity").dropna()
    velocity = velocity[velocity > 0]
    if len(velocity) < MIN_MEASUREMENTS + 1:
        return
    early, late = float(velocity.iloc[:2].mean()), float(velocity.iloc[-2:].mean())
    if late <= 0 or early / late < VELOCITY_DROP:
        return
    yield Finding(
        title=f"Fast early kernel phase: the NTK's velocity fell {early / late:.0f}×",
        severity="info", steps=(int(velocity.index[0]), int(velocity.index[-1])),
        evidence={"early_velocity": evidence_number(early), "late_velocity": evidence_number(late)},
        reference=_FORT,
        suggestion=("The kernel changed fast early in training and then settled; what was learnt early "
                    "(the kernel's shape) is then refined slowly."),
    )


@rule("ill_conditioned_kernel", probe=NTK)
def ill_conditioned_kernel(run: Run) -> Iterator[Finding]:
    """A very ill-conditioned kernel (module docstring)."""
    condition = run.series(PROBE, "condition_number").dropna()
    high = condition[condition >= CONDITION_LIMIT]
    if high.empty:
        return
    yield Finding(
        title=f"Ill-conditioned tangent kernel: condition number {high.iloc[-1]:.2g}",
        severity="info", steps=(int(high.index[0]), int(condition.index[-1])),
        evidence={"condition_number": evidence_number(high.iloc[-1])},
        reference=_FORT,
        suggestion=("Directions with tiny kernel eigenvalues are learnt very slowly (or the probe's "
                    "examples are near duplicates); check the effective rank and the top eigenvalues."),
    )
