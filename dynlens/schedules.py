"""When a probe measures: every N steps, at given steps, or log-spaced.

Every schedule also measures at step 0 (the Lens measures the initial state when it is created)
and at ``close()``; those two are added by the Lens, not by the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Schedule", "every", "at", "log", "resolve"]


class Schedule:
    """Decides whether a probe is due at a step (n optimizer steps taken)."""

    def due(self, step: int) -> bool:  # pragma: no cover - interface
        """True if the probe measures at ``step``."""
        raise NotImplementedError


@dataclass(frozen=True)
class every(Schedule):  # noqa: N801 - reads as dl.schedules.every(10)
    """Due at every ``n``-th step (steps n, 2n, 3n, ...), starting at ``start``."""

    n: int
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"every=N needs a whole number N >= 1, got {self.n!r}")

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0


@dataclass(frozen=True)
class at(Schedule):  # noqa: N801
    """Due at the listed steps only."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        values = frozenset(int(s) for s in steps)
        if any(s < 0 for s in values):
            raise ValueError(f"at=[...] needs steps >= 0, got {sorted(values)}")
        object.__setattr__(self, "steps", values)

    def due(self, step: int) -> bool:
        return step in self.steps


@dataclass(frozen=True)
class log(Schedule):  # noqa: N801
    """Log-spaced steps: about ``per_decade`` measurements per factor of 10, from ``start``.

    Dense early (where training changes fastest) and sparse late: the steps are the distinct
    values of round(start · 10^(i/per_decade)), i = 0, 1, 2, ...
    """

    start: int = 1
    per_decade: int = 10

    def __post_init__(self) -> None:
        if self.start < 1 or self.per_decade < 1:
            raise ValueError("log(start, per_decade) needs start >= 1 and per_decade >= 1")

    def due(self, step: int) -> bool:
        if step < self.start:
            return False
        # index of the nearest log-spaced point at or below step, and its neighbour above
        i = math.floor(self.per_decade * math.log10(step / self.start))
        return any(round(self.start * 10 ** (j / self.per_decade)) == step for j in (i, i + 1))


def resolve(every_n: int | None = None, at_steps: Iterable[int] | None = None,
            schedule: Schedule | None = None, default: int = 1) -> Schedule:
    """The schedule a probe's ``every=``, ``at=`` or ``schedule=`` arguments ask for."""
    given = [x is not None for x in (every_n, at_steps, schedule)]
    if sum(given) > 1:
        raise ValueError("give a probe one of every=, at= or schedule=, not several")
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule= must be a dl.schedules.Schedule, got {type(schedule).__name__}")
        return schedule
    if at_steps is not None:
        return at(at_steps)
    return every(default if every_n is None else every_n)
