from __future__ import annotations

import pytest

from dynlens import schedules


def test_every_is_due_at_multiples():
    assert [s for s in range(12) if schedules.every(4).due(s)] == [0, 4, 8]


def test_at_is_due_only_at_its_steps():
    assert [s for s in range(12) if schedules.at([3, 7]).due(s)] == [3, 7]


def test_log_is_dense_early_and_sparse_late():
    due = [s for s in range(1, 10001) if schedules.log(1, per_decade=10).due(s)]
    assert due[:5] == [1, 2, 3, 4, 5]
    assert len([s for s in due if s > 1000]) == 10
    assert due[-1] == 10000


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError):
        schedules.every(0)
    with pytest.raises(ValueError):
        schedules.at([-1])
    with pytest.raises(ValueError):
        schedules.log(0)
    with pytest.raises(TypeError):
        schedules.resolve(schedule="often")


def test_a_probe_rescheduled_keeps_every_other_setting_and_leaves_the_original_alone():
    import dynlens as dl

    original = dl.probes.Hessian(every=100, k=3, tol=1e-4, extras_every=4, precision="tf32")
    copy = original.with_schedule(every=7)
    assert (copy.k, copy.tol, copy.extras_every, copy.precision) == (3, 1e-4, 4, "tf32")
    assert copy.due(7) and not copy.due(100)
    assert original.due(100) and not original.due(7)
    assert copy._extras is not original._extras  # its own sub-schedule state
    at = original.with_schedule(at=[3, 5])
    assert at.due(3) and at.due(5) and not at.due(4)
    import pytest

    with pytest.raises(ValueError, match="one of every="):
        original.with_schedule(every=2, at=[1])
