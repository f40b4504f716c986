"""The Lens: attaches probes to a training loop, runs the due ones, writes what they measure.

    lens = dl.Lens(model, loss_fn, probe_batch=(x, y), optimizer=opt, run_dir="runs/exp1")
    for x, y in loader:
        ...; loss.backward(); opt.step()
        lens.step(loss=loss)
    lens.close()

Step counting: the Lens measures the initial state as step 0 when it is created; the n-th call
of ``step()`` records step n (n optimizer steps taken). Every probe measures at step 0, at the
steps its schedule names, and at ``close()`` (if it has not measured at that step already).

Isolation: each probe runs inside :func:`dynlens.functional.isolated` (mode, RNG, attention
kernel restored); for probes that are not ``pure`` the Lens also hides ``.grad`` (each
parameter's gradient is set aside and put back, so a probe's own ``backward()`` writes into fresh
tensors that are dropped) and restores every buffer.

Failures: anything a probe raises is caught; its traceback is stored as an "error" event and
training goes on. A probe that fails ``max_failures`` times in a row is switched off with a
"warning" event. An out-of-memory error is not a failure of the probe: the memory is released,
the measurement is tried once more with half the memory allowance, and if that runs out too it
is deferred with a "warning" event.

Cost (:mod:`dynlens.budget`): ``lens.step()`` never waits for the GPU. A loss passed as a device
tensor stays on the device; batches of losses reach the host through asynchronous copies, and
are written to the run when they have arrived (at the latest when probes next run, and at
``close()``). The Lens synchronises the device only around measurements, times them, defers
those that would break the time budget (``budget=``, 5% of wall time by default) and tells each
measurement how much device memory it may take (``memory_budget=``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynlens import __version__
from dynlens.budget import (
    DEFAULT_BUDGET,
    FIRST_SECONDS,
    MemoryBudget,
    MemoryBudgetTooSmall,
    OverBudget,
    TimeBudget,
)
from dynlens.distributed import (
    FAILED,
    OUT_OF_MEMORY,
    OVER_TIME,
    WAITS_FOR_MEMORY,
    NullWriter,
    agree_min,
    agree_plan,
    agreed_status,
    decide,
    failure_report,
    group_of,
    is_sharded,
    lockstep,
    rank,
)
from dynlens.functional import (
    ModelFunction,
    OutOfMemoryError,
    _synchronize,
    batch_size,
    call_model,
    check_loss,
    is_out_of_memory,
    isolated,
    model_device,
    slice_examples,
    split_batch,
    to_device,
    unwrap_model,
)
from dynlens.parameters import layer_of
from dynlens.probes.base import LENS, TRAINING, Context, Labelled, Probe
from dynlens.store import RunWriter, costs_frame

__all__ = ["Lens"]


def _model_summary(model: nn.Module) -> dict[str, Any]:
    params = [(n, p) for n, p in model.named_parameters()]
    return {
        "class": type(model).__name__,
        "parameters": int(sum(p.numel() for _, p in params)),
        "trainable_parameters": int(sum(p.numel() for _, p in params if p.requires_grad)),
        "tensors": [
            {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
             "trainable": p.requires_grad}
            for n, p in params
        ],
        "buffers": int(sum(b.numel() for b in model.buffers())),
        "device": str(model_device(model)),
        "text": str(model),
    }


def _optimizer_summary(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    return {
        "class": type(optimizer).__name__,
        "defaults": {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, bool, str, tuple, type(None)))},
        "param_groups": len(optimizer.param_groups),
    }


def _checked_loss(loss: Any) -> Tensor | float | None:
    """The step's loss as given (a detached tensor stays where it is), or a clear error."""
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"lens.step(loss=...) got a tensor of shape {tuple(loss.shape)}; pass the scalar "
                "mean loss of the step (or nothing)"
            )
        return loss.detach()
    return float(loss)


class _DeviceScalars:
    """Per-step scalars that are device tensors, brought to the host without waiting for the GPU.

    ``add`` keeps the tensor (a 0-dim tensor the step computed anyway); every ``batch`` values are
    stacked on the device and copied to pinned host memory asynchronously, with a CUDA event
    recorded behind the copy. ``collect`` writes the batches whose copies have finished to the
    step log (``block=True`` waits for all of them: probes are about to synchronise anyway, or
    the run is closing). CPU tensors are written at once.
    """

    def __init__(self, writer: RunWriter, batch: int = 64) -> None:
        self.writer = writer
        self.batch = batch
        self.pending: list[tuple[int, str, str, Tensor]] = []
        self.in_flight: list[tuple[list[tuple[int, str, str]], Tensor, Any]] = []

    def add(self, step: int, probe: str, name: str, value: Tensor) -> None:
        if value.device.type != "cuda":
            self.writer.step_scalar(step, probe, name, float(value))
            return
        self.pending.append((step, probe, name, value))
        if len(self.pending) >= self.batch:
            self._launch()
        if self.in_flight:
            self.collect(block=False)

    def _launch(self) -> None:
        keys = [(step, probe, name) for step, probe, name, _ in self.pending]
        values = torch.stack([v.reshape(()).to(torch.float64) for *_, v in self.pending])
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.in_flight.append((keys, host, event))
        self.pending = []

    def collect(self, block: bool) -> None:
        """Write the batches whose copies have arrived (all of them with ``block``)."""
        if block and self.pending:
            self._launch()
        while self.in_flight:
            keys, host, event = self.in_flight[0]
            if block:
                event.synchronize()
            elif not event.query():
                return
            for (step, probe, name), value in zip(keys, host.tolist(), strict=True):
                self.writer.step_scalar(step, probe, name, value)
            self.in_flight.pop(0)


def _default_probes() -> list[Probe]:
    from dynlens import probes

    return probes.default()


def _basic_probes() -> list[Probe]:
    from dynlens import probes

    return probes.basic()


def _to_host(measurements: list[Any]) -> None:
    """Replace the floating-point device tensors in each measurement's dict by float64 NumPy
    values (0-dim ones by floats), all copied to the host in one transfer: one wait for the
    device per step, however many probes and values."""
    found = [(values, name, value) for values in measurements if isinstance(values, dict)
             for name, value in values.items()
             if isinstance(value, Tensor) and value.device.type != "cpu" and value.is_floating_point()]
    for device in {value.device for _, _, value in found}:
        on_device = [item for item in found if item[2].device == device]
        host = torch.cat([v.detach().reshape(-1).to(torch.float64) for _, _, v in on_device]).cpu().numpy()
        offset = 0
        for values, name, value in on_device:
            part = host[offset:offset + value.numel()].reshape(value.shape)
            offset += value.numel()
            values[name] = float(part) if value.dim() == 0 else part


class _Unfinished:
    """A measurement that produced no values, and why (its message; the exception is dropped
    so that its frames' tensors can be freed). The subclass says which way it ended."""

    def __init__(self, message: str) -> None:
        self.message = message


class _TooLittleMemory(_Unfinished):
    """A measurement that declined to start: its memory allowance could not hold it."""


class _OverTime(_Unfinished):
    """A measurement stopped at its deadline (:class:`dynlens.budget.OverBudget`)."""


class _OutOfMemory(_Unfinished):
    """A measurement that ran out of device memory."""


_IDLE = object()  # Lens._held_before when the probes have not worked this step

# the furthest ahead _steps_until_due looks: a schedule is a predicate on steps, not a list
_DUE_SCAN = 1000


def _steps_until_due(probe: Probe, step: int) -> int:
    """Steps from ``step`` to the next at which ``probe`` is due (at most ``_DUE_SCAN``)."""
    for ahead in range(1, _DUE_SCAN):
        if probe.due(step + ahead):
            return ahead
    return _DUE_SCAN


class _RankFailure(RuntimeError):
    """A measurement that failed on some rank under torch.distributed: that rank's error message
    and its traceback (``trace``), the same on every rank."""

    def __init__(self, message: str, trace: str) -> None:
        super().__init__(message)
        self.trace = trace


def _release_memory(device: torch.device) -> None:
    """Give the memory of a failed measurement back: collect its tensors' cycles, and on a GPU
    return the cached blocks to the device so that a retry can use them."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _free_memory(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class Lens:
    """Watches one training run: counts steps, runs probes, writes the run database.

    Args:
        model: the ``nn.Module`` being trained. A ``torch.compile``, ``DataParallel`` or
            ``DistributedDataParallel`` wrapper is measured through the module it wraps (the same
            parameters, named without the wrapper's prefix); probes run it eagerly, since compiled
            code has no second derivatives, and training keeps its compiled code.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss (e.g. ``nn.CrossEntropyLoss()``).
        probe_batch: the fixed ``(inputs, targets)`` the probes measure on; held for the whole run
            so that measurements are comparable over time. Moved to the model's device.
        optimizer: the training optimizer (learning rate and the stability thresholds come from it).
        run_dir: where the run database goes (default ``runs/<date-time>``).
        probes: a list of probes, ``"default"`` for every built-in probe, or None for the basic
            ones only. The basic probes (gradient norm, parameter norm, update size, distance from
            initialisation) are always added unless ``basic=False`` or a probe of the same name is
            given.
        name: the run's name in reports.
        config: your hyperparameters, shown in the report (JSON-friendly values).
        basic: add the basic probes.
        seed: seed of dropout in ``mode="train"`` measurements.
        group: the ``torch.distributed`` process group whose ranks each hold a shard of the probe
            batch (default: a ``DistributedDataParallel`` model's own group, else None). Every
            rank creates its Lens and calls ``step()`` alike; every measurement is then the
            whole batch's (:mod:`dynlens.distributed`), rank 0 alone writes the run (the others
            get a writer that writes nothing), the time budget is rank 0's (the ranks run the
            same probes at the same steps), the memory budget is each rank's (the smallest
            allowance is used), and a probe that fails on one rank fails on all, recorded by
            rank 0 with the failing rank's error. Initialise the process group with a
            ``timeout``: it bounds the wait should a rank die inside a collective. Pass each
            rank its own shard of the probe batch: the same batch on every rank is measured as
            that many copies of it (means unchanged, but m-coherence, counts and kernels over
            the duplicated examples).
        overwrite: replace a run already in ``run_dir``.
        max_failures: consecutive failures after which a probe is switched off.
        budget: what dynlens may add to training's wall time, as a fraction of it (default
            0.05: the run takes at most 5% longer): all probes together and the Lens's own work
            in ``step()``. A due measurement that would break
            it waits (schedules then mean "at most this often"; the longest-waiting probe goes
            first). The measurements at step 0 always
            run, and are paid back by later deferrals. The basic probes are never deferred.
            None: every probe exactly on schedule. See :mod:`dynlens.budget`.
        memory_budget: device memory the probes may add to the training's own peak: bytes, a
            fraction of the device's memory, or None (automatic: half the training's peak on a
            GPU, no limit on the CPU). Measurements split their work to fit it (Hessian-vector
            products over sub-batches, per-example gradients in chunks).
        tensorboard_dir: also write every scalar and array to TensorBoard event files in this
            directory as they are recorded (tags ``probe/name``, arrays as histograms; needs
            ``pip install dynlens[tensorboard]``). A TensorBoard error becomes an event of the
            run and stops only the TensorBoard output. See :mod:`dynlens.integrations.tensorboard`.

    Raises:
        ValueError / TypeError: the model, loss or probe batch cannot be measured (the message
            says what was wrong and what to pass instead).
        dynlens.store.RunError: ``run_dir`` cannot be written, or holds a run already.
        dynlens.store.RunInUseError: another open Lens holds ``run_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        probe_batch: Any,
        optimizer: torch.optim.Optimizer | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        probes: Sequence[Probe] | str | None = None,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        basic: bool = True,
        seed: int = 0,
        group: Any = None,
        overwrite: bool = False,
        max_failures: int = 3,
        budget: float | None = DEFAULT_BUDGET,
        memory_budget: float | int | None = None,
        tensorboard_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.budget = TimeBudget(budget)
        self.group = group if group is not None else group_of(model)
        model = unwrap_model(model)  # measure the module inside a torch.compile or DDP wrapper
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.seed = seed
        self.max_failures = max_failures
        self.probe_batch = to_device(probe_batch, model_device(model))
        probe_batch_size = self._check_probe_batch()
        self.probes = self._resolve_probes(probes, basic)

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.memory = MemoryBudget(sum(p.numel() * p.element_size() for _, p in trainable),
                                   model_device(model), memory_budget)
        self.layers: list[str] = list(dict.fromkeys(layer_of(n) for n, _ in trainable))
        self.layer_index = [self.layers.index(layer_of(n)) for n, _ in trainable]

        if run_dir is None:
            run_dir = os.path.join("runs", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        if tensorboard_dir is not None:  # a missing tensorboard package raises before the run exists
            from dynlens.integrations.tensorboard import TensorBoardTee, require_tensorboard
            require_tensorboard()
        self.writer = RunWriter(run_dir, overwrite=overwrite) if rank(self.group) == 0 else NullWriter(run_dir)
        if tensorboard_dir is not None and not isinstance(self.writer, NullWriter):  # rank 0's alone
            self.writer = TensorBoardTee(self.writer, tensorboard_dir)
        self.run_dir = str(self.writer.path)
        self.name = name or os.path.basename(os.path.normpath(self.run_dir))
        self.writer.set_meta({
            "name": self.name,
            "config": config or {},
            "model": _model_summary(model),
            "optimizer": _optimizer_summary(optimizer),
            "loss_fn": repr(loss_fn),
            "probe_batch_size": probe_batch_size,
            "layers": self.layers,
            "probes": [{"name": p.name, **p.describe()} for p in self.probes],
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "dynlens": __version__,
                "numpy": np.__version__,
            },
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "argv": list(sys.argv),
            "status": "running",
            "budget": budget,
            "memory_budget": memory_budget,
        })
        self.step_count = 0
        self.closed = False
        self._failures = {p.name: 0 for p in self.probes}
        self._preparing = [p for p in self.probes if type(p).prepare is not Probe.prepare]
        self._disabled: set[str] = set()
        self._last_measured = {p.name: -1 for p in self.probes}
        # probe -> the step it fell due, while it waits: every probe at step 0
        self._waiting: dict[str, int] = {p.name: 0 for p in self.probes}
        self._memory_wait: dict[str, int] = {}  # probe -> the allowance (bytes) it did not fit
        self._stopped: set[str] = set()  # probes whose first measurement was stopped at its deadline
        self._memory_wait_peak: dict[str, int] = {}  # probe -> training's peak when it did not fit
        self._device_scalars = _DeviceScalars(self.writer)
        self._held_before: Any = _IDLE  # device memory in use when the probes began this step
        self._waited = 0.0  # seconds this call waited for training's queued device work
        self._worked = False  # whether this call of step() ran a probe's measure or prepare
        self._step_started: float | None = None  # the clock when step() was last called
        self._step_seconds = 0.0  # the wall time between the last two calls of step()
        self._step_ends: list[Any] = []  # CUDA events at the end of the last two calls of step()
        # before this clock reading no waiting probe can fit the time budget (see _run_due):
        # step() then skips the scan of the waiting probes, its main cost on a host
        self._resume_at = -math.inf
        self._resume_step = 0  # under torch.distributed: the same on every rank (rank 0's)
        self._memory_checked: tuple[int, int | None] | None = None  # (step, allowance) last read
        self._shared: dict[str, Any] = {}  # Context.shared: what probes publish for one another
        self.memory.note_probe_end()  # the probe-batch check above is the Lens's, not training's
        before = self.memory.in_use()
        ctx = self._context()
        for probe in self.probes:
            self._guarded(probe, "setup", lambda p=probe: p.setup(ctx))
        self._run_due(ctx, initial=True)
        self._prepare_next(ctx)
        self._write_notes()
        self.memory.retain(before)
        self.writer.commit()
        # the Lens's creation outside the step-0 measurements (setup, the first writes)
        self.budget.overhead(self.budget.elapsed() - self.budget.probe_seconds - self._waited)

    # ------------------------------------------------------------------ construction helpers

    def _check_probe_batch(self) -> int:
        """Evaluate the loss on the probe batch's first two examples (the whole batch if that
        fails, for the error to be the batch's own), turning failures into clear errors; return
        the probe batch's number of examples. Two examples: a whole batch's activations would
        raise the process's peak memory above what training needs before any training step, and
        the Lens reads training's peak from that counter (:class:`dynlens.budget.MemoryBudget`)."""
        if is_sharded(self.model):  # FSDP2: only its own forward gathers its parameters
            with isolated(self.model, "eval", self.seed), torch.no_grad():
                inputs, targets = split_batch(self.probe_batch)
                check_loss(self.loss_fn(call_model(self.model, inputs), targets))
            return batch_size(inputs)
        whole = ModelFunction(self.model, self.loss_fn, self.probe_batch)
        inputs, targets = split_batch(self.probe_batch)
        if isinstance(targets, Tensor) and targets.dim() > 0 and targets.shape[0] != whole.size:
            raise ValueError(
                f"probe_batch does not fit the loss: its inputs hold {whole.size} examples and its "
                f"targets {targets.shape[0]}; pass probe_batch=(inputs, targets) with one target per "
                "example along the first dimension")
        pair = (slice_examples(inputs, 0, 2), slice_examples(targets, 0, 2))
        try:
            self._evaluate(ModelFunction(self.model, self.loss_fn, pair))
        except ValueError:
            self._evaluate(whole)
        return whole.size

    def _evaluate(self, fn: ModelFunction) -> None:
        with isolated(self.model, "eval", self.seed), torch.no_grad():
            try:
                outputs = fn.outputs()
            except Exception as err:  # noqa: BLE001 - any model error means the batch does not fit
                raise ValueError(
                    f"probe_batch does not fit the model: calling {type(self.model).__name__} on its "
                    f"inputs raised {type(err).__name__}: {err}. Pass probe_batch=(inputs, targets) "
                    "with inputs the model accepts (a Tensor for model(x), a tuple for model(*x), "
                    "a dict for model(**x))"
                ) from err
            try:
                value = self.loss_fn(outputs, fn.targets)
            except Exception as err:  # noqa: BLE001
                raise ValueError(
                    f"probe_batch does not fit the loss: loss_fn(outputs, targets) raised "
                    f"{type(err).__name__}: {err}. Check the targets in probe_batch=(inputs, targets)"
                ) from err
            check_loss(value)

    def _resolve_probes(self, probes: Sequence[Probe] | str | None, basic: bool) -> list[Probe]:
        if isinstance(probes, str):
            if probes != "default":
                raise ValueError(f"probes= takes a list of probes, 'default' or None; got {probes!r}")
            chosen: list[Probe] = _default_probes()
        elif probes is None:
            chosen = []
        else:
            chosen = list(probes)
        for p in chosen:
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be dl.Probe instances, got {type(p).__name__}: {p!r}")
        if basic:
            names = {p.name for p in chosen}
            chosen = [p for p in _basic_probes() if p.name not in names] + chosen
        names = [p.name for p in chosen]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two probes share the name(s) {duplicates}; give each probe its own name")
        return chosen

    # ------------------------------------------------------------------ the step

    def _context(self) -> Context:
        """The context of the current step; its ``loss`` is set when a timed probe runs
        (reading a GPU loss waits for the device)."""
        return Context(
            model=self.model, loss_fn=self.loss_fn, probe_batch=self.probe_batch,
            optimizer=self.optimizer, step=self.step_count, seed=self.seed,
            layers=self.layers, layer_index=self.layer_index, group=self.group, shared=self._shared,
            clock=self.budget.clock,
        )

    def step(self, loss: Tensor | float | None = None) -> None:
        """Record one optimizer step: loss and learning rate, then the probes that are due.

        Call it after ``optimizer.step()``. Never raises for a probe's failure and never waits for
        the GPU unless a probe runs: a loss on the GPU reaches the run database once its
        asynchronous copy has arrived (at the latest when probes next run or at ``close()``);
        everything else recorded is on disk before it returns.
        """
        if self.closed:
            raise RuntimeError("lens.step() after lens.close(); create a new Lens for a new run")
        start, measured = self.budget.clock(), self.budget.probe_seconds
        ahead = self._host_ahead()
        self._worked = False
        if self._step_started is not None:
            self._step_seconds = start - self._step_started  # one step of training and the Lens
        self._step_started = start
        self._waited = 0.0
        value = _checked_loss(loss)
        self.step_count += 1
        step = self.step_count
        if isinstance(value, Tensor):
            queued = self.budget.clock()
            self._device_scalars.add(step, TRAINING, "loss", value)
            # its copies queue behind training's kernels: a host that runs ahead of the GPU
            # blocks here on a full launch queue, which is training's time, not the Lens's
            self._waited += self.budget.clock() - queued
        elif value is not None:
            self.writer.step_scalar(step, TRAINING, "loss", value)
        if self.optimizer is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                lr = group.get("lr")
                if isinstance(lr, Tensor):
                    lr = lr.item()
                if lr is not None:
                    self.writer.step_scalar(step, TRAINING, "lr" if i == 0 else f"lr/{i}", float(lr))
        urgent = False  # a probe the budget never defers fell due
        for probe in self.probes:
            if probe.name not in self._disabled and probe.name not in self._waiting and probe.due(step):
                self._waiting[probe.name] = step
                urgent = urgent or self._exempt(probe)
        if self._waiting and (urgent or (start >= self._resume_at and step >= self._resume_step)):
            self._run_due(self._context(), loss=value)
        self._prepare_next()
        if self._held_before is not _IDLE:
            self.memory.retain(self._held_before)  # what the probes kept since they began
            self._held_before = _IDLE
        self.writer.commit()
        # the Lens's own time: this call less its measurements and the wait for training's queued
        # work; none at all when the host was at least a step ahead of the GPU at the call's
        # start, the device still had training's work queued at its end, and the call gave it no
        # work of its own: the wall time is then the GPU's. A host-bound job (the GPU finishes
        # each step before the host has launched the next: two ranks of a 124M decoder under
        # DDP on H200s, 33-35 ms of host time a step) pays the Lens's host time in full
        own = self.budget.clock() - start - self._waited - (self.budget.probe_seconds - measured)
        if ahead and not self._worked and self._device_busy():
            own = 0.0
        self._mark_step_end()
        self.budget.overhead(own)

    def _host_ahead(self) -> bool:
        """Whether the host is at least one step ahead of the model's device: the work queued by
        the end of the previous call of :meth:`step` has not finished (a CUDA event query, which
        does not wait). False off CUDA and at the first step."""
        return bool(self._step_ends) and not self._step_ends[-1].query()

    def _mark_step_end(self) -> None:
        """Record a CUDA event behind the work queued so far (two events, used in turn)."""
        device = self.model_device
        if device.type != "cuda":
            return
        if len(self._step_ends) < 2:
            self._step_ends.append(torch.cuda.Event())
        else:
            self._step_ends.reverse()  # the older one is recorded again
        self._step_ends[-1].record(torch.cuda.current_stream(device))

    def _device_busy(self) -> bool:
        """Whether the model's device still has queued work on the current stream (a CUDA
        stream query, which does not wait); False off CUDA, where the host does the work."""
        device = self.model_device
        return device.type == "cuda" and not torch.cuda.current_stream(device).query()

    def _prepare_next(self, ctx: Context | None = None) -> None:
        nxt = self.step_count + 1
        for probe in self._preparing:  # those with something to prepare
            if probe.name in self._disabled:
                continue
            if (probe.due(nxt) or probe.name in self._waiting) and self._may_run_next(probe, nxt):
                self._worked = True
                self._probes_begin()
                ctx = ctx or self._context()
                self._guarded(probe, "prepare", lambda p=probe, c=ctx: p.prepare(c))

    def _may_run_next(self, probe: Probe, nxt: int) -> bool:
        """Whether a due or waiting probe could run at step ``nxt``: the time budget would let
        it through one step from now (or it never waits for the budget), and, if it waits for
        memory, its schedule brings a retry. Its ``prepare`` runs only then: a prepare is
        entered through the probe's isolation (1–2 ms of host time) and may copy the
        parameters, and a probe deferred by the budget waits for hundreds of steps — on a GPU
        job of 12 ms steps, preparing at each of them took 22% of the training's time."""
        if probe.name in self._memory_wait and not probe.due(nxt):
            return False
        if self._exempt(probe):
            return True
        if nxt < self._resume_step or self.budget.clock() + self._step_seconds < self._resume_at:
            return False  # the budget has no room for any waiting probe by then
        return self.budget.fits(probe.name, probe.predicted_seconds, ahead=self._step_seconds)

    def _write_notes(self) -> None:
        """Write the probes' notes (:meth:`dynlens.Probe.note`) to the metadata when one changed."""
        if any(getattr(p, "_notes_changed", False) for p in self.probes):
            self.writer.set_meta({"notes": {p.name: p.notes for p in self.probes if getattr(p, "notes", None)}})
            for p in self.probes:
                p._notes_changed = False

    def _probes_begin(self) -> None:
        """Note the device memory in use before the probes' first work of this step (read only at
        steps where they work: an allocator read costs host time), for ``step()`` to count what
        they kept (:meth:`dynlens.budget.MemoryBudget.retain`)."""
        if self._held_before is _IDLE:
            self._held_before = self.memory.in_use()

    def _exempt(self, probe: Probe) -> bool:
        """Probes that never wait for the budget: the basic ones (a few passes over the
        parameters, untimed, never running the model)."""
        return not probe.timed or not probe.isolate

    def _run_due(self, ctx: Context, initial: bool = False, loss: Tensor | float | None = None) -> None:
        """Run the waiting probes that the budget allows, the longest-waiting first."""
        order = {p.name: i for i, p in enumerate(self.probes)}
        runnable = []
        blocked = False  # the longest-waiting probe that does not fit holds back those behind it
        for_memory = []  # those waiting for memory, with nothing changed since they could not fit
        for name in sorted(self._waiting, key=lambda n: (self._waiting[n], order[n])):
            probe = self.probes[order[name]]
            if name in self._disabled:
                del self._waiting[name]
            elif name in self._memory_wait and not (probe.due(ctx.step) or self._more_memory(name)):
                # nothing has changed since it could not fit: no sync, no retry before its
                # schedule comes round again or training shows a higher peak
                for_memory.append(probe)
                continue
            elif initial or self._exempt(probe) or (not blocked and self.budget.fits(name, probe.predicted_seconds)):
                runnable.append(probe)
            else:
                # were cheaper probes behind it let through, they would spend the budget as fast
                # as it accrues and a costly probe would never run
                if not blocked:
                    # nothing can run before the budget has room for this one (under
                    # torch.distributed rank 0's estimate, in steps, goes to every rank below)
                    self._resume_at = self.budget.clock() + self.budget.time_to_fit(
                        self.budget.predicted(name, probe.predicted_seconds))
                blocked = True
                if self._waiting[name] == ctx.step:
                    self.budget.defer(name)  # counted once, when it first has to wait
        if self.group is not None and any(not self._exempt(self.probes[order[n]]) for n in self._waiting):
            # under torch.distributed every rank runs what rank 0's budget lets through
            # and, when nothing runs, the steps until something can: no rank scans (nor meets
            # the others in a collective) before then
            quiet = 0 if runnable else self._quiet_steps(ctx.step, blocked, for_memory)
            meeting = self.budget.clock()
            chosen, quiet = agree_plan(self.group, [p in runnable for p in self.probes], quiet)
            # waiting there for a slower rank is data parallelism's time, not the Lens's
            self._waited += self.budget.clock() - meeting
            self._resume_step = ctx.step + quiet
            self._resume_at = -math.inf
            runnable = sorted((p for p, run in zip(self.probes, chosen, strict=True) if run),
                              key=lambda p: (self._waiting.get(p.name, ctx.step), order[p.name]))
        if not runnable:
            return
        self._worked = True
        self._probes_begin()
        timed = any(not self._exempt(p) for p in runnable)
        if timed:
            waiting = self.budget.clock()
            _synchronize(self.model_device)  # measurements are timed alone; the losses have landed
            self._waited += self.budget.clock() - waiting  # training's time, not the Lens's
            if loss is not None:
                ctx.loss = float(loss)
        self._device_scalars.collect(block=timed)
        records: list[tuple[Probe, Any, float]] = []
        blocked = False
        for probe in runnable:
            if self._exempt(probe) or initial or (not blocked and decide(
                    self.group, self.budget.fits(probe.name, probe.predicted_seconds))):
                self._waiting.pop(probe.name, None)
                self._measure(probe, ctx, records, initial)
            else:
                blocked = True
        copying = self.budget.clock()
        _to_host([values for _, values, _ in records])  # waits for training's queued work too
        self._waited += self.budget.clock() - copying
        for probe, values, seconds in records:
            if self._record(ctx.step, probe, values, seconds):
                self._failures[probe.name] = 0
        if records:
            self.writer.set_meta({"costs": self._cost_record()})
        self._write_notes()

    def _quiet_steps(self, step: int, blocked: bool, for_memory: list[Probe]) -> int:
        """Under torch.distributed, when nothing waiting can run at ``step``: the steps before any
        could, during which no rank scans the waiting probes or meets the others (each meeting is
        a broadcast and a wait for the device). While the time budget holds the longest-waiting
        probe back, until it has room (rank 0's estimate in steps; the probes behind it wait in
        any case); for probes waiting for memory (``for_memory``), until the next step at which
        one of them, or a probe not yet waiting, falls due — a higher peak of training's, which
        may let one fit, is then noticed at that meeting. Without this, a probe that never fits
        (the NTK of the 124M decoder) made every rank meet at every step (a gloo test: 452
        meetings in 450 steps, 11 now). A 4,000-step run on two H200s with 163 meetings was no
        faster than one before the change: they were not what made it 10–16% slower."""
        limits = []
        if blocked:
            if self._step_seconds <= 0 or self._resume_at <= self.budget.clock():
                return 0
            limits.append(int((self._resume_at - self.budget.clock()) / self._step_seconds))
        elif for_memory:
            limits += [_steps_until_due(p, step) for p in self.probes
                       if not self._exempt(p) and p.name not in self._disabled and p.name not in self._waiting]
        limits += [_steps_until_due(p, step) for p in for_memory]
        return min(limits) if limits else 0

    def _measure(self, probe: Probe, ctx: Context, records: list[tuple[Probe, Any, float]],
                 initial: bool = False) -> None:
        """Take one measurement of ``probe`` (timed, memory-bounded, OOM-guarded) and append
        ``(probe, values, seconds)`` to ``records`` if it produced values. The basic probes
        (:meth:`_exempt`) are neither synchronised nor timed: their cost is part of
        ``lens.step()``'s own, measured in benchmarks/RESULTS.md.

        Until one of its measurements has finished a probe has no cost to predict from (one
        Hessian measurement of the 124M decoder under DDP took 47–87 s, the whole share of a
        2,000-step run): it gets a deadline at the end of the time allowance
        (:attr:`Context.deadline`; at step 0, ``FIRST_SECONDS`` at least), and one stopped
        there (:class:`OverBudget`) waits until the budget allows twice the time it ran."""
        if probe.name in self._disabled or self._last_measured[probe.name] == ctx.step:
            return
        self._last_measured[probe.name] = ctx.step
        if self._exempt(probe):
            values = self._guarded(probe, "measure", lambda p=probe: p.measure(ctx))
            self.budget.charge(probe.name, 0.0)
            if values is not None:
                records.append((probe, values, 0.0))
            return
        in_use = self.memory.note_probe_start()
        peak_before = self.memory.peak()
        ctx.allowance = self.budget.allowance()
        ctx.memory = agree_min(self.group, self.memory.allowance())
        clock = self.budget.clock
        start = clock()
        # until one has finished, a probe's measurements run to a deadline
        unknown = self.budget.share is not None and self.budget.cost(probe.name).measurements == 0
        # at step 0 nothing has accrued: the deadline is then FIRST_SECONDS at least
        ctx.deadline = (start + max(ctx.allowance, FIRST_SECONDS if initial else 0.0)) if unknown else math.inf
        values = self._guarded(probe, "measure", lambda p=probe: p.measure(ctx))
        ctx.deadline = math.inf
        if isinstance(values, _OverTime):
            # nothing was kept; it waits until the budget allows twice the time it ran
            seconds = clock() - start
            self._last_measured[probe.name] = -1
            self._waiting.setdefault(probe.name, ctx.step)
            self.budget.stopped(probe.name, seconds)
            if probe.name not in self._stopped:  # the doubling tries that follow are not reported
                self._stopped.add(probe.name)
                self.writer.event(
                    ctx.step, "info", probe.name,
                    f"{probe.name}'s first measurement was stopped at step {ctx.step} after "
                    f"{seconds:.3g} s, the time the budget allowed ({values.message}); its cost is "
                    "not known before one has finished, so it tries again when the budget allows "
                    "twice as long")
            return
        if isinstance(values, _OutOfMemory):
            values = self._retry_smaller(probe, ctx, values)
        elif isinstance(values, _TooLittleMemory):
            # nothing was computed: it waits until training's own peak leaves it more room
            self._last_measured[probe.name] = -1
            self._waiting.setdefault(probe.name, ctx.step)
            if probe.name not in self._memory_wait:
                self.writer.event(ctx.step, "info", probe.name, values.message)
            self._memory_wait[probe.name] = ctx.memory or 0
            self._memory_wait_peak[probe.name] = self.memory.training_peak
            self.budget.defer(probe.name)
            self.budget.spend(probe.name, clock() - start)  # its planning took wall time too
            return
        self._memory_wait.pop(probe.name, None)
        _synchronize(self.model_device)
        seconds = clock() - start
        self.budget.charge(probe.name, seconds, self.memory.extra_peak(in_use, peak_before),
                           values.get("hvps") if isinstance(values, dict) else None)
        self.memory.note_probe_end()
        if values is not None:
            records.append((probe, values, seconds))

    def _more_memory(self, name: str) -> bool:
        """Whether a probe that could not fit its memory allowance now has more (a tenth more)
        to try with: training has since shown a higher peak of its own."""
        if self._memory_checked is None or self._memory_checked[0] != self.step_count:
            # the allocator read once a step, however many probes wait for memory
            self.memory.observe()
            self._memory_checked = (self.step_count, self.memory.allowance())
        if self.memory.cuda and self.memory.training_peak <= self._memory_wait_peak.get(name, -1):
            return False
        allowance = self._memory_checked[1]
        return allowance is None or allowance > 1.1 * self._memory_wait[name]

    def _retry_smaller(self, probe: Probe, ctx: Context, first: _OutOfMemory) -> Any:
        """After an out-of-memory error: release the memory, try once with half the allowance,
        then give up on this step with a warning event (not a failure of the probe)."""
        _release_memory(self.model_device)
        limit = ctx.memory if ctx.memory is not None else _free_memory(self.model_device)
        ctx.memory = None if limit is None else limit // 2
        values = self._guarded(probe, "measure", lambda p=probe: p.measure(ctx))
        if not isinstance(values, _OutOfMemory):
            return values
        _release_memory(self.model_device)
        self.writer.event(
            ctx.step, "warning", probe.name,
            f"{probe.name} ran out of device memory at step {ctx.step} ({first.message}), and again "
            f"with half the memory ({values.message}); the measurement was skipped and training "
            "went on. Pass a smaller probe batch or memory_budget= to give it less to hold")
        self.budget.defer(probe.name)
        return None

    def _guarded(self, probe: Probe, what: str, call: Callable[[], Any]) -> Any:
        """Run a probe's hook isolated; on failure record the error and maybe switch it off.
        An out-of-memory error of ``measure`` (:func:`dynlens.functional.is_out_of_memory`)
        comes back as an :class:`_OutOfMemory` (the exception and its frames are dropped here, so
        their tensors can be freed)."""
        if self.group is not None and what == "measure" and not self._exempt(probe):
            call = self._in_lockstep(call)
        try:
            if not probe.isolate:
                result = call()
            else:
                with isolated(self.model, probe.mode, self.seed):
                    result = call() if probe.pure else self._protected(call)
        except OverBudget as err:
            return _OverTime(str(err))
        except MemoryBudgetTooSmall as err:
            return _TooLittleMemory(f"{probe.name} waits for memory at step {self.step_count}: {err}"
                                    f"{self.memory.describe()}")
        except Exception as err:  # noqa: BLE001 - a probe must never stop training
            if what == "measure" and is_out_of_memory(err):
                return _OutOfMemory(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            self._fail(probe, what, err)
            return None
        return result

    def _protected(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` with ``.grad`` set aside and buffers restored afterwards."""
        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        for p in params:
            p.grad = None
        try:
            return call()
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    def _in_lockstep(self, call: Callable[[], Any]) -> Callable[[], Any]:
        """``call`` made to succeed or fail on every rank together (:func:`dynlens.distributed.lockstep`),
        its failure raised as the kind every rank agreed on, so that all take the same path:
        waiting for memory, a retry after running out of memory, or a failure whose message and
        traceback are those of the rank that raised (gathered for rank 0 to write)."""

        def run() -> Any:
            try:
                with lockstep(self.group):
                    return call()
            except Exception as err:
                code = agreed_status(err)
                if code == OVER_TIME and not isinstance(err, OverBudget):
                    raise OverBudget(str(err)) from err
                if code == WAITS_FOR_MEMORY and not isinstance(err, MemoryBudgetTooSmall):
                    raise MemoryBudgetTooSmall(str(err)) from err
                if code == OUT_OF_MEMORY and not isinstance(err, OutOfMemoryError):
                    raise OutOfMemoryError(str(err)) from err
                if code == FAILED:
                    message, trace = failure_report(self.group, err, traceback.format_exc())
                    raise _RankFailure(message, trace) from err
                raise

        return run

    def _fail(self, probe: Probe, what: str, err: BaseException) -> None:
        self._failures[probe.name] += 1
        self.writer.event(
            self.step_count, "error", probe.name,
            f"{probe.name}.{what} failed at step {self.step_count}: {type(err).__name__}: {err}",
            getattr(err, "trace", None) or traceback.format_exc(),
        )
        if self._failures[probe.name] >= self.max_failures:
            self._disabled.add(probe.name)
            message = (
                f"probe {probe.name!r} switched off after {self._failures[probe.name]} failures in "
                f"a row (last: {type(err).__name__}: {err})"
            )
            self.writer.event(self.step_count, "warning", probe.name, message)
            warnings.warn(f"dynlens: {message}", RuntimeWarning, stacklevel=4)

    def _record(self, step: int, probe: Probe, values: Any, seconds: float) -> bool:
        """Queue a measurement's values; False (and a failure) if they cannot be stored."""
        if not isinstance(values, dict):
            self._fail(probe, "measure", TypeError(
                f"measure() must return a dict of floats and arrays, got {type(values).__name__}"))
            return False
        try:
            for name, value in values.items():
                if isinstance(value, Labelled):
                    self.writer.array_labels(step, probe.name, str(name), value.labels)
                    value = value.values
                if isinstance(value, Tensor):
                    value = value.detach().cpu()
                    value = value.item() if value.dim() == 0 else value.double().numpy() if value.is_floating_point() else value.numpy()
                if isinstance(value, np.ndarray) and value.ndim == 0:
                    value = value.item()
                if isinstance(value, (bool, int, float, np.floating, np.integer)):
                    self.writer.scalar(step, probe.name, str(name), float(value))
                elif isinstance(value, np.ndarray):
                    self.writer.array(step, probe.name, str(name), value)
                elif isinstance(value, (list, tuple)):
                    self.writer.array(step, probe.name, str(name), np.asarray(value))
                else:
                    raise TypeError(f"value {name!r} is a {type(value).__name__}; return floats or arrays")
        except Exception as err:  # noqa: BLE001
            self._fail(probe, "measure", err)
            return False
        if probe.timed:
            self.writer.scalar(step, LENS, f"seconds/{probe.name}", seconds)
        return True

    # ------------------------------------------------------------------ costs

    @property
    def model_device(self) -> torch.device:
        """The device the model (and so every measurement) is on."""
        return self.memory.device

    def _cost_record(self) -> dict[str, Any]:
        return {**self.budget.record(), "memory_budget": self.memory.extra}

    def costs(self) -> Any:
        """What the probes have cost this run so far, a pandas DataFrame with one row per probe:
        ``measurements``, ``seconds`` (their wall time, the device synchronised around each),
        ``share`` (of the run's wall time since the Lens was created), ``deferred`` (due
        measurements the time budget postponed), ``peak_memory`` (bytes: the most a
        measurement's allocations reached beyond what was in use when it started, among those
        that raised the process's peak; NaN where none did, and on the CPU) and ``products`` (Hessian-vector products, where a probe reports them)."""
        return costs_frame(self._cost_record())

    # ------------------------------------------------------------------ closing

    @property
    def disabled(self) -> list[str]:
        """Names of the probes switched off after repeated failures."""
        return sorted(self._disabled)

    def close(self) -> None:
        """Measure every probe at the final step (if it has not already), mark the run finished
        and release the run directory. Safe to call twice."""
        self._finish(measure=True, status="finished")

    def _finish(self, measure: bool, status: str) -> None:
        if self.closed:
            return
        try:
            if measure:
                # the final state, for every probe the budget allows (and any still waiting)
                for probe in self.probes:
                    if self._last_measured[probe.name] != self.step_count:
                        self._waiting.setdefault(probe.name, self.step_count)
                self._run_due(self._context())
            self._device_scalars.collect(block=True)
            self.writer.set_meta({"costs": self._cost_record()})
            self.writer.set_meta({"status": status, "steps": self.step_count,
                                  "finished": _dt.datetime.now(_dt.timezone.utc).isoformat()})
            self.writer.commit()
        finally:
            self.closed = True
            self.writer.close()

    def __enter__(self) -> Lens:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # training raised or was interrupted: say why, and skip the final measurements (they
        # can be slow, and the state may be what went wrong); everything measured stays
        if not self.closed:
            self.writer.event(self.step_count, "error", None,
                              f"training stopped at step {self.step_count}: {exc_type.__name__}: {exc}")
        self._finish(measure=False, status="stopped")

    def __repr__(self) -> str:
        return f"Lens(run_dir={self.run_dir!r}, step={self.step_count}, probes={[p.name for p in self.probes]})"
