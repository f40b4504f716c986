"""The processes of tests/distributed/test_distributed.py: two gloo ranks on the CPU.

Run one process per rank, ``python tests/distributed/workers.py OUT_DIR RANK WORLD SCENARIOS``
(SCENARIOS: ``measurements,lens``): the ranks join a gloo process group through a file store in
OUT_DIR (collectives time out after 30 s, so that a hang fails instead of waiting forever),
split a probe batch across the ranks, measure, and write what they found to OUT_DIR as JSON
(rank 0: the distributed values and the single-process ones on the whole batch; the Lens run
writes its run database to OUT_DIR/run). :func:`launch` starts them and waits, with a timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import dynlens as dl  # noqa: E402
from dynlens.functional import ModelFunction, isolated  # noqa: E402
from dynlens.measures.opposing import along_direction, ledger_entry  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=30)
M, SPLIT = 10, 6  # rank 0 holds examples 0..5, rank 1 6..9: unequal shards


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(M, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (M,), generator=g)


def _shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if world == 1:
        return tensor
    n = len(tensor)
    bounds = [0, SPLIT, n] if world == 2 and n == M else [round(i * n / world) for i in range(world + 1)]
    return tensor[bounds[rank]:bounds[rank + 1]]


def measurements(rank: int, world: int, group: object, out: str) -> None:
    """Every measurement on the split batch; rank 0 also on the whole batch alone."""
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    x, y = _batch()
    shard = (_shard(x, rank, world), _shard(y, rank, world))
    second_set = x[:4] + 0.5

    def values(batch: tuple, g: object) -> dict:
        found: dict = {}
        eig = dl.hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-8, group=g)
        found["eigenvalues"] = eig.values.tolist()
        found["trace"] = dl.hessian_trace(model, loss_fn, batch, samples=24, seed=3, group=g).value
        density = dl.hessian_density(model, loss_fn, batch, runs=2, iters=10, group=g)
        found["density_nodes"] = density.nodes.reshape(-1).tolist()
        coh = dl.gradient_coherence(model, loss_fn, batch, stiffness=False, classes=False, group=g)
        found.update(m_coherence=coh.m_coherence, alpha=coh.alpha, gsnr=coh.gsnr, noise_scale=coh.noise_scale,
                     grad_norms=coh.grad_norms.tolist(), size=coh.size)
        second = second_set if g is None else _shard(second_set, rank, world)
        found["ntk"] = dl.empirical_ntk(model, batch[0], group=g).tolist()
        found["ntk_full"] = dl.empirical_ntk(model, batch[0], second, mode="full", group=g).reshape(-1).tolist()
        found["ntk_diagonal"] = dl.empirical_ntk(model, batch[0], mode="diagonal", group=g).reshape(-1).tolist()
        logits = model(batch[0]).detach() * torch.linspace(1, 40, len(batch[0]), dtype=torch.float64)[:, None]
        if g is not None:  # the scale of the examples of this shard within the whole batch
            scale = torch.linspace(1, 40, M, dtype=torch.float64)
            logits = model(batch[0]).detach() * _shard(scale, rank, world)[:, None]
        collapse = dl.softmax_collapse(logits, batch[1], torch.float32, group=g)
        found.update(collapse_fraction=collapse.fraction, collapse_by_dtype=collapse.by_dtype,
                     collapse_zero=collapse.zero_loss_fraction, margin_median=collapse.margin_median,
                     collapse_count=collapse.count)
        found["nlm"] = dl.nlm_alignment(model, loss_fn, batch, group=g).cosine
        found["ledger_loss"] = ledger_entry(model, loss_fn, batch, chunk_size=4, group=g).loss.tolist()
        direction = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        found["along_direction"] = along_direction(model, loss_fn, batch, direction, chunk_size=4, group=g).tolist()
        with isolated(model, "eval"):
            fn = ModelFunction(model, loss_fn, batch, group=g)
            found["loss"] = float(fn.loss())
            found["grad"] = torch.cat([t.reshape(-1) for t in fn.grad().values()]).tolist()
            v = {n: torch.ones_like(t) for n, t in fn.params.items()}
            found["hvp"] = torch.cat([t.reshape(-1) for t in fn.hvp(v).values()]).tolist()
        return found

    result = {"distributed": values(shard, group)}
    # a measurement that fails on rank 1 alone (a non-finite loss on its shard) raises on every
    # rank, rank 0 learning it at its next collective, and the group stays usable
    poisoned = (shard[0].clone(), shard[1])
    if rank == 1:
        poisoned[0][0, 0] = float("nan")
    try:
        dl.hessian_eigenvalues(model, loss_fn, poisoned, group=group)
        raised = None
    except Exception as err:  # noqa: BLE001 - what each rank raised is the result
        raised = f"{type(err).__name__}: {err}"
    after = dl.hessian_eigenvalues(model, loss_fn, shard, k=2, tol=1e-8, group=group).values.tolist()
    raised_everywhere: list = [None] * world
    dist.all_gather_object(raised_everywhere, raised, group=group)
    result["failure"] = {"raised": raised_everywhere, "after": after}
    if rank == 0:
        result["single"] = values((x, y), None)
        with open(os.path.join(out, "measurements.json"), "w") as f:
            json.dump(result, f)


class FailsOnRankOne(dl.Probe):
    """Rank 1 raises before the collective (ctx.fn.grad()) that rank 0 enters."""

    name = "fails_on_rank_one"
    default_every = 1

    def measure(self, ctx: dl.probes.Context) -> dict:
        if dist.get_rank(ctx.group) == 1:
            raise RuntimeError("planted failure on rank 1")
        ctx.fn.grad()
        return {"value": 1.0}


class FailsAfterOnRankOne(dl.Probe):
    """Rank 1 raises after the collectives rank 0 completes: rank 0 learns of it at the end."""

    name = "fails_after_on_rank_one"
    default_every = 1

    def measure(self, ctx: dl.probes.Context) -> dict:
        loss = float(ctx.fn.loss())
        if dist.get_rank(ctx.group) == 1:
            raise ValueError("planted late failure on rank 1")
        return {"loss": loss}


class WaitsOnRankOne(dl.Probe):
    """Rank 1's memory allowance is too small: every rank waits (no failure recorded)."""

    name = "waits_on_rank_one"
    default_every = 1

    def measure(self, ctx: dl.probes.Context) -> dict:
        from dynlens.budget import MemoryBudgetTooSmall

        if dist.get_rank(ctx.group) == 1:
            raise MemoryBudgetTooSmall("planted: rank 1 has no memory to spare")
        return {"loss": float(ctx.fn.loss())}


class OutOfMemoryOnRankOne(dl.Probe):
    """Rank 1 runs out of memory: every rank retries with half the memory, then skips."""

    name = "out_of_memory_on_rank_one"
    default_every = 1

    def measure(self, ctx: dl.probes.Context) -> dict:
        loss = float(ctx.fn.loss())
        if dist.get_rank(ctx.group) == 1:
            raise torch.OutOfMemoryError("planted out of memory on rank 1")
        return {"loss": loss}


def lens_run(rank: int, world: int, group: object, out: str) -> None:
    """A Lens over a DDP model with the default probes and two probes that fail on rank 1."""
    from torch.nn.parallel import DistributedDataParallel

    model, loss_fn = _model(), nn.CrossEntropyLoss()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = _batch()
    probe_batch = (_shard(x, rank, world), _shard(y, rank, world))
    probes = [p.with_schedule(every=2) for p in dl.probes.default()] + [
        FailsOnRankOne(), FailsAfterOnRankOne(), WaitsOnRankOne(), OutOfMemoryOnRankOne()]
    lens = dl.Lens(ddp, loss_fn, probe_batch, optimizer=opt, run_dir=os.path.join(out, "run"), probes=probes,
                   max_failures=10)
    assert lens.group is not None
    for step in range(4):
        xb, yb = _shard(x, rank, world), _shard(y, rank, world)
        opt.zero_grad()
        loss = loss_fn(ddp(xb + 0.01 * step), yb)
        loss.backward()
        opt.step()
        lens.step(loss=loss)
    lens.close()
    dist.barrier(group)
    with open(os.path.join(out, f"lens-{rank}.json"), "w") as f:
        json.dump({"disabled": lens.disabled, "steps": lens.step_count,
                   "writer": type(lens.writer).__name__}, f)


class Sleepy(dl.probes.Probe):
    """A probe whose measurement takes 50 ms of wall time, wanted at every step."""

    name = "sleepy"
    pure = True

    def __init__(self) -> None:
        super().__init__(every=1)
        self.steps: list[int] = []

    def measure(self, ctx: dl.probes.Context) -> dict:
        import time

        time.sleep(0.05)
        self.steps.append(ctx.step)
        return {"value": 1.0}


def _steps_of_10_ms(probe: dl.probes.Probe, rank: int, world: int, group: object, run_dir: str,
                    steps: int, sleep: float = 0.01) -> dl.Lens:
    """A Lens with ``probe`` alone over ``steps`` training steps of 10 ms (sleeps), closed."""
    import time

    x, y = _batch()
    lens = dl.Lens(_model(), nn.CrossEntropyLoss(), (_shard(x, rank, world), _shard(y, rank, world)),
                   run_dir=run_dir, probes=[probe], basic=False, group=group)
    for _ in range(steps):
        time.sleep(sleep)
        lens.step()
    lens.close()
    return lens


def _counting_plans(run: Any) -> tuple[Any, int]:
    """``run()``'s result and how many times the ranks met to agree on a plan meanwhile."""
    import dynlens.lens

    plans = [0]
    agree = dynlens.lens.agree_plan

    def counted(*args: object, **kwargs: object) -> object:
        plans[0] += 1
        return agree(*args, **kwargs)

    dynlens.lens.agree_plan = counted
    try:
        return run(), plans[0]
    finally:
        dynlens.lens.agree_plan = agree


def quiet_run(rank: int, world: int, group: object, out: str) -> None:
    """A probe the 5% budget defers for ~200 steps at a time: the ranks agree on which steps
    it runs, and between them no rank scans the waiting probes, so no collective is made."""
    probe = Sleepy()
    lens, plans = _counting_plans(
        lambda: _steps_of_10_ms(probe, rank, world, group, os.path.join(out, "quiet_run"), 600))
    with open(os.path.join(out, f"quiet-{rank}.json"), "w") as f:
        json.dump({"steps": probe.steps, "plans": plans, "lens": lens.budget.lens_seconds,
                   "probes": lens.budget.probe_seconds, "wall": lens.budget.elapsed()}, f)


class NeverFits(dl.probes.Probe):
    """A probe whose measurement never fits its memory allowance, due every 100 steps."""

    name = "never_fits"
    pure = True

    def __init__(self) -> None:
        super().__init__(every=100)
        self.tries: list[int] = []

    def measure(self, ctx: dl.probes.Context) -> dict:
        from dynlens.budget import MemoryBudgetTooSmall

        self.tries.append(ctx.step)
        raise MemoryBudgetTooSmall("needs more than it is allowed")


def memory_wait_run(rank: int, world: int, group: object, out: str) -> None:
    """A probe that waits for memory through the whole run: the ranks meet only where it falls
    due again (the 124M decoder's NTK under DDP made them meet at every step)."""
    import dynlens.lens

    probe = NeverFits()
    more = dynlens.lens.Lens._more_memory
    # as on a GPU whose training peak stays put (on the CPU there is no allowance to grow)
    dynlens.lens.Lens._more_memory = lambda self, name: False
    try:
        _, plans = _counting_plans(
            lambda: _steps_of_10_ms(probe, rank, world, group, os.path.join(out, "memory_wait_run"), 450))
    finally:
        dynlens.lens.Lens._more_memory = more
    with open(os.path.join(out, f"memory-wait-{rank}.json"), "w") as f:
        json.dump({"tries": probe.tries, "plans": plans}, f)


def fsdp_run(rank: int, world: int, group: object, out: str) -> None:
    """FSDP2 (``fully_shard``): the loss ledger across ranks equals the unsharded model's on the
    whole batch; a Lens runs the ledger and softmax collapse, refuses the Hessian with its message,
    and training goes on."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        with open(os.path.join(out, "fsdp.json"), "w") as f:
            json.dump({"skipped": "torch.distributed.fsdp.fully_shard is not available"}, f)
        return
    from torch.distributed.device_mesh import init_device_mesh

    loss_fn = nn.CrossEntropyLoss()
    plain, model = _model(), _model()
    # on the CPU's gloo group: fully_shard's default mesh is on the GPU when the host has one,
    # and would move the model there while its batch stays on the CPU
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    x, y = _batch()
    shard = (_shard(x, rank, world), _shard(y, rank, world))
    found: dict = {"ledger": ledger_entry(model, loss_fn, shard, chunk_size=4, group=group).loss.tolist()}
    if rank == 0:
        found["ledger_single"] = ledger_entry(plain, loss_fn, (x, y), chunk_size=4).loss.tolist()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lens = dl.Lens(model, loss_fn, shard, optimizer=opt, run_dir=os.path.join(out, "fsdp_run"), group=group,
                   probes=[dl.probes.OpposingSignals(every=1), dl.probes.SoftmaxCollapse(every=1),
                           dl.probes.Hessian(every=2)], budget=None, max_failures=10)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(shard[0]), shard[1]).backward()
        opt.step()
        lens.step()
    lens.close()
    # the sharded model still trains after the probes ran
    found["trained"] = bool(torch.isfinite(loss_fn(model(shard[0]), shard[1])).item())
    if rank == 0:
        with open(os.path.join(out, "fsdp.json"), "w") as f:
            json.dump(found, f)


class Unknown(dl.probes.Probe):
    """A probe whose cost the budget does not know: it waits for memory at step 0, then each
    try is 10 units of 5 ms (wall time), checking its deadline before each unit, rank 1's units
    slower than rank 0's: rank 0's clock decides where every rank stops."""

    name = "unknown"
    pure = True

    def __init__(self, rank: int) -> None:
        super().__init__(every=1)
        self.rank = rank
        self.tries: list[list[int]] = []

    def measure(self, ctx: dl.probes.Context) -> dict:
        import time

        from dynlens.budget import MemoryBudgetTooSmall

        if ctx.step == 0:
            raise MemoryBudgetTooSmall("not at step 0")
        done = 0
        try:
            for _ in range(10):
                ctx.check_time()
                time.sleep(0.005 if self.rank == 0 else 0.008)
                done += 1
        finally:
            self.tries.append([ctx.step, done])
        return {"value": 1.0}


def deadline_run(rank: int, world: int, group: object, out: str) -> None:
    """First measurements stopped at their deadline under torch.distributed: every rank stops
    at the same unit (no hang), and later tries run longer."""
    probe = Unknown(rank)
    _steps_of_10_ms(probe, rank, world, group, os.path.join(out, "deadline_run"), 700)
    with open(os.path.join(out, f"deadline-{rank}.json"), "w") as f:
        json.dump({"tries": probe.tries}, f)


def ntk_deadline_run(rank: int, world: int, group: object, out: str) -> None:
    """The NTK probe's first measurement (at step 0, a deadline FIRST_SECONDS after its start),
    stopped by rank 1's clock alone: its first chunk's factors take 1.5 s, while rank 0's part
    takes milliseconds. Every rank stops (rank 0 where the rows are gathered), none hangs, and
    the Lens records one stopped first measurement and no kernel."""
    import time

    import dynlens.measures.ntk as ntk_module

    slow = [rank == 1]
    original = ntk_module._factors

    def late(*args: Any, **kwargs: Any) -> Any:
        if slow[0]:
            slow[0] = False
            time.sleep(1.5)
        return original(*args, **kwargs)

    ntk_module._factors = late
    try:
        lens = _steps_of_10_ms(dl.probes.NTK(every=5, n=M), rank, world, group,
                               os.path.join(out, "ntk_deadline_run"), 20)
    finally:
        ntk_module._factors = original
    cost = lens.budget.cost("ntk")
    with open(os.path.join(out, f"ntk-deadline-{rank}.json"), "w") as f:
        json.dump({"measurements": cost.measurements, "seconds": cost.seconds, "slowed": not slow[0] and rank == 1,
                   "disabled": lens.disabled}, f)


def _main(rank: int, world: int, out: str, scenarios: list[str]) -> int:
    """Run the scenarios on this rank: 0 when all ran, 1 when one raised (its traceback is in
    ``error-<rank>.txt``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        group = dist.group.WORLD
        for scenario in scenarios:
            {"measurements": measurements, "lens": lens_run, "fsdp": fsdp_run,
             "quiet": quiet_run, "deadline": deadline_run, "memory_wait": memory_wait_run,
             "ntk_deadline": ntk_deadline_run}[scenario](rank, world, group, out)
    except BaseException:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        return 1
    finally:
        dist.destroy_process_group()
    return 0


def launch(out: str, scenarios: str = "measurements,lens,fsdp", world: int = 2, timeout: float = 150.0) -> list[int]:
    """Run the ranks as processes and wait for them, at most ``timeout`` seconds (then they are
    killed and a TimeoutError says so): their exit codes."""
    import signal
    import subprocess
    import time

    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), out, str(r), str(world), scenarios],
                              env=env, start_new_session=True) for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as err:
        raise TimeoutError(f"the ranks did not finish within {timeout} s (a hang)") from err
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [proc.returncode for proc in procs]


if __name__ == "__main__":
    code = _main(int(sys.argv[2]), int(sys.argv[3]), os.path.abspath(sys.argv[1]), sys.argv[4].split(","))
    # Leave without the interpreter's finalisation: Gloo's worker threads can outlive the
    # destroyed process group and abort the process as Python tears down (SIGABRT, "terminate
    # called without an active exception", once on CI after every scenario had passed). The
    # scenarios' results are already written and closed; the exit code still says if one failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
