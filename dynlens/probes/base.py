"""The probe interface: a measurement, a schedule, and the records it writes.

A probe subclasses :class:`Probe`, sets ``name`` and implements ``measure(ctx)``, which returns a
dict of floats (stored as scalars) and arrays (stored as arrays) under the probe's name. The Lens
calls it at the steps its schedule says, inside :func:`dynlens.functional.isolated`, and catches
anything it raises.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from dynlens import schedules
from dynlens.budget import OverBudget
from dynlens.distributed import decide
from dynlens.functional import Mode, ModelFunction

__all__ = ["Probe", "Context", "Values", "Labelled", "Occasional", "TRAINING", "LENS", "TOP_EIGENVECTOR", "probe_names",
           "probe_name"]

# Context.shared's key for the Hessian probe's latest top eigenvector: (step, flat host tensor)
TOP_EIGENVECTOR = "hessian.top_eigenvector"

# the records the Lens writes beside the probes': the training loss and learning rates, and the
# Lens's own (each measurement's seconds)
TRAINING = "train"
LENS = "lens"

Values = Mapping[str, "float | int | np.ndarray | Tensor | Labelled"]


@dataclass(frozen=True)
class Labelled:
    """An array whose entries carry their own labels, one per entry along its first axis: a
    value per weight matrix, per parameter tensor or per example, where the run's list of layers
    (``ctx.layers``, what an unlabelled per-layer array lines up with) does not fit. The Lens
    stores the labels with the array (only when they change) and the report uses them.

    Raises:
        ValueError: the labels are not one per entry of the first axis, or not all strings.
    """

    values: np.ndarray | Tensor
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        if not all(isinstance(label, str) for label in labels):
            raise ValueError(f"labels must be strings; got {[type(x).__name__ for x in labels][:5]}")
        shape = tuple(self.values.shape)
        if not shape or shape[0] != len(labels):
            raise ValueError(
                f"a labelled array needs one label per entry of its first axis: the array has shape "
                f"{shape} and {len(labels)} labels were given"
            )
        object.__setattr__(self, "labels", labels)


@dataclass
class Context:
    """What a probe sees when it measures.

    Attributes:
        model: the user's model (read it; do not change it).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss.
        probe_batch: the fixed ``(inputs, targets)`` measured on, on the model's device.
        optimizer: the training optimizer, or None.
        step: optimizer steps taken so far (0 = the initial state).
        loss: the training loss passed to ``lens.step(loss=...)``, or None (also for a loss on
            the GPU at a step where only the basic probes run: reading it would wait for the GPU).
        seed: the seed of dropout in ``mode="train"`` measurements.
        group: the ``torch.distributed`` process group of a distributed run, else None. Each
            rank's ``probe_batch`` is its shard; ``fn`` and the built-in measurements then give
            the whole batch's values on every rank (:mod:`dynlens.distributed`). A probe's own
            collectives must keep every rank in step: see that module's contract.
        layers: the layer (module) names of the trainable parameters, in the order per-layer
            arrays use.
        layer_index: for each trainable parameter (in ``model.named_parameters()`` order), the
            index of its layer in ``layers``.
        allowance: seconds this measurement may take within the Lens's time budget (+inf
            without a budget; negative when the probes are over it, as at step 0). A probe
            with optional parts (a trace, a stiffness matrix) runs them only when they fit.
        memory: bytes of device memory this measurement may allocate beyond what is in use
            (None: no limit). Measurements split their work to fit it, or raise
            :class:`dynlens.budget.MemoryBudgetTooSmall` before allocating when they cannot.
        shared: what probes publish for one another, the same dict for the whole run (the Lens
            keeps it). The Hessian probe puts its latest top eigenvector under
            ``TOP_EIGENVECTOR`` as ``(step, flat host tensor)``; OpposingSignals reads it.
        deadline: the time (on ``clock``) at which this measurement must stop, +inf for none.
            The Lens sets one until a measurement of the probe has finished, while its cost
            cannot be predicted: the allowance's end (at step 0, ``FIRST_SECONDS`` after the
            start at least). A long measurement calls :meth:`check_time` between its units of
            work (the Hessian probe: before every product).
        clock: the Lens's clock (``time.perf_counter``).
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    probe_batch: Any
    optimizer: torch.optim.Optimizer | None
    step: int
    loss: float | None = None
    seed: int = 0
    group: Any = None
    layers: list[str] = field(default_factory=list)
    layer_index: list[int] = field(default_factory=list)
    allowance: float = math.inf
    memory: int | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    deadline: float = math.inf
    clock: Callable[[], float] = field(default_factory=lambda: time.perf_counter)

    def check_time(self) -> None:
        """Raise :class:`dynlens.budget.OverBudget` if this measurement is past its
        ``deadline``; otherwise return. Under ``torch.distributed`` rank 0's clock decides for
        every rank (one broadcast), so all stop at the same point; without a deadline it costs
        nothing."""
        if self.deadline == math.inf:
            return
        if decide(self.group, self.clock() > self.deadline):
            self._stop()

    def check_time_locally(self) -> None:
        """:meth:`check_time` on this rank's clock alone, with no collective: for work whose
        units differ between ranks (each rank's own rows of a kernel), where a collective check
        would leave the ranks waiting for each other at different points. It must run inside
        :func:`dynlens.distributed.lockstep` with no collective between two checks: a rank that
        stops sends its status there, and the others raise
        :class:`dynlens.distributed.PeerFailed` (``OVER_TIME``, which the Lens counts as stopped)
        where they next meet. Without ``torch.distributed`` it is :meth:`check_time`."""
        if self.deadline != math.inf and self.clock() > self.deadline:
            self._stop()

    def _stop(self) -> None:
        """Raise the :class:`OverBudget` of :meth:`check_time` and :meth:`check_time_locally`."""
        raise OverBudget(f"stopped {self.clock() - self.deadline:.3g} s past the end of its time allowance")

    @functools.cached_property
    def fn(self) -> ModelFunction:
        """The model as a pure function of its parameters on the probe batch (loss, grad, hvp,
        per-example losses and gradients, JVP/VJP): see :class:`dynlens.functional.ModelFunction`."""
        return ModelFunction(self.model, self.loss_fn, self.probe_batch, seed=self.seed, group=self.group)

    def loss_value(self) -> Tensor:
        """The mean loss on the probe batch at the current parameters."""
        return self.fn.loss()

    def grad(self) -> dict[str, Tensor]:
        """The gradient of the probe-batch loss (a fresh dict; ``.grad`` is never touched)."""
        return self.fn.grad()

    def hvp(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hessian-vector product of the probe-batch loss with a parameter-shaped dict ``v``."""
        return self.fn.hvp(v)

    def per_example_grads(self, chunk_size: int = 64):  # noqa: ANN201 - iterator of chunks
        """Per-example gradients of the probe batch in chunks: see ModelFunction.per_example_grads."""
        return self.fn.per_example_grads(chunk_size)


class Occasional:
    """An optional, costly part of a probe's measurement (λ_min, a trace, a stiffness matrix) on a
    sparser sub-schedule: due at every ``every``-th measurement of its probe (and at the first),
    and taken only when its predicted cost fits what the measurement may still spend
    (``ctx.allowance``; without a time budget, always). A part that did not fit stays due, and is
    taken at the next measurement that can afford it.

    Call :meth:`tick` once per measurement, then :meth:`wanted`; take the part inside
    :meth:`timed` (or call :meth:`ran` with its seconds).
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"a sub-schedule needs a whole number of measurements >= 1, got {every!r}")
        self.every = every
        self.count = 0
        self.last: int | None = None
        self.seconds: float | None = None

    def tick(self) -> None:
        """Count one measurement of the probe."""
        self.count += 1

    @property
    def due(self) -> bool:
        """True when the part has not run in its last ``every`` measurements."""
        return self.last is None or self.count - self.last >= self.every

    def wanted(self, spent: float, allowance: float, predicted: float) -> bool:
        """Due, and its cost (its last one, else ``predicted`` seconds) fits: ``spent`` seconds of
        this measurement so far plus the part's within ``allowance``."""
        cost = self.seconds if self.seconds is not None else predicted
        return self.due and spent + cost <= allowance

    def ran(self, seconds: float) -> None:
        """Record that the part ran at this measurement and took ``seconds``."""
        self.last = self.count
        self.seconds = seconds

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Take the part inside: records that it ran, and its wall time, when the body returns."""
        start = time.perf_counter()
        yield
        self.ran(time.perf_counter() - start)


class Probe:
    """Base class of every probe, built-in or the user's.

    Subclasses set ``name`` (the key its records are stored under) and implement
    :meth:`measure`. The schedule comes from ``every=N`` (every N-th step), ``at=[...]`` (those
    steps) or ``schedule=`` (e.g. ``dl.schedules.log()``); every probe also measures at step 0
    and at ``close()``.

    Class attributes a subclass may set:
        name: the probe's name in the run database (required).
        default_every: the ``every`` used when no schedule is given.
        pure: True if ``measure`` never writes to the model: it may read ``ctx.model``'s
            parameters (the basic probes take their norms) and compute through ``ctx.fn`` (the
            functional helpers, which leave ``.grad`` and buffers alone), but it never runs the
            model itself, calls ``backward()`` or changes a buffer. The Lens then skips setting
            ``.grad`` aside and restoring the buffers around it. Leave it False for probes that
            call the model directly.
        isolate: run inside :func:`dynlens.functional.isolated` (mode, RNG and attention kernel
            restored). Only probes that never run the model may set it False.
        timed: record the seconds each measurement took (as ``lens/seconds/<name>``).
        mode: "eval" (default) or "train": the model's mode while the probe measures.
    """

    name: ClassVar[str] = ""
    default_every: ClassVar[int] = 1
    pure: ClassVar[bool] = False
    timed: ClassVar[bool] = True
    isolate: ClassVar[bool] = True
    mode: Mode = "eval"

    def __init__(
        self,
        every: int | None = None,
        at: Iterable[int] | None = None,
        schedule: schedules.Schedule | None = None,
        mode: Mode | None = None,
    ) -> None:
        if not type(self).name:
            raise TypeError(f"{type(self).__name__} must set a class attribute name = '...'")
        self.schedule = schedules.resolve(every, at, schedule, default=type(self).default_every)
        if mode is not None:
            if mode not in ("eval", "train"):
                raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
            self.mode = mode
        self.notes: dict[str, Any] = {}
        self._notes_changed = False

    def note(self, key: str, value: Any) -> None:
        """Keep ``value`` (JSON-friendly: numbers, strings, lists, dicts) in the run's metadata
        under this probe, ``run.meta["notes"][name][key]``: what a probe learns once or rarely
        (the matrices it found, the method it fell back to) and need not record every step. Call
        it from ``setup``, ``prepare`` or ``measure``; the Lens writes the notes after the call."""
        self.notes[str(key)] = value
        self._notes_changed = True

    def with_schedule(self, every: int | None = None, at: Iterable[int] | None = None,
                      schedule: schedules.Schedule | None = None) -> Probe:
        """A copy of this probe with another schedule and every other setting kept (rebuilding it
        as ``type(p)(every=N)`` would drop the settings it was made with, such as those of
        :func:`dynlens.probes.default`). The copy starts with no state of its own: take it
        before attaching the probe to a Lens.

        Raises:
            ValueError: the schedule is not one of ``every=``, ``at=`` or ``schedule=``.
        """
        copied = copy.copy(self)
        copied.__dict__ = copy.deepcopy(self.__dict__)
        copied.schedule = schedules.resolve(every, at, schedule, default=type(self).default_every)
        return copied

    def due(self, step: int) -> bool:
        """True if this probe measures at ``step`` (step 0 and close() are added by the Lens)."""
        return self.schedule.due(step)

    def setup(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called once before the first measurement (step 0); keep initial state here."""

    def prepare(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called at the step before each step where the probe is due (e.g. to keep θ_{t−1})."""

    def measure(self, ctx: Context) -> Values:
        """Measure and return ``{name: float or array}``; raise on failure (the Lens records it)."""
        raise NotImplementedError(f"{type(self).__name__}.measure(ctx) is not implemented")

    def predicted_seconds(self, last: float) -> float:
        """The seconds the next measurement should take, given that the last one took ``last``:
        the Lens's time budget defers a measurement whose prediction does not fit. The default
        is ``last``; a probe whose measurements differ in cost predictably (a first one that
        pays for a cold start) says so here."""
        return last

    def describe(self) -> dict[str, Any]:
        """The probe's settings as JSON-friendly values (shown in the report)."""
        return {"class": type(self).__name__, "schedule": repr(self.schedule), "mode": self.mode}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, schedule={self.schedule!r})"


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def probe_names() -> set[str]:
    """Every name records can be stored under: each defined probe class's ``name`` (built-in or
    the user's) and the Lens's own :data:`TRAINING` and :data:`LENS`."""
    return {TRAINING, LENS} | {sub.name for sub in _subclasses(Probe) if sub.name}


def probe_name(probe: str | type[Probe] | Probe) -> str:
    """The records' name of ``probe`` (a probe class, an instance, or a name), checked against
    :func:`probe_names`: a rule or figure registered for a misspelt probe fails here, where it
    is written, instead of silently never matching.

    Raises:
        ValueError: no probe of that name is defined.
    """
    name = probe.name if isinstance(probe, Probe) or (isinstance(probe, type) and issubclass(probe, Probe)) \
        else probe
    if not isinstance(name, str):
        raise TypeError(f"a probe is named by its class, an instance or its name; got {probe!r}")
    known = probe_names()
    if name not in known:
        raise ValueError(
            f"no probe is named {name!r}; the names defined are {sorted(known)}. Import the probe's "
            "class and pass it (or its .name) instead of spelling the name again"
        )
    return name
