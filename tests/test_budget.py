"""The cost control of the Lens: the time budget with a fake clock, deferral order, the costs it
records, the memory allowance, and out-of-memory errors inside a probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import sgd_steps, tiny_problem

import dynlens as dl
from dynlens.budget import MemoryBudget, MemoryBudgetTooSmall, TimeBudget


class FakeClock:
    """A clock that moves only when told: training steps and measurements cost what a test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Costly(dl.Probe):
    """A probe whose measurement takes ``seconds`` on the fake clock."""

    name = "slow"
    pure = True

    def __init__(self, clock: FakeClock, seconds: float, every: int) -> None:
        super().__init__(every=every)
        self.clock = clock
        self.seconds = seconds
        self.steps: list[int] = []
        self.allowances: list[float] = []

    def measure(self, ctx):
        self.clock.advance(self.seconds)
        self.steps.append(ctx.step)
        self.allowances.append(ctx.allowance)
        return {"value": 1.0}


class Early(Costly):
    name = "early"


class Late(Costly):
    name = "late"


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """A fake clock that every Lens created in the test times itself with."""
    fake = FakeClock()
    monkeypatch.setattr(dl.lens, "TimeBudget", lambda share: TimeBudget(share, clock=fake))
    return fake


def lens_with_clock(tmp_path, probes, clock: FakeClock, budget):
    model, loss_fn, batch = tiny_problem()
    return dl.Lens(model, loss_fn, batch, run_dir=tmp_path, probes=probes, basic=False, budget=budget)


def run_steps(lens, clock: FakeClock, steps: int, step_seconds: float) -> None:
    for _ in range(steps):
        clock.advance(step_seconds)
        lens.step()


def test_time_budget_rejects_shares_outside_zero_to_one():
    for bad in (0, 1, 1.5, -0.1, "5%"):
        with pytest.raises(ValueError, match="budget must be a fraction"):
            TimeBudget(bad)


def test_allowance_is_the_time_a_measurement_may_take_with_the_share_still_met():
    clock = FakeClock()
    budget = TimeBudget(0.1, clock=clock)
    clock.advance(100.0)
    budget.charge("p", 5.0)
    # after x more seconds of probes: 5 + x <= 0.1 · (100 − 5), training's 95 s
    assert budget.allowance() == pytest.approx(4.5)
    assert budget.training_seconds() == pytest.approx(95.0)
    assert TimeBudget(None, clock=clock).allowance() == math.inf


def test_a_probe_over_budget_is_deferred_and_the_total_share_stays_within_it(tmp_path, clock):
    probe = Costly(clock, seconds=1.0, every=10)  # due every 10 steps of 0.1 s: 100% wanted
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    # step 0 ran regardless (the initial state), at a cost of 1 s
    run_steps(lens, clock, 2000, 0.1)
    lens.close()
    wall = clock.now
    spent = len(probe.steps) * 1.0
    # every measurement after step 0 waited until it fit: the share overshoots by at most the
    # measurement at step 0 and the one at close
    assert spent / wall <= 0.05 + 1e-9
    assert probe.steps[0] == 0 and len(probe.steps) >= 5
    gaps = np.diff(probe.steps[:-1])
    assert gaps.min() >= 10  # never more often than the schedule
    costs = lens.costs().set_index("probe")
    assert costs.loc["slow", "measurements"] == len(probe.steps)
    assert costs.loc["slow", "seconds"] == pytest.approx(spent)
    assert costs.loc["slow", "deferred"] > 0
    assert costs.loc["slow", "share"] == pytest.approx(spent / wall)


def test_dynlens_adds_at_most_the_budget_to_trainings_time(tmp_path, clock):
    """The design's contract (docs/design.rst): the overhead is within 5% of training's wall
    time. Until the fifth session the budget bounded dynlens's share of the whole wall time,
    5/95 = 5.26% of training's: a probe that wants every step filled it to 21 s of 400 s here."""
    probe = Costly(clock, seconds=0.25, every=1)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    run_steps(lens, clock, 4000, 0.1)
    budget = lens.budget
    training, spent = budget.elapsed() - budget.probe_seconds - budget.lens_seconds, budget.probe_seconds
    lens.close()
    assert training == pytest.approx(400.0)
    assert 0.05 * training - 0.25 <= spent <= 0.05 * training + 1e-9  # filled, never over
    assert budget.training_seconds() == pytest.approx(training)


class Bookkeeping(dl.Probe):
    """An untimed probe (like the basic ones) whose work takes ``seconds`` on the fake clock:
    the Lens's own time, which the budget holds too."""

    name = "bookkeeping"
    pure = True
    timed = False
    isolate = False

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__(every=1)
        self.clock, self.seconds = clock, seconds

    def measure(self, ctx):
        self.clock.advance(self.seconds)
        return {"value": 1.0}


def test_the_lens_own_time_counts_against_the_budget_and_leaves_the_probes_less(tmp_path, clock):
    # 0.1 s steps; the Lens's own work takes 0.002 s a step (2% of the run): the costly probe may
    # take only the other 3%, and everything dynlens did stays within the 5%
    probe = Costly(clock, seconds=1.0, every=10)
    lens = lens_with_clock(tmp_path, [probe, Bookkeeping(clock, 0.002)], clock, budget=0.05)
    run_steps(lens, clock, 3000, 0.1)
    costs = lens.costs().set_index("probe")
    wall = clock.now
    own = costs.loc["lens", "seconds"]
    assert own == pytest.approx(3001 * 0.002)  # step 0 and every step
    assert costs.loc["lens", "share"] == pytest.approx(own / wall)
    spent = len(probe.steps) * 1.0
    assert (spent + own) / wall <= 0.05 + 1.0 / wall  # the step-0 measurement ran regardless
    assert spent / wall < 0.035 and len(probe.steps) >= 5
    lens.close()
    assert dl.load_run(tmp_path).costs().set_index("probe").loc["lens", "seconds"] == pytest.approx(own)


class Prepared(Costly):
    """A costly probe that keeps something at the step before it measures (like θ_{t−1})."""

    name = "prepared"

    def __init__(self, clock: FakeClock, seconds: float, every: int) -> None:
        super().__init__(clock, seconds, every)
        self.prepared: list[int] = []
        self.fresh: list[bool] = []

    def prepare(self, ctx):
        self.prepared.append(ctx.step)

    def measure(self, ctx):
        self.fresh.append(bool(self.prepared) and self.prepared[-1] == ctx.step - 1)
        return super().measure(ctx)


@pytest.mark.parametrize(("ahead", "busy"), [(False, False), (True, True), (False, True), (True, False)])
def test_the_lens_own_time_is_free_only_while_the_host_is_a_step_ahead_of_the_device(
        tmp_path, clock, monkeypatch, ahead, busy):
    # each step()'s bookkeeping takes 2 ms of host time. A host at least a step ahead of the
    # device at the call's start, with training's work still queued at its end, hides it (a GPU
    # job whose host runs ahead); an idle device (the CPU) or a device that had caught up with
    # the host (a host-bound job: the GPU waits for every launch) does not
    monkeypatch.setattr(dl.Lens, "_host_ahead", lambda self: ahead)
    monkeypatch.setattr(dl.Lens, "_device_busy", lambda self: busy)
    probe = Costly(clock, seconds=1.0, every=500)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    commit = lens.writer.commit
    monkeypatch.setattr(lens.writer, "commit", lambda: (clock.advance(0.002), commit()))
    run_steps(lens, clock, 2000, 0.1)
    own = lens.costs().set_index("probe").loc["lens", "seconds"]
    worked = len(probe.steps)  # calls that ran a measurement pay their host time anyway
    hidden = ahead and busy
    assert own == pytest.approx(0.002 * (worked - 1) if hidden else 0.002 * 2000, abs=0.0021)


def test_a_probe_the_budget_defers_prepares_only_before_steps_it_can_run(tmp_path, clock):
    probe = Prepared(clock, seconds=1.0, every=10)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    run_steps(lens, clock, 2000, 0.1)
    lens.close()
    measured = len(probe.steps)
    assert measured >= 5
    # it prepares (1-2 ms of host time each, through its isolation) just before it runs, not at
    # each of the ~200 due steps nor the ~1,900 steps it waits
    assert len(probe.prepared) <= 2 * measured + 2
    assert all(probe.fresh[1:])  # every measurement after step 0 had its prepare the step before


def test_while_the_budget_has_no_room_step_does_not_rescan_the_waiting_probes(tmp_path, clock, monkeypatch):
    probe = Costly(clock, seconds=1.0, every=1)  # wants every step; the budget allows 1 in ~200
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    scans = []
    scan = lens._run_due
    monkeypatch.setattr(lens, "_run_due", lambda *a, **k: (scans.append(lens.step_count), scan(*a, **k)))
    run_steps(lens, clock, 2000, 0.1)
    assert len(probe.steps) >= 8  # it still runs as soon as it fits ...
    assert len(scans) <= 3 * len(probe.steps)  # ... and the steps between cost no scan
    assert len(probe.steps) / clock.now <= 0.05 + 1e-9


def test_without_a_budget_every_probe_runs_exactly_on_schedule(tmp_path, clock):
    probe = Costly(clock, seconds=1.0, every=10)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=None)
    run_steps(lens, clock, 100, 0.1)
    lens.close()
    assert probe.steps == list(range(0, 101, 10))
    assert lens.costs().set_index("probe").loc["slow", "deferred"] == 0
    assert all(a == math.inf for a in probe.allowances)


def test_the_longest_waiting_probe_goes_first(tmp_path, clock):
    # both cost 1 s; "early" fell due at step 10 and "late" at step 15: once there is budget for
    # one measurement, it is "early"'s, though "late" comes first in the probe list
    late = Late(clock, seconds=1.0, every=15)
    early = Early(clock, seconds=1.0, every=10)
    lens = lens_with_clock(tmp_path, [late, early], clock, budget=0.1)
    # at step 0 both ran (2 s); the share comes back under 10% when 2 + 1 <= 0.1 (t + 1): t >= 29 s
    run_steps(lens, clock, 500, 0.1)
    first_after_start = sorted((s, n) for n, p in (("late", late), ("early", early)) for s in p.steps if s > 0)[0]
    assert first_after_start[1] == "early"
    assert late.steps[1] > early.steps[1]


class Cheap(Costly):
    name = "cheap"


def test_a_costly_probe_is_not_starved_by_cheaper_ones_behind_it(tmp_path, clock):
    # "cheap" (0.1 s, due every 5 steps) would fit the budget as soon as it accrues; "slow" (2 s)
    # needs it to build up: the longest-waiting probe holds back those behind it
    slow = Costly(clock, seconds=2.0, every=10)
    cheap = Cheap(clock, seconds=0.1, every=5)
    lens = lens_with_clock(tmp_path, [slow, cheap], clock, budget=0.05)
    run_steps(lens, clock, 3000, 0.1)
    lens.close()
    assert len(slow.steps) >= 5
    spent = 2.0 * len(slow.steps) + 0.1 * len(cheap.steps)
    assert spent / clock.now <= 0.05 + 2.1 / clock.now  # within the budget, but for the close


def test_costs_are_stored_with_the_run_and_read_back(tmp_path, clock):
    probe = Costly(clock, seconds=0.5, every=5)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.2)
    run_steps(lens, clock, 50, 0.1)
    live = lens.costs()
    lens.close()
    run = dl.load_run(tmp_path)
    stored = run.costs().set_index("probe")
    assert stored.loc["slow", "measurements"] == len(probe.steps)
    assert stored.loc["slow", "seconds"] == pytest.approx(0.5 * len(probe.steps))
    assert run.meta["costs"]["budget"] == 0.2
    assert run.meta["costs"]["wall_seconds"] == pytest.approx(clock.now)
    assert live.set_index("probe").loc["slow", "deferred"] <= stored.loc["slow", "deferred"]
    # the CPU has no device memory to report
    assert math.isnan(stored.loc["slow", "peak_memory"])


def test_optional_parts_see_a_negative_allowance_at_step_zero_under_a_budget(tmp_path, clock):
    probe = Costly(clock, seconds=0.1, every=1000)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    lens.close()
    assert probe.allowances[0] <= 0


class OutOfMemoryOnce(dl.Probe):
    """Raises the device's out-of-memory error unless given at most ``fits`` bytes."""

    name = "hungry"
    pure = True

    def __init__(self, fits: int | None, every: int = 1, error: type[Exception] = torch.OutOfMemoryError,
                 message: str = "CUDA out of memory. Tried to allocate 20.00 GiB") -> None:
        super().__init__(every=every)
        self.fits = fits
        self.error, self.message = error, message
        self.limits: list[int | None] = []

    def measure(self, ctx):
        self.limits.append(ctx.memory)
        if self.fits is None or ctx.memory is None or ctx.memory > self.fits:
            raise self.error(self.message)
        return {"ok": 1.0}


# the caching allocator's error, and what the CUDA runtime (torch.AcceleratorError, a
# RuntimeError) or cuBLAS raise when their own allocation fails
@pytest.mark.parametrize(("error", "message"), [
    (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 20.00 GiB"),
    (RuntimeError, "CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation' ..."),
    (RuntimeError, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_an_out_of_memory_error_is_retried_with_half_the_memory_and_training_goes_on(tmp_path, error, message):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = OutOfMemoryOnce(fits=600, error=error, message=message)
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[probe], basic=False,
                 budget=None, memory_budget=1000) as lens:
        sgd_steps(model, loss_fn, batch, opt, lens, 3)
        assert lens.disabled == []
    run = dl.load_run(tmp_path)
    # each measurement: the allowance (1000 bytes on the CPU), then half of it, which fits
    assert probe.limits[:2] == [1000, 500]
    assert run.series("hungry", "ok").index.tolist() == [0, 1, 2, 3]
    assert run.events().empty


def test_an_out_of_memory_error_twice_skips_the_measurement_with_a_warning(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = OutOfMemoryOnce(fits=None)
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[probe], basic=False,
                 budget=None, memory_budget=1000, max_failures=2) as lens:
        sgd_steps(model, loss_fn, batch, opt, lens, 4)
        # out of memory is not the probe's failure: it is never switched off for it
        assert lens.disabled == []
    run = dl.load_run(tmp_path)
    events = run.events()
    assert set(events.level) == {"warning"}
    assert events.message.str.contains("ran out of device memory").all()
    assert sorted(events.step) == [0, 1, 2, 3, 4]
    assert run.series("train", "loss").index.tolist() == [1, 2, 3, 4]
    assert lens.costs().set_index("probe").loc["hungry", "deferred"] == 5


class NeedsMemory(dl.Probe):
    name = "needs_memory"
    pure = True

    def __init__(self, every: int = 1) -> None:
        super().__init__(every=every)
        self.calls = 0

    def measure(self, ctx):
        self.calls += 1
        if ctx.step == 0:
            raise MemoryBudgetTooSmall("a product needs 3 GiB, 1 GiB allowed")
        return {"ok": 1.0}


def test_a_measurement_that_cannot_fit_its_memory_waits_without_failing(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = NeedsMemory()
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[probe], basic=False,
                 budget=None, memory_budget=10) as lens:
        lens.step()
        assert lens.disabled == []
    run = dl.load_run(tmp_path)
    # retried when its schedule came round again (step 1), with no more memory than before
    assert probe.calls == 2
    assert run.series("needs_memory", "ok").index.tolist() == [1]
    events = run.events()
    assert events.level.tolist() == ["info"] and "waits for memory" in events.message[0]


def test_a_probe_waiting_for_memory_is_not_retried_before_its_schedule_comes_round(tmp_path):
    model, loss_fn, batch = tiny_problem()
    probe = NeedsMemory(every=5)  # cannot fit at step 0 only
    lens = dl.Lens(model, loss_fn, batch, run_dir=tmp_path, probes=[probe], basic=False,
                   budget=None, memory_budget=10)
    for _ in range(12):
        lens.step()
    lens.close()
    # step 0 did not fit; the retry waited for the schedule (step 5), not every step
    assert probe.calls == 4  # steps 0, 5, 10 and 12 (close)
    assert dl.load_run(tmp_path).series("needs_memory", "ok").index.tolist() == [5, 10, 12]


def test_memory_budget_refuses_nonsense_and_fractions_on_the_cpu():
    for bad in (0, -5, "1GB", True):
        with pytest.raises(ValueError, match="memory_budget must be"):
            MemoryBudget(100, torch.device("cpu"), bad)
    with pytest.raises(ValueError, match="only a GPU"):
        MemoryBudget(100, torch.device("cpu"), 0.5)
    cpu = MemoryBudget(100, torch.device("cpu"), None)
    assert cpu.allowance() is None
    assert MemoryBudget(100, torch.device("cpu"), 4096).allowance() == 4096


def test_a_cpu_loss_tensor_is_stored_at_every_step(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch
    values = []
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path) as lens:
        for _ in range(5):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            values.append(float(loss.detach()))
            lens.step(loss=loss)
    assert dl.load_run(tmp_path).series("train", "loss").tolist() == pytest.approx(values)


class ColdThenWarm(Costly):
    """The first measurement costs 10 s (a cold start), the later ones 1 s, and it says so."""

    name = "cold"

    def measure(self, ctx):
        self.seconds = 10.0 if not self.steps else 1.0
        return super().measure(ctx)

    def predicted_seconds(self, last: float) -> float:
        return last / 10 if len(self.steps) == 1 else last


def test_a_probe_predicting_a_cheaper_next_measurement_is_scheduled_by_its_prediction(tmp_path, clock):
    plain = Costly(clock, seconds=10.0, every=10)
    predicting = ColdThenWarm(clock, seconds=10.0, every=10)
    for probe in (plain, predicting):
        lens = lens_with_clock(tmp_path / probe.name, [probe], clock, budget=0.05)
        run_steps(lens, clock, 3000, 0.1)
        lens.close()
    # training's time at step n: 0.1 n (step 0 took 10 s of dynlens's). A 10 s measurement fits
    # the 5% budget once 0.05·0.1 n − 10 ≥ 10, at n ≥ 4000: never in 3000 steps
    assert plain.steps == [0]
    # predicted at 1 s it fits at 0.05·0.1 n − 10 ≥ 1, n ≥ 2200; the next (1 s) once
    # 0.05·0.1 n − 11 ≥ 1, n ≥ 2400
    assert predicting.steps[:3] == [0, 2200, 2400]
    budget = TimeBudget(0.05, clock=clock)
    budget.charge("p", 10.0)
    assert budget.predicted("p") == 10.0
    assert budget.predicted("p", lambda last: last / 4) == 2.5


def test_the_memory_budget_counts_the_probes_lasting_state_as_theirs_not_trainings(monkeypatch):
    import dynlens.budget as budget_module

    counters = {"allocated": 1000, "peak": 1000}
    monkeypatch.setattr(budget_module, "_counters", lambda device: (counters["allocated"], counters["peak"]))
    budget = MemoryBudget(model_bytes=100, device=torch.device("cuda"), budget=None)
    assert budget.training_peak == 1200  # before any step: in use plus a gradient and a state
    before = budget.in_use()
    counters["allocated"] += 300  # the Lens keeps 300 bytes (a copy of the parameters)
    counters["peak"] = 1300
    budget.retain(before)
    assert budget.retained == 300
    budget.note_probe_end()
    counters["peak"] = 3300  # training's own peak of 3000, with the 300 held throughout
    budget.observe()
    assert budget.training_peak == 3000
    # the process may reach 1.5 × 3000; 1300 are in use; 5% of the rest is kept back
    assert budget.allowance() == int((4500 - 1300) * 0.95)
    before = budget.in_use()
    counters["allocated"] -= 300  # the copy is given back
    budget.retain(before)
    assert budget.retained == 0


def test_the_memory_budget_reads_trainings_peak_again_after_someone_resets_the_counters(monkeypatch):
    import dynlens.budget as budget_module

    counters = {"allocated": 1000, "peak": 1000}
    monkeypatch.setattr(budget_module, "_counters", lambda device: (counters["allocated"], counters["peak"]))
    budget = MemoryBudget(model_bytes=100, device=torch.device("cuda"), budget=None)
    counters["peak"] = 3000  # training's first step
    budget.observe()
    assert budget.training_peak == 3000
    counters["peak"] = 5000  # a measurement sets the process's peak
    budget.note_probe_end()
    # torch.cuda.reset_peak_memory_stats(): the peak falls to what is in use; training then
    # reaches 4000, below the measurement's 5000 but above its own earlier 3000
    counters["peak"] = 4000
    budget.observe()
    assert budget.training_peak == 4000
    assert budget.allowance() == int((6000 - 1000) * 0.95)


def test_a_lens_made_after_training_steps_starts_from_their_peak(monkeypatch):
    import dynlens.budget as budget_module

    # three training steps reached 3000 bytes before the Lens existed; 1000 are in use now
    counters = {"allocated": 1000, "peak": 3000}
    monkeypatch.setattr(budget_module, "_counters", lambda device: (counters["allocated"], counters["peak"]))
    budget = MemoryBudget(model_bytes=100, device=torch.device("cuda"), budget=None)
    assert budget.training_peak == 3000
    budget.note_probe_end()  # the step-0 measurements stay below it
    budget.observe()  # the next steps reach the same peak again
    assert budget.training_peak == 3000
    assert budget.allowance() == int((4500 - 1000) * 0.95)


class PlansThenDeclines(Costly):
    """Spends ``seconds`` planning, then finds that its measurement does not fit the memory."""

    name = "declines"

    def measure(self, ctx):
        self.clock.advance(self.seconds)
        raise MemoryBudgetTooSmall("a product needs 3 GiB, 1 GiB allowed")


def test_the_time_a_probe_spends_before_declining_for_memory_is_charged_to_the_budget(tmp_path, clock):
    probe = PlansThenDeclines(clock, seconds=2.0, every=10)
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    run_steps(lens, clock, 1000, 0.1)
    lens.close()
    cost = lens.costs().set_index("probe").loc["declines"]
    assert cost["measurements"] == 0 and cost["seconds"] >= 2.0 * 2
    assert lens.budget.probe_seconds == pytest.approx(cost["seconds"])
    # retried only while the budget could pay for it: over by at most the attempt at step 0
    assert cost["seconds"] / clock.now <= 0.05 + 2.0 / clock.now


class Unmeasured(dl.Probe):
    """A probe that does not fit its memory at step 0 (as the Hessian on the decoder under DDP)
    and is then due every 50 steps, whose measurement is ``units`` units of work of 0.5 s on the
    fake clock, checking its deadline before each (as the Hessian does before a product)."""

    name = "unmeasured"
    pure = True
    waits_at_zero = True

    def __init__(self, clock: FakeClock, units: int) -> None:
        super().__init__(at=list(range(50, 100_000, 50)))
        self.clock = clock
        self.units = units
        self.tries: list[tuple[int, int]] = []  # (step, units done) of every try
        self.deadlines: list[float] = []

    def measure(self, ctx):
        if ctx.step == 0 and self.waits_at_zero:
            raise MemoryBudgetTooSmall("not at step 0")
        self.deadlines.append(ctx.deadline)
        done = 0
        try:
            for _ in range(self.units):
                ctx.check_time()
                self.clock.advance(0.5)
                done += 1
        finally:
            self.tries.append((ctx.step, done))
        return {"value": 1.0}


def test_a_first_measurement_stops_at_its_deadline_and_tries_again_with_twice_the_time(tmp_path, clock):
    probe = Unmeasured(clock, units=20)  # 10 s of work, unknown to the Lens before it has run
    lens = lens_with_clock(tmp_path, [probe], clock, budget=0.05)
    assert not probe.tries  # waits for memory at step 0
    # on the CPU it tries again at step 1, where the allowance is 0.05·0.1 s: the try stops
    # after its first unit
    run_steps(lens, clock, 1, 0.1)
    assert probe.tries == [(1, 1)]
    assert probe.deadlines[0] == pytest.approx(0.1 + 0.05 * 0.1)
    run_steps(lens, clock, 8000, 0.1)
    lens.close()
    done = [units for _, units in probe.tries]
    finished = done.index(20)  # one try finished: later ones have no deadline
    assert finished >= 3 and all(d < 20 for d in done[:finished])
    # each stopped try ran about twice as long as the one before (units of 0.5 s: 1, 3, 7, 15)
    assert all(2 * a <= b <= 2 * a + 2 for a, b in zip(done[:finished - 1], done[1:finished], strict=True))
    assert all(d == math.inf for d in probe.deadlines[finished + 1:])
    # the budget held throughout: dynlens's share of the wall time, stopped tries included
    spent = 0.5 * sum(done)
    assert spent / clock.now <= 0.05 + 0.5 / clock.now
    costs = lens.costs().set_index("probe")
    assert costs.loc["unmeasured", "seconds"] == pytest.approx(spent)
    assert costs.loc["unmeasured", "measurements"] == len(done) - finished
    messages = dl.load_run(tmp_path).events()["message"]
    assert messages.str.contains("first measurement was stopped at step 1 ").sum() == 1
    assert messages.str.contains("first measurement was stopped").sum() == 1  # not at every doubling


def test_the_hessian_checks_its_deadline_before_every_product(tmp_path):
    from dynlens.budget import OverBudget
    from dynlens.probes import Context

    model, loss_fn, batch = tiny_problem()
    probe = dl.probes.Hessian(k=1)
    calls = []
    ctx = Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=3,
                  clock=lambda: calls.append(1) or float(len(calls)), deadline=4.5)
    with pytest.raises(OverBudget, match="past the end of its time allowance"):
        probe.measure(ctx)
    assert len(calls) >= 5  # the clock read at each product until it passed the deadline
    ctx = Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=3)
    assert probe.measure(ctx)["sharpness"] > 0  # no deadline: no check


class UnmeasuredAtZero(Unmeasured):
    """:class:`Unmeasured` that fits its memory at step 0."""

    name = "unmeasured_at_zero"
    waits_at_zero = False


def test_a_first_measurement_at_step_zero_may_take_first_seconds(tmp_path, clock):
    from dynlens.budget import FIRST_SECONDS

    probe = UnmeasuredAtZero(clock, units=20)
    lens_with_clock(tmp_path, [probe], clock, budget=0.05).close()
    # the allowance is nothing at step 0: the deadline is FIRST_SECONDS (1 s) after the start,
    # and the check before each unit of 0.5 s lets the units until then run
    assert probe.deadlines[0] == pytest.approx(FIRST_SECONDS)
    assert probe.tries[0] == (0, int(FIRST_SECONDS / 0.5) + 1)
    small = UnmeasuredAtZero(clock, units=1)  # a small model's measurement: within FIRST_SECONDS
    lens_with_clock(tmp_path / "small", [small], clock, budget=0.05).close()
    assert small.tries[0] == (0, 1)


def test_the_ntk_probe_checks_its_deadline_between_chunks_and_blocks(tmp_path):
    from dynlens.budget import OverBudget
    from dynlens.probes import Context

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batch = (torch.randn(12, 6), torch.randint(0, 3, (12,)))
    loss_fn = torch.nn.CrossEntropyLoss()

    def measured(deadline: float) -> tuple[object, int]:
        calls: list[int] = []
        ctx = Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=3,
                      clock=lambda: calls.append(1) or float(len(calls)), deadline=deadline, memory=3_000)
        try:
            return dl.probes.NTK(n=12).measure(ctx), len(calls)
        except OverBudget as err:
            return err, len(calls)

    # 3 kB splits the 12 examples into chunks: a check before each chunk's factors and block
    values, checks = measured(1e9)
    assert isinstance(values, dict) and values["trace"] > 0
    assert checks >= 6, checks
    stopped, reads = measured(2.5)  # past the deadline at the third check
    assert isinstance(stopped, OverBudget) and "past the end of its time allowance" in str(stopped)
    assert reads <= 4 < checks  # the third check, and the message's reading
    none, _ = measured(math.inf)  # no deadline: no check, the same kernel
    assert none["trace"] == pytest.approx(values["trace"], rel=1e-6)



def test_a_local_time_check_reads_this_ranks_clock_and_makes_no_collective():
    from dynlens.budget import OverBudget
    from dynlens.probes import Context

    model = torch.nn.Linear(2, 1)
    now = [0.5]
    # a group that is not a process group: any collective on it would raise
    ctx = Context(model=model, loss_fn=torch.nn.MSELoss(), probe_batch=None, optimizer=None, step=0,
                  group=object(), deadline=1.0, clock=lambda: now[0])
    ctx.check_time_locally()  # before the deadline: returns
    now[0] = 1.25
    with pytest.raises(OverBudget, match="0.25 s past the end of its time allowance"):
        ctx.check_time_locally()
    with pytest.raises(Exception) as collective:  # the collective check needs a real group
        ctx.check_time()
    assert not isinstance(collective.value, OverBudget)
    ctx.deadline = math.inf
    ctx.check_time_locally()  # no deadline: never stops
