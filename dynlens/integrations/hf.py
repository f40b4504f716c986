"""Probes on a Hugging Face ``Trainer`` run: :class:`DynlensCallback`.

    from dynlens.integrations.hf import DynlensCallback

    probe_batch = collator([dataset[i] for i in range(16)])   # a dict with "labels"
    callback = DynlensCallback(probe_batch=probe_batch, run_dir="runs/exp1", report=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   callbacks=[callback])
    trainer.train()

The callback makes a :class:`dynlens.Lens` when training begins (on the Trainer's model, with its
optimizer), steps it once per optimizer step and closes it when training ends. Without
``loss_fn`` the loss the probes measure is the model's own ``outputs.loss``
(:func:`model_loss`), computed from the ``labels`` in the probe batch; for a causal LM,
``probe_batch=causal_lm_batch(batch), loss_fn=causal_lm_loss`` gives the same loss from the
logits, which softmax collapse and the Gauss-Newton curvature need. It needs ``transformers``
and ``accelerate`` (``pip install dynlens[hf]``); importing ``dynlens`` never imports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynlens.budget import DEFAULT_BUDGET
from dynlens.integrations._common import LensSettings, close_lens, data_parallel_group
from dynlens.lens import Lens
from dynlens.probes.base import Probe

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "dynlens.integrations.hf needs Hugging Face transformers: pip install 'dynlens[hf]' "
        "(or pip install transformers accelerate)"
    ) from err

__all__ = ["DynlensCallback", "model_loss", "labelled_probe_batch", "causal_lm_batch", "causal_lm_loss"]

IGNORE_INDEX = -100  # the label Hugging Face models leave out of the loss


def model_loss(outputs: Any, targets: Any = None) -> Tensor:
    """The loss a Hugging Face model computed itself: ``outputs.loss`` (``outputs[0]`` of a tuple
    output). The dynlens ``loss_fn`` for a probe batch whose inputs hold the ``labels``; the
    ``targets`` are not used (they are None in :func:`labelled_probe_batch`'s batches).

    Raises:
        ValueError: the model returned no loss (its inputs had no labels).
    """
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, tuple) and outputs and isinstance(outputs[0], Tensor) and outputs[0].dim() == 0:
        loss = outputs[0]
    else:
        loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"the model returned no loss (outputs of type {type(outputs).__name__}): without loss_fn, "
            "dynlens measures the model's own outputs.loss, which it computes only when the probe "
            "batch holds 'labels'. Put the labels in the probe batch, or pass loss_fn=(outputs, targets) -> loss"
        )
    return loss


def labelled_probe_batch(batch: Any) -> tuple[dict[str, Any], None]:
    """A probe batch for :func:`model_loss`: ``(inputs, None)`` with the labels inside ``inputs``,
    so that ``model(**inputs)`` computes its own loss.

    Takes a batch dict with ``"labels"`` (what a data collator returns), ``(inputs, None)`` with the
    labels in ``inputs``, or ``(inputs, labels)`` (the labels are moved into ``inputs``). The
    targets are None, so probes that compare logits with targets (softmax collapse, the data
    map's p(y)) skip those values: a causal LM's labels are shifted inside the model, and the
    logits at a position do not belong to the label at that position.

    Raises:
        TypeError / ValueError: the batch is not one of those, or holds no labels.
    """
    if isinstance(batch, Mapping):
        inputs, labels = dict(batch), None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        inputs, labels = dict(batch[0]), batch[1]
    else:
        raise TypeError(
            f"probe_batch must be a batch dict with 'labels' (what the data collator returns), or "
            f"(inputs_dict, labels); got {type(batch).__name__}. To measure a loss of your own on "
            "other batches, pass loss_fn=(outputs, targets) -> loss with probe_batch=(inputs, targets)"
        )
    if labels is not None:
        if "labels" in inputs:
            raise ValueError(
                "probe_batch=(inputs, labels) has 'labels' in inputs too; pass one of them "
                "(the batch dict alone, or (inputs without labels, labels))"
            )
        inputs["labels"] = labels
    if inputs.get("labels") is None:
        raise ValueError(
            f"probe_batch holds no 'labels' (keys: {sorted(inputs)}): without loss_fn, dynlens "
            "measures the model's own outputs.loss, which needs labels. Add them (for a causal LM, "
            "labels = input_ids), or pass loss_fn=(outputs, targets) -> loss with "
            "probe_batch=(inputs, targets)"
        )
    return inputs, None


def causal_lm_batch(batch: Any) -> tuple[dict[str, Any], Tensor]:
    """A causal language model's batch as ``(inputs, targets)`` for :func:`causal_lm_loss`:
    position t's logits predict the token at t + 1, so the inputs drop the last position and
    the targets are the labels from the second position on. Every tensor of the inputs shaped
    like the labels (``input_ids``, ``attention_mask``, ``position_ids``, ...) is cut the same
    way; ``labels`` leave the inputs. The model's own loss on the whole batch is
    :func:`causal_lm_loss` of this one (the last position predicts nothing it is scored on, and
    no earlier position sees it), now as a function of the logits, with one target per logit
    row: softmax collapse compares each position's logits with the token it predicts, and the
    Gauss-Newton curvature is the loss's in the logits.

    Takes a batch dict with ``"labels"`` (without them, the labels are ``input_ids``), or
    ``(inputs, labels)``.

    Raises:
        TypeError / ValueError: not such a batch, or labels not of shape (batch, positions ≥ 2).
    """
    inputs, _ = labelled_probe_batch(_with_labels(batch))
    labels = inputs.pop("labels")
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.shape[1] < 2:
        raise ValueError(
            "causal_lm_batch needs labels of shape (batch, positions), at least 2 positions (a causal "
            f"LM's token ids); got {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    shape = tuple(labels.shape)
    cut = {k: v[:, :-1] if isinstance(v, Tensor) and tuple(v.shape[:2]) == shape else v
           for k, v in inputs.items()}
    return cut, labels[:, 1:]


def causal_lm_loss(outputs: Any, targets: Tensor) -> Tensor:
    """The mean cross-entropy of a causal LM's ``outputs.logits`` (batch, positions, vocabulary)
    against :func:`causal_lm_batch`'s targets (batch, positions), positions labelled ``-100``
    left out: the loss Hugging Face causal LMs compute themselves, as a function of the logits."""
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", outputs)
    if isinstance(logits, tuple) and logits:  # return_dict=False: (logits, ...)
        logits = logits[0]
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise ValueError(
            f"causal_lm_loss needs logits of shape (batch, positions, vocabulary); got "
            f"{type(logits).__name__}"
        )
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                                             ignore_index=IGNORE_INDEX)


def _with_labels(batch: Any) -> Any:
    """A batch dict without labels gets ``labels = input_ids`` (a causal LM's)."""
    if isinstance(batch, Mapping) and batch.get("labels") is None and "input_ids" in batch:
        return {**batch, "labels": batch["input_ids"]}
    return batch


class DynlensCallback(TrainerCallback):
    """A Hugging Face ``TrainerCallback`` that attaches dynlens probes to ``Trainer.train()``.

    The Lens is made at ``on_train_begin`` on the Trainer's model with its optimizer (the torch
    optimizer inside accelerate's wrapper) and measures step 0 there. ``on_step_end`` comes once
    per optimizer step, so with ``gradient_accumulation_steps=k`` the Lens steps once per k
    batches: the run's steps are ``state.global_step``'s, counted from the start of this call of
    ``train()``. Each step's loss is read from the model's ``outputs.loss`` in its training
    forward passes (a forward hook, which reads nothing while the probes or evaluation run):
    the mean over the step's batches, or their sum when the Trainer passed
    ``num_items_in_batch`` (then each batch's loss is its share of the step's). A step whose
    forward passes returned no loss (a ``compute_loss_func`` of your own) records none. At
    ``on_train_end`` the Lens measures the final state and closes; with ``report=True`` the HTML
    report is written (its path in :attr:`report_path`). The Trainer has no hook for an
    exception: a run whose training raised stays marked "running" in its metadata, with every
    step before the error on disk.

    The loss (``loss_fn`` omitted): the probes measure the model's own ``outputs.loss``
    (:func:`model_loss`) on a probe batch that holds ``labels`` (:func:`labelled_probe_batch`
    says which batches are accepted). That loss is the batch's mean only: softmax collapse has
    no targets to compare the logits with (it records nothing), and the Hessian probe's
    ``curvature="ggn"`` needs the loss as a function of the logits (of a loss the model computed
    itself it is zero). A ``loss_fn`` of the outputs lifts both: for a causal LM,
    ``DynlensCallback(probe_batch=causal_lm_batch(batch), loss_fn=causal_lm_loss)`` (the same
    loss, from the logits and the shifted labels). Without ``loss_fn``, ``probes="default"``
    leaves out OpposingSignals: its per-example losses need a loss of the logits (the model's
    own is the batch's mean).

    Data-parallel runs (``torch.distributed`` initialised with several processes, as
    ``torchrun``/accelerate launch them): every rank makes a Lens over the default process
    group with its contiguous shard of ``probe_batch`` (pass the same whole batch on every
    rank), so each measurement is the whole probe batch's, computed across the ranks; rank 0
    alone writes the run and the report; the loss recorded is rank 0's. Otherwise only global
    rank 0 (``args.process_index == 0``) makes a Lens.

    Args:
        probe_batch: the fixed batch the probes measure on (moved to the model's device). Without
            ``loss_fn``: a batch dict with ``"labels"``, ``(inputs, None)`` or ``(inputs, labels)``
            (see :func:`labelled_probe_batch`). With ``loss_fn``: ``(inputs, targets)`` where
            ``model(**inputs)`` gives the outputs and ``loss_fn(outputs, targets)`` the mean loss.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss, or None for the model's own.
        run_dir, probes, name, config, budget, memory_budget: as for :class:`dynlens.Lens`.
        report: write the HTML report (:func:`dynlens.report`) when training ends.
        report_out: where the report goes (default ``<run_dir>/report.html``).
        **lens_kwargs: any other keyword argument of :class:`dynlens.Lens` (``basic``, ``seed``,
            ``overwrite``, ``max_failures``, ...).

    Attributes:
        lens: the Lens of the run (None before training begins, and on ranks other than 0
            outside a data-parallel run).
        report_path: the report's path once written, else None.

    Raises:
        TypeError / ValueError: a bad argument (the message says what to pass instead); at
            ``on_train_begin``, any error :class:`dynlens.Lens` raises for the model or batch.
    """

    def __init__(
        self,
        probe_batch: Any,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
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
        if loss_fn is None:
            probe_batch = labelled_probe_batch(probe_batch)
            loss_fn = model_loss
        elif not callable(loss_fn):
            raise TypeError(
                "DynlensCallback(loss_fn=...) must be callable as loss_fn(outputs, targets) -> mean "
                f"loss, or None for the model's own outputs.loss; got {type(loss_fn).__name__}"
            )
        elif not (isinstance(probe_batch, (tuple, list)) and len(probe_batch) == 2):
            raise TypeError(
                f"with loss_fn, DynlensCallback(probe_batch=...) must be a pair (inputs, targets); got "
                f"{type(probe_batch).__name__}. Pass (inputs_dict, targets), or leave loss_fn out to "
                "measure the model's own loss on a batch dict with 'labels'"
            )
        probes = _hf_probes(probes, own_loss=loss_fn is model_loss)
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
        self._hook: Any = None
        self._in_lens = False
        self._means: list[Tensor] = []
        self._shares: list[Tensor] = []

    # ------------------------------------------------------------------ Trainer hooks

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Make the Lens on the Trainer's model and optimizer; measure step 0."""
        if not _is_rank_zero(args, state) and data_parallel_group() is None:
            return
        if self._started:
            raise RuntimeError(
                "this DynlensCallback has recorded a run already (one callback records one call of "
                "train()); pass a new DynlensCallback, with its own run_dir, to each Trainer"
            )
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"the Trainer passed no model to DynlensCallback (got {type(model).__name__})")
        optimizer = _torch_optimizer(kwargs.get("optimizer"))
        self._started = True
        self._in_lens = True
        try:
            self.lens = self.settings.lens(model, self.loss_fn, self.probe_batch, optimizer)
        finally:
            self._in_lens = False
        self._means, self._shares = [], []
        self._hook = model.register_forward_hook(self._read_loss, with_kwargs=True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """One optimizer step: step the Lens with the step's loss."""
        if self.lens is None or self.lens.closed:
            return
        loss: Tensor | None = None
        if self._shares:
            loss = torch.stack(self._shares).sum()
        elif self._means:
            loss = torch.stack(self._means).mean()
        self._means, self._shares = [], []
        self._in_lens = True
        try:
            self.lens.step(loss=loss)
        finally:
            self._in_lens = False

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Measure the final state, close the Lens, write the report if asked."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._in_lens = True
        try:
            self.report_path = close_lens(self.lens, self.settings)
        finally:
            self._in_lens = False

    # ------------------------------------------------------------------ the training loss

    def _read_loss(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   outputs: Any) -> None:
        """Forward hook: keep the loss of a training forward pass (not of the probes' or of
        evaluation, which run in eval mode or without gradients)."""
        if self._in_lens or not module.training or not torch.is_grad_enabled():
            return
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        else:
            loss = getattr(outputs, "loss", None)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        loss = loss.detach().reshape(()).float()
        if kwargs.get("num_items_in_batch") is not None:
            self._shares.append(loss)
        else:
            self._means.append(loss)


def _hf_probes(probes: Sequence[Probe] | str | None, own_loss: bool) -> Sequence[Probe] | str | None:
    """The probes for a Hugging Face model. With the model's own loss (``own_loss``) OpposingSignals
    cannot work (that loss is the batch's mean only): ``"default"`` leaves it out and a list
    naming it is an error. With a ``loss_fn`` of the logits it measures each example's loss
    from the ``ModelOutput``'s logits (:func:`dynlens.measures.opposing.ledger_entry`)."""
    from dynlens.probes import OpposingSignals, default

    if probes == "default" and own_loss:
        return [p for p in default() if not isinstance(p, OpposingSignals)]
    if own_loss and isinstance(probes, Sequence) and not isinstance(probes, str) \
            and any(isinstance(p, OpposingSignals) for p in probes):
        raise ValueError(
            "OpposingSignals needs each example's loss, and without loss_fn dynlens measures the "
            "model's own outputs.loss, the mean over the batch. Leave OpposingSignals out, or pass a "
            "loss_fn of the outputs (for a causal LM: probe_batch=causal_lm_batch(batch), "
            "loss_fn=causal_lm_loss)"
        )
    return probes


def _is_rank_zero(args: TrainingArguments, state: TrainerState) -> bool:
    """Whether this process is global rank 0: ``args.process_index``, the global rank accelerate
    gives it (the TrainerState's flag where the arguments have none)."""
    index = getattr(args, "process_index", None)
    if index is not None:
        return int(index) == 0
    return bool(getattr(state, "is_world_process_zero", True))


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer the Trainer steps: accelerate's ``AcceleratedOptimizer`` unwrapped."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer).__module__.startswith("accelerate") and isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"the Trainer's optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer; "
            "dynlens reads the learning rate and optimizer state from a torch optimizer"
        )
    return optimizer
