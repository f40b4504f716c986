"""The cost control of a Lens: a time budget that defers due probes, a memory budget that bounds
what a measurement may allocate, and the record of what every measurement cost.

Time: ``share`` is what dynlens may add to training's wall time, as a fraction of it (0.05: the
run takes at most 5% longer than training alone: the design's "within 5% of training wall
time", docs/design.rst). A due measurement runs when its predicted cost (the last measurement of that probe)
fits,

    probe_seconds + lens_seconds + predicted <= share · training_seconds,

training_seconds = elapsed − probe_seconds − lens_seconds, the wall time since the Lens was
created that was not dynlens's; otherwise it waits (a schedule then means "at most this often").
(Until the fifth session the right side was share · (elapsed + predicted), a share of the whole
wall time, which let dynlens add share/(1 − share), 5.26%, to training's time.) The
measurements at step 0 run regardless: they are the initial state the run is compared with, and
what they cost is paid back by the measurements deferred after them. Until one measurement of a
probe has finished its cost is unknown, so it runs to a deadline (checked between units of
work: the Hessian's products), at the end of the allowance, and at step 0 after
``FIRST_SECONDS`` at least; a measurement stopped there (:class:`OverBudget`) is tried again
once the budget allows twice the time it ran (on two H200s, the 124M decoder's first Hessian
measurement under DDP took 47–87 s of a 66–90 s run). ``lens_seconds`` is the
Lens's own host time outside measurements (``lens.step()``'s bookkeeping, the basic probes,
writing the run database): the budget bounds everything dynlens adds, so the probes get what
the Lens leaves. Its waits on training's queued GPU work are training's time, and a call of
``step()`` that runs no probe while the GPU stays busy with training's work throughout costs no
wall time (the host was ahead of the device): neither is counted. ``share=None`` runs every
probe exactly on schedule. The clock is the host's; the Lens synchronises the device only
around measurements, so that between them the host's clock may run ahead of the device by the
work queued on it, which makes the share read slightly high (deferring a little early), never low.

Memory: ``memory_budget`` is the device memory the probes may take beyond the training's own
peak: the process's peak stays within (training peak + budget). A measurement is told how much
it may allocate beyond what is in use when it starts (:meth:`MemoryBudget.allowance`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TimeBudget", "MemoryBudget", "MemoryBudgetTooSmall", "OverBudget", "ProbeCost", "DEFAULT_BUDGET",
           "DEFAULT_MEMORY_SHARE", "FIRST_SECONDS", "examples_within"]

DEFAULT_BUDGET = 0.05
# memory_budget=None on a GPU: the probes may add this share of the training's own peak
DEFAULT_MEMORY_SHARE = 0.5
# seconds a probe's first measurement may take at step 0, before its cost is known (the
# allowance is then about 0): a small model's curvature fits; a large one's is stopped, and tried
# again when the budget allows twice as long
FIRST_SECONDS = 1.0
# the share of a GPU measurement's memory allowance kept back (MemoryBudget.allowance)
MEMORY_MARGIN = 0.05


class OverBudget(Exception):
    """A measurement stopped at its deadline (:attr:`dynlens.probes.Context.deadline`): the first
    measurement of a probe has no cost to predict from, so the Lens lets it run only until the
    time budget's allowance is spent; it is tried again, whole, once the budget allows twice the
    time it ran. Raised by :meth:`dynlens.probes.Context.check_time` between a measurement's
    units of work (the Hessian's products)."""


class MemoryBudgetTooSmall(Exception):
    """Raised by a measurement, before it allocates anything, when even its smallest split does
    not fit the memory it was allowed; the Lens then defers it (no failure is recorded)."""


def examples_within(memory: int | None, per_example: int, most: int, what: str) -> int:
    """How many examples a pass may take at once within ``memory`` bytes (None: no limit) when
    each needs ``per_example`` bytes: at most ``most``, at least one.

    Raises:
        MemoryBudgetTooSmall: not even one example fits (the Lens then waits for memory).
    """
    if memory is None:
        return most
    fitting = int(memory // max(1, per_example))
    if fitting < 1:
        raise MemoryBudgetTooSmall(
            f"{what} needs about {per_example / 2**30:.2f} GiB an example and "
            f"{memory / 2**30:.2f} GiB is allowed")
    return max(1, min(most, fitting))


@dataclass
class ProbeCost:
    """What one probe has cost so far.

    Fields:
        measurements: measurements taken.
        seconds: their total wall time (device synchronised before and after each).
        deferred: due measurements the time budget postponed (each counted once).
        peak_memory: the most device memory (bytes) a measurement took beyond what was in use
            when it started, over the measurements that raised the process's peak (where the
            allocator's counter shows it exactly; :meth:`MemoryBudget.extra_peak`). None on the
            CPU, and where every measurement stayed below an earlier peak.
        products: Hessian-vector products taken, for probes that report them (``hvps``).
        last_seconds: the last measurement's wall time: the prediction for the next one.
    """

    measurements: int = 0
    seconds: float = 0.0
    deferred: int = 0
    peak_memory: int | None = None
    products: float | None = None
    last_seconds: float | None = None

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly fields for the run's ``costs`` metadata."""
        return {"measurements": self.measurements, "seconds": self.seconds,
                "deferred": self.deferred, "peak_memory": self.peak_memory,
                "products": self.products}


class TimeBudget:
    """Decides whether a measurement fits the time budget and keeps every probe's costs.

    Args:
        share: what all probes together (and the Lens's own bookkeeping) may add to training's
            wall time, as a fraction of it, in (0, 1); None for no budget (every probe on
            schedule).
        clock: a function returning seconds (``time.perf_counter``; tests pass a fake clock).
    """

    def __init__(self, share: float | None = DEFAULT_BUDGET,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ValueError(
                f"budget must be a fraction of wall time between 0 and 1 (e.g. 0.05 for 5%), or "
                f"None to run every probe exactly on schedule; got {share!r}"
            )
        self.share = None if share is None else float(share)
        self.clock = clock
        self.start = clock()
        self.probe_seconds = 0.0
        self.lens_seconds = 0.0
        self.costs: dict[str, ProbeCost] = {}

    def elapsed(self) -> float:
        """Wall seconds since the budget started (the Lens's creation)."""
        return self.clock() - self.start

    def allowance(self) -> float:
        """Seconds a measurement may take now with dynlens's time still within the budget
        afterwards: x ≤ share·(elapsed − spent) − spent, spent = probe_seconds + lens_seconds
        (training's time does not grow while dynlens measures); +inf without a budget,
        negative when dynlens is over it."""
        if self.share is None:
            return math.inf
        return self.share * self.training_seconds() - (self.probe_seconds + self.lens_seconds)

    def training_seconds(self) -> float:
        """Wall seconds since the budget started that were not dynlens's."""
        return self.elapsed() - self.probe_seconds - self.lens_seconds

    def predicted(self, probe: str, predict: Callable[[float], float] | None = None) -> float:
        """The predicted seconds of the probe's next measurement: its last one's, passed through
        ``predict`` when given (:meth:`dynlens.Probe.predicted_seconds`); 0 if none yet."""
        cost = self.costs.get(probe)
        if cost is None or cost.last_seconds is None:
            return 0.0
        return cost.last_seconds if predict is None else float(predict(cost.last_seconds))

    def fits(self, probe: str, predict: Callable[[float], float] | None = None,
             ahead: float = 0.0) -> bool:
        """True if the probe's next measurement, as predicted, fits the budget now (``ahead``:
        ``ahead`` seconds from now, if dynlens spends nothing meanwhile)."""
        if self.share is None:
            return True
        later = self.share * max(0.0, ahead)
        return self.predicted(probe, predict) <= self.allowance() + later

    def cost(self, probe: str) -> ProbeCost:
        """The probe's cost record (created empty on first use)."""
        return self.costs.setdefault(probe, ProbeCost())

    def charge(self, probe: str, seconds: float, peak_memory: int | None = None,
               products: float | None = None) -> None:
        """Record one measurement of ``probe``."""
        cost = self.cost(probe)
        cost.measurements += 1
        cost.seconds += seconds
        cost.last_seconds = seconds
        self.probe_seconds += seconds
        if peak_memory is not None:
            cost.peak_memory = max(cost.peak_memory or 0, int(peak_memory))
        if products is not None:
            cost.products = (cost.products or 0.0) + float(products)

    def spend(self, probe: str, seconds: float) -> None:
        """Count ``seconds`` the probe took without measuring (it declined for lack of memory
        after planning): they are wall time the budget must hold too."""
        self.cost(probe).seconds += seconds
        self.probe_seconds += seconds

    def stopped(self, probe: str, seconds: float) -> None:
        """Count a measurement of ``probe`` stopped at its deadline after ``seconds``: they are
        spent, the measurement is deferred, and the next is predicted at twice as long (so the
        tries before one finishes cost at most about twice that one)."""
        self.spend(probe, seconds)
        self.cost(probe).last_seconds = 2 * seconds
        self.defer(probe)

    def time_to_fit(self, seconds: float) -> float:
        """Wall seconds from now until a measurement of ``seconds`` fits, if dynlens spends
        nothing meanwhile: the allowance grows by ``share`` a second of training (0 if it fits
        now, and always without a budget)."""
        if self.share is None:
            return 0.0
        return max(0.0, (seconds - self.allowance()) / self.share)

    def overhead(self, seconds: float) -> None:
        """Count ``seconds`` of the Lens's own time outside measurements (bookkeeping, the basic
        probes, writes): the budget holds them too, so they reduce what the probes may take."""
        self.lens_seconds += max(0.0, seconds)

    def defer(self, probe: str) -> None:
        """Count one due measurement of ``probe`` postponed by the budget."""
        self.cost(probe).deferred += 1

    def record(self) -> dict[str, Any]:
        """The run's ``costs`` metadata (read back by :meth:`dynlens.store.Run.costs`)."""
        wall = self.elapsed()
        return {
            "budget": self.share,
            "wall_seconds": wall,
            "probe_seconds": self.probe_seconds,
            "lens_seconds": self.lens_seconds,
            "training_seconds": wall - self.probe_seconds - self.lens_seconds,
            "probes": {name: cost.as_record() for name, cost in self.costs.items()},
        }


def _counters(device: torch.device) -> tuple[int, int]:
    """``(allocated, peak allocated)`` bytes on a CUDA device, read from the allocator's counters
    directly: ``torch.cuda.memory_allocated`` builds and flattens every allocator statistic in
    Python, 0.45 ms a call on an H200's host, and the Lens reads these at every step (a
    cProfile of 2,000 ResNet-18 steps found 3.6 s in it, 16% of the training's time). Falls back
    to the public functions where the private accessor differs."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stats = torch._C._cuda_memoryStats(index)["allocated_bytes"]["all"]
        return int(stats["current"]), int(stats["peak"])
    except Exception:  # noqa: BLE001 - another torch's layout: the public, slower path
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


class MemoryBudget:
    """How much device memory a measurement may allocate: the process's peak stays within the
    training's own peak plus the budget.

    The training's peak is read from PyTorch's allocator (``torch.cuda.max_memory_allocated``,
    never reset: that would change what the user reads) before measurements: when the process's
    peak has risen since the probes last ran, training raised it. Before the first training step
    (the measurements at step 0) the training's peak is estimated as what is in use plus a
    gradient and one optimizer state per parameter, or the process's peak so far if higher. On the CPU there is no limit unless
    ``memory_budget`` is given in bytes.

    Args:
        model_bytes: bytes of the trainable parameters.
        device: the model's device.
        budget: bytes, a fraction (0, 1] of the device's memory, or None (automatic:
            ``DEFAULT_MEMORY_SHARE`` of the training's peak on a GPU; no limit on the CPU).
    """

    def __init__(self, model_bytes: int, device: torch.device, budget: float | int | None = None) -> None:
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
                raise ValueError(
                    f"memory_budget must be a number of bytes (e.g. 2 * 2**30), a fraction of the "
                    f"device's memory in (0, 1], or None for automatic; got {budget!r}"
                )
            if isinstance(budget, float) and budget <= 1:
                if device.type != "cuda":
                    raise ValueError(
                        f"memory_budget={budget} is a fraction of device memory, which only a GPU "
                        "has here; pass bytes on the CPU"
                    )
                budget = int(budget * torch.cuda.get_device_properties(device).total_memory)
            budget = int(budget)
        self.device = device
        self.budget = budget
        self.cuda = device.type == "cuda"
        self.training_peak = 0
        self.retained = 0
        self._peak_after_probes = 0
        if self.cuda:
            # before any training step: what is in use, a gradient and one optimizer state; or the
            # process's peak so far, which is all the job's own (no probe has run yet): a Lens
            # made after some training steps starts from their peak, which later steps equal but
            # never exceed, so it would never be seen rising
            allocated, peak = _counters(device)
            self.training_peak = max(allocated + 2 * model_bytes, peak)

    def observe(self) -> None:
        """Update the training's peak: when the process's peak has risen since the probes last
        ran, training raised it. A host-side read of the allocator's counters (no device sync)."""
        if self.cuda:
            peak = _counters(self.device)[1]
            if peak < self._peak_after_probes:
                # someone reset the allocator's peak (torch.cuda.reset_peak_memory_stats: a
                # profiler, a trainer's memory report): what it shows since then is training's
                self._peak_after_probes = 0
            if peak > self._peak_after_probes:
                # the probes' own lasting state (retained) was held through training's peak too
                self.training_peak = max(self.training_peak, peak - self.retained)

    def in_use(self) -> int | None:
        """The bytes allocated on the device now (None on the CPU): pass it to :meth:`retain`
        after the Lens's own code has run."""
        return _counters(self.device)[0] if self.cuda else None

    def retain(self, before: int | None) -> None:
        """Count what the Lens's code since ``before = in_use()`` kept allocated (the probes'
        lasting state: a copy of the initial parameters, the previous ones, its buffers; less
        what it gave back) as the probes', not training's: the training's peak is the process's
        minus it, and the allowance leaves room for it."""
        if self.cuda and before is not None:
            self.retained = max(0, self.retained + _counters(self.device)[0] - before)

    def note_probe_start(self) -> int | None:
        """Called before a measurement: updates the training's peak; returns the bytes in use."""
        if not self.cuda:
            return None
        self.observe()
        return _counters(self.device)[0]

    def note_probe_end(self) -> None:
        """Called after measurements: remembers the process's peak they may have set."""
        if self.cuda:
            self._peak_after_probes = _counters(self.device)[1]

    @property
    def extra(self) -> int | None:
        """The bytes the probes may add to the training's peak (None: no limit)."""
        if self.budget is not None:
            return self.budget
        return int(DEFAULT_MEMORY_SHARE * self.training_peak) if self.cuda else None

    def allowance(self) -> int | None:
        """Bytes a measurement starting now may allocate beyond what is in use (None: no limit)."""
        extra = self.extra
        if extra is None:
            return None
        if not self.cuda:
            return max(0, extra)
        # the ceiling is the training's own peak plus the budget; what is in use includes the
        # probes' retained state. A share is kept back for the allocator's rounding and the
        # measurements' memory models (the Hessian's overshot its plan by 4% on a ResNet-18)
        ceiling = self.training_peak + extra
        return max(0, int((ceiling - _counters(self.device)[0]) * (1 - MEMORY_MARGIN)))

    def extra_peak(self, in_use_before: int | None, peak_before: int | None) -> int | None:
        """The most a measurement that started with ``in_use_before`` bytes allocated took beyond
        them, where it raised the process's peak (``peak_before``): then the counter shows it
        exactly. None where it stayed below the earlier peak (it took at most that peak minus
        what was in use; the counter is never reset, so nothing more precise can be read)."""
        if not self.cuda or in_use_before is None or peak_before is None:
            return None
        peak = _counters(self.device)[1]
        return peak - in_use_before if peak > peak_before else None

    def describe(self) -> str:
        """The numbers behind an allowance, for a message: `` (training's peak …, in use …, the
        probes' lasting state …, budget …)`` on a GPU; empty on the CPU."""
        if not self.cuda:
            return ""
        gib = 2.0**30
        return (f" (training's peak {self.training_peak / gib:.2f} GiB, in use "
                f"{_counters(self.device)[0] / gib:.2f} GiB, the probes' lasting state "
                f"{self.retained / gib:.2f} GiB, budget {(self.extra or 0) / gib:.2f} GiB)")

    def peak(self) -> int | None:
        """The process's peak allocated device memory so far (None on the CPU)."""
        return _counters(self.device)[1] if self.cuda else None
