"""Probes on a PyTorch Lightning run: :class:`DynlensCallback`.

    from dynlens.integrations.lightning import DynlensCallback

    callback = DynlensCallback(probe_batch=(x, y), loss_fn=F.cross_entropy, run_dir="runs/exp1",
                               probes="default", report=True)
    trainer = lightning.pytorch.Trainer(callbacks=[callback], ...)
    trainer.fit(module, loader)

The callback makes a :class:`dynlens.Lens` when training starts (on the ``LightningModule``, with
the trainer's optimizer), steps it once per optimizer step and closes it when training ends.
It needs the ``lightning`` package (``pip install dynlens[lightning]``); ``pytorch_lightning``
(the older name of the same package) is used where ``lightning`` is not installed. Importing
``dynlens`` never imports either.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dynlens.budget import DEFAULT_BUDGET
from dynlens.integrations._common import LensSettings, close_lens, data_parallel_group, stop_lens
from dynlens.lens import Lens
from dynlens.probes.base import Probe

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "dynlens.integrations.lightning needs PyTorch Lightning: pip install 'dynlens[lightning]' "
            "(or pip install lightning)"
        ) from err

__all__ = ["DynlensCallback"]


class DynlensCallback(pl.Callback):
    """A Lightning callback that attaches dynlens probes to ``trainer.fit``.

    The Lens is made at ``on_train_start`` on the ``LightningModule`` itself (the probes call it as
    ``module(inputs)``, so its ``forward`` must give the outputs ``loss_fn`` takes) with the
    trainer's first optimizer; it measures step 0 there. It steps once per optimizer step, not
    per batch: with ``accumulate_grad_batches=k`` one step per k batches (and the shorter last
    group of an epoch), so the run's steps are ``trainer.global_step``'s, counted from the start
    of this fit. Each step's loss is the mean of its batches' training losses (the ``loss`` that
    ``training_step`` returned). At ``on_train_end`` the Lens measures the final state and closes;
    with ``report=True`` the HTML report is written (its path in :attr:`report_path`). If training
    raises or is interrupted (Ctrl-C), the run records why and is closed without the final
    measurements.

    Data-parallel runs (``torch.distributed`` initialised, several processes, e.g. the DDP
    strategy): every rank makes a Lens over the default process group with its contiguous
    shard of ``probe_batch`` (pass the same whole batch on every rank), so each measurement is
    the whole probe batch's, computed across the ranks; rank 0 alone writes the run and the
    report; the loss recorded is rank 0's. Pass ``group=`` to choose the group (and then pass
    each rank its own shard). Otherwise only global rank 0 makes a Lens.

    One callback records one run: use a new callback (and ``run_dir``) for each ``fit``.

    Args:
        probe_batch: the fixed ``(inputs, targets)`` the probes measure on (moved to the model's
            device): ``module(inputs)`` (a tuple: ``module(*inputs)``; a dict: ``module(**inputs)``)
            gives the outputs and ``loss_fn(outputs, targets)`` the mean loss.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss, e.g. ``F.cross_entropy``.
        run_dir, probes, name, config, budget, memory_budget: as for :class:`dynlens.Lens`.
        report: write the HTML report (:func:`dynlens.report`) when training ends.
        report_out: where the report goes (default ``<run_dir>/report.html``).
        **lens_kwargs: any other keyword argument of :class:`dynlens.Lens` (``basic``, ``seed``,
            ``overwrite``, ``max_failures``, ...).

    Attributes:
        lens: the Lens of the run (None before training starts, and on ranks other than 0
            outside a data-parallel run).
        report_path: the report's path once written, else None.

    Raises:
        TypeError / ValueError: a bad argument (the message says what to pass instead); at
            ``on_train_start``, any error :class:`dynlens.Lens` raises for the module or batch.
    """

    def __init__(
        self,
        probe_batch: Any,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        run_dir: str | os.PathLike[str] | None = None,
        probes: Sequence[Probe] | str | None = None,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        budget: float | None = DEFAULT_BUDGET,
        memory_budget: float | int | None = None,
        report: bool = False,
        report_out: str | os.PathLike[str] | None = None,
        **lens_kwargs: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(probe_batch, (tuple, list)) and len(probe_batch) == 2):
            raise TypeError(
                f"DynlensCallback(probe_batch=...) must be a pair (inputs, targets); got "
                f"{type(probe_batch).__name__}. Pass a fixed batch, e.g. probe_batch=next(iter(loader)) "
                "for a loader of (x, y) pairs"
            )
        if loss_fn is None or not callable(loss_fn):
            raise TypeError(
                "DynlensCallback(loss_fn=...) must be callable as loss_fn(outputs, targets) -> mean "
                f"loss (e.g. torch.nn.functional.cross_entropy); got {type(loss_fn).__name__}"
            )
        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.settings = LensSettings(
            "DynlensCallback", run_dir=run_dir, probes=probes, name=name, config=config,
            budget=budget, memory_budget=memory_budget, report=report, report_out=report_out,
            lens_kwargs=lens_kwargs,
        )
        self.lens: Lens | None = None
        self.report_path: str | None = None
        self._started = False
        self._global_step = 0
        self._losses: list[Tensor] = []

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the Lens on the module and the trainer's optimizer; measure step 0."""
        if not trainer.is_global_zero and data_parallel_group() is None:
            return
        if self._started:
            raise RuntimeError(
                "this DynlensCallback has recorded a run already (one callback records one fit); "
                "pass a new DynlensCallback, with its own run_dir, to each trainer.fit"
            )
        if type(pl_module).forward is pl.LightningModule.forward:
            raise TypeError(
                f"{type(pl_module).__name__} defines no forward(): DynlensCallback's probes call the "
                "LightningModule as module(inputs) to get the outputs that loss_fn(outputs, targets) "
                "takes; define forward (e.g. return self.model(x))"
            )
        optimizers = list(trainer.optimizers)
        self._started = True
        self.lens = self.settings.lens(pl_module, self.loss_fn, self.probe_batch,
                                       optimizers[0] if optimizers else None)
        self._global_step = trainer.global_step
        self._losses = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """Keep the batch's loss; step the Lens if the optimizer stepped on this batch."""
        if self.lens is None or self.lens.closed:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            accumulate = trainer.accumulate_grad_batches
            if pl_module.automatic_optimization and accumulate != 1:
                # Lightning divides the loss it returns here by the accumulation
                loss = loss * accumulate
            self._losses.append(loss)
        if trainer.global_step != self._global_step:
            self._global_step = trainer.global_step
            losses, self._losses = self._losses, []
            if len(losses) > 1:
                mean: Tensor | None = torch.stack(losses).mean()
            else:
                mean = losses[0] if losses else None
            self.lens.step(loss=mean)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the final state, close the Lens, write the report if asked."""
        self.report_path = close_lens(self.lens, self.settings)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Training raised or was interrupted: record why and close the run."""
        stop_lens(self.lens, exception)


def _loss_of(outputs: Any) -> Tensor | None:
    """The detached scalar loss in what ``training_step`` returned (a tensor or a dict with
    ``"loss"``), or None."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor) and outputs.numel() == 1:
        return outputs.detach()
    return None
