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
"warning" event.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynlens import __version__
from dynlens.functional import (
    ModelFunction,
    check_loss,
    isolated,
    model_device,
    to_device,
    unwrap_model,
)
from dynlens.probes.base import Context, Probe
from dynlens.store import RunWriter

__all__ = ["Lens"]


def _layer_of(param_name: str) -> str:
    """The module that owns a parameter: 'encoder.0.weight' -> 'encoder.0'; 'scale' -> 'scale'."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


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


def _as_float(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"lens.step(loss=...) got a tensor of shape {tuple(loss.shape)}; pass the scalar "
                "mean loss of the step (or nothing)"
            )
        return float(loss.detach().item())
    return float(loss)


def _default_probes() -> list[Probe]:
    from dynlens import probes

    return probes.default()


def _basic_probes() -> list[Probe]:
    from dynlens import probes

    return probes.basic()


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
        overwrite: replace a run already in ``run_dir``.
        max_failures: consecutive failures after which a probe is switched off.

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
        overwrite: bool = False,
        max_failures: int = 3,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
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
        self.layers: list[str] = list(dict.fromkeys(_layer_of(n) for n, _ in trainable))
        self.layer_index = [self.layers.index(_layer_of(n)) for n, _ in trainable]

        if run_dir is None:
            run_dir = os.path.join("runs", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.writer = RunWriter(run_dir, overwrite=overwrite)
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
        })
        self.step_count = 0
        self.closed = False
        self._failures = {p.name: 0 for p in self.probes}
        self._disabled: set[str] = set()
        self._last_measured = {p.name: -1 for p in self.probes}
        ctx = self._context(loss=None)
        for probe in self.probes:
            self._guarded(probe, "setup", lambda p=probe: p.setup(ctx))
        self._run_probes(self.probes, ctx)
        self._prepare_next(ctx)
        self.writer.commit()

    # ------------------------------------------------------------------ construction helpers

    def _check_probe_batch(self) -> int:
        """Evaluate the loss on the probe batch once, turning failures into clear errors; return
        the probe batch's number of examples."""
        fn = ModelFunction(self.model, self.loss_fn, self.probe_batch)
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
        return fn.size

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

    def _context(self, loss: float | None) -> Context:
        return Context(
            model=self.model, loss_fn=self.loss_fn, probe_batch=self.probe_batch,
            optimizer=self.optimizer, step=self.step_count, loss=loss, seed=self.seed,
            layers=self.layers, layer_index=self.layer_index,
        )

    def step(self, loss: Tensor | float | None = None) -> None:
        """Record one optimizer step: loss and learning rate, then the probes that are due.

        Call it after ``optimizer.step()``. Never raises for a probe's failure; everything it
        recorded is committed to disk before it returns.
        """
        if self.closed:
            raise RuntimeError("lens.step() after lens.close(); create a new Lens for a new run")
        value = _as_float(loss)
        self.step_count += 1
        step = self.step_count
        if value is not None:
            self.writer.step_scalar(step, "train", "loss", value)
        if self.optimizer is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                lr = group.get("lr")
                if isinstance(lr, Tensor):
                    lr = lr.item()
                if lr is not None:
                    self.writer.step_scalar(step, "train", "lr" if i == 0 else f"lr/{i}", float(lr))
        ctx = self._context(value)
        self._run_probes([p for p in self.probes if p.due(step)], ctx)
        self._prepare_next(ctx)
        self.writer.commit()

    def _prepare_next(self, ctx: Context) -> None:
        nxt = self.step_count + 1
        for probe in self.probes:
            if probe.name not in self._disabled and probe.due(nxt):
                self._guarded(probe, "prepare", lambda p=probe: p.prepare(ctx))

    def _run_probes(self, probes: Iterable[Probe], ctx: Context) -> None:
        for probe in probes:
            if probe.name in self._disabled or self._last_measured[probe.name] == ctx.step:
                continue
            self._last_measured[probe.name] = ctx.step
            start = time.perf_counter()
            values = self._guarded(probe, "measure", lambda p=probe: p.measure(ctx))
            if values is not None and self._record(ctx.step, probe, values, time.perf_counter() - start):
                self._failures[probe.name] = 0

    def _guarded(self, probe: Probe, what: str, call: Callable[[], Any]) -> Any:
        """Run a probe's hook isolated; on failure record the error and maybe switch it off."""
        try:
            if not probe.isolate:
                result = call()
            else:
                with isolated(self.model, probe.mode, self.seed):
                    result = call() if probe.pure else self._protected(call)
        except Exception as err:  # noqa: BLE001 - a probe must never stop training
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

    def _fail(self, probe: Probe, what: str, err: BaseException) -> None:
        self._failures[probe.name] += 1
        self.writer.event(
            self.step_count, "error", probe.name,
            f"{probe.name}.{what} failed at step {self.step_count}: {type(err).__name__}: {err}",
            traceback.format_exc(),
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
            self.writer.scalar(step, "lens", f"seconds/{probe.name}", seconds)
        return True

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
                self._run_probes(self.probes, self._context(None))
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
