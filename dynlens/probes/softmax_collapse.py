"""The softmax-collapse probe: softmax collapse by dtype, margins, logit growth and naive loss
minimisation over training (:mod:`dynlens.measures.softmax`,
:mod:`dynlens.measures.attention_logits`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from dynlens.batches import call_model, logits_of, slice_examples, split_batch
from dynlens.budget import examples_within
from dynlens.distributed import all_max, decide, is_sharded
from dynlens.measures.attention_logits import capture_attention_logits
from dynlens.measures.softmax import MARGIN_QUANTILES, cosines, softmax_collapse
from dynlens.probes.base import Context, Labelled, Occasional, Probe, Values

__all__ = ["SoftmaxCollapse", "default_logits"]


def default_logits(outputs: Any) -> Tensor:
    """The logits in a model's outputs: the outputs themselves, their ``.logits`` (Hugging Face),
    or their first element."""
    found = logits_of(outputs)
    if found is not None:
        return found
    raise TypeError(f"cannot find logits in outputs of type {type(outputs).__name__}; pass "
                    "SoftmaxCollapse(logits=lambda outputs: ...) to pick them")


class SoftmaxCollapse(Probe):
    """Softmax collapse (Prieto et al. 2025), output-logit growth and attention-logit growth
    (Wortsman et al. 2023), and naive loss minimisation, on the probe batch.

    Each measurement runs one forward pass of the probe batch (in ``autocast``'s dtype when
    given, to see the logits training sees) and records:

    - scalars ``fraction`` (collapsed in ``dtype``, the loss's), ``fraction_float32``,
      ``fraction_bfloat16``, ``fraction_float16``, ``zero_loss_fraction``, ``margin_min``,
      ``margin_median``, ``margin_above_<dtype>`` (the share past each absorption margin),
      ``logit_norm_mean``/``_max``, ``log_z_mean``/``_min``, ``count``;
    - arrays ``margin_quantiles`` (labelled by probability) and ``attention_max_logit`` (the
      largest attention logit of each attention layer, labelled by module; with ``attention``);
    - on its sub-schedule (``nlm_every``-th measurement, when the time budget allows): the
      gradient's ``nlm_cosine`` cos(−∇L, θ) and ``nlm_per_tensor`` (labelled by parameter);
      and, whenever the previous step's parameters were kept, the optimizer's own
      ``update_cosine`` cos(θ_t − θ_{t−1}, θ_{t−1}) and ``update_per_tensor``.

    Args:
        every / at / schedule / mode: see :class:`Probe`.
        dtype: the dtype the training's loss is computed in (float32 under autocast).
        autocast: the dtype of the training's autocast (e.g. ``torch.bfloat16``), or None.
        attention: capture the attention logits (a wrapper of ``F.scaled_dot_product_attention``
            and hooks, during this forward pass only).
        nlm_every: the gradient's NLM cosine every this many measurements (1: always).
        ignore_index: targets left out (sequence padding).
        logits: picks the logits out of the model's outputs (default :func:`default_logits`).

    Cost per measurement: one forward pass of the probe batch (attention capture adds one
    q·kᵀ per attention layer), a copy of the parameters held for one step before it (the
    update's cosine), and on the NLM sub-schedule one gradient (about two more passes).
    """

    name = "softmax_collapse"
    default_every: ClassVar[int] = 10
    pure: ClassVar[bool] = True

    def __init__(self, every: int | None = None, at: Any = None, schedule: Any = None, mode: Any = None, *,
                 dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None, attention: bool = True,
                 nlm_every: int = 10, ignore_index: int = -100,
                 logits: Callable[[Any], Tensor] = default_logits) -> None:
        super().__init__(every=every, at=at, schedule=schedule, mode=mode)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}")
        self.dtype, self.autocast, self.attention = dtype, autocast, attention
        self.ignore_index, self.logits = ignore_index, logits
        self._nlm = Occasional(nlm_every)
        self._previous: list[Tensor] | None = None
        self._previous_step = -1
        self._per_example: int | None = None  # bytes of one example's activations

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": str(self.dtype), "autocast": str(self.autocast),
                "attention": self.attention, "nlm_every": self._nlm.every}

    def prepare(self, ctx: Context) -> None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        if self._previous is None:
            self._previous = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(self._previous, [p.detach() for p in params])
        self._previous_step = ctx.step

    def measure(self, ctx: Context) -> Values:
        # a model FSDP2 shards is called as it is (its forward gathers its parameters): the
        # collapse and margins are measured, the gradient cosines are not (no whole gradient here)
        sharded = is_sharded(ctx.model)
        fn = None if sharded else ctx.fn
        _, targets = split_batch(ctx.probe_batch)
        began = time.perf_counter()
        capture = capture_attention_logits(ctx.model) if self.attention else contextlib.nullcontext({})
        device = (next(ctx.model.parameters()).device if fn is None else fn.device).type
        cast = torch.autocast(device, dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()
        if not isinstance(targets, Tensor) or targets.is_floating_point():
            # a regression or a model whose targets are not class indices: nothing to count
            self.note("skipped", "the probe batch's targets are not class indices")
            return {}
        chunk, nlm_fits = None, True
        if ctx.memory is not None and fn is not None:
            # within the Lens's memory allowance: the forward pass in chunks (a pass without
            # autograd keeps less than a gradient's activations, so this bounds it), and the
            # NLM gradient only where the whole batch's activations fit (on an H200 the
            # unbounded measurement took 2.1 GB beyond what was in use, 2.7x a ResNet-18's
            # training peak)
            if self._per_example is None:
                self._per_example = fn.activation_bytes(1)
            chunk = examples_within(ctx.memory, self._per_example, fn.size, "the forward pass")
            nlm_fits = self._per_example * fn.size <= ctx.memory
        with torch.no_grad(), capture as attention, cast:
            if fn is None:
                logits = self.logits(call_model(ctx.model, split_batch(ctx.probe_batch)[0]))
            elif chunk is None or chunk >= fn.size:
                logits = self.logits(fn.outputs())
            else:
                logits = torch.cat([self.logits(fn.outputs(None, slice_examples(fn.inputs, s, min(s + chunk, fn.size))))
                                    for s in range(0, fn.size, chunk)])
        if tuple(logits.shape[:-1]) != tuple(targets.shape):
            self.note("skipped", f"logits of shape {tuple(logits.shape)} do not hold one row per target "
                                 f"(targets {tuple(targets.shape)}): pass logits= to pick them")
            return {}
        collapse = softmax_collapse(logits, targets, self.dtype, self.ignore_index, group=ctx.group)
        values: dict[str, Any] = {
            "fraction": collapse.fraction, "zero_loss_fraction": collapse.zero_loss_fraction,
            "margin_min": collapse.margin_min, "margin_median": collapse.margin_median,
            "logit_norm_mean": collapse.logit_norm_mean, "logit_norm_max": collapse.logit_norm_max,
            "log_z_mean": collapse.log_z_mean, "log_z_min": collapse.log_z_min, "count": float(collapse.count),
            "margin_quantiles": Labelled(collapse.margin_quantiles, tuple(f"q{q:g}" for q in MARGIN_QUANTILES)),
        }
        values.update({f"fraction_{name}": value for name, value in collapse.by_dtype.items()})
        values.update({f"margin_above_{name}": value for name, value in collapse.margin_above.items()})
        if attention:
            names = tuple(sorted(attention))
            largest = np.array([attention[n] for n in names])
            if ctx.group is not None:  # the largest over every rank's shard
                largest = all_max(torch.as_tensor(largest, dtype=torch.float64), ctx.group).numpy()
            values["attention_max_logit"] = Labelled(largest, names)
        spent = time.perf_counter() - began
        if fn is None:
            if "sharded" not in self.notes:
                self.note("sharded", "FSDP2 shards the parameters: the NLM and update cosines are left out")
            return values
        params = fn.params
        self._nlm.tick()
        if not nlm_fits and "nlm" not in self.notes:
            self.note("nlm", "the NLM cosine waits: the probe batch's gradient does not fit the "
                             "memory allowance (pass a smaller probe batch or memory_budget=)")
        # rank 0's choice under torch.distributed
        if decide(ctx.group, nlm_fits and self._nlm.wanted(spent, ctx.allowance, 3 * spent)):
            with self._nlm.timed():
                alignment = cosines({n: -g for n, g in fn.grad().items()}, params)
            values["nlm_cosine"] = alignment.cosine
            values["nlm_per_tensor"] = _labelled(alignment.per_tensor)
        if self._previous is not None and self._previous_step == ctx.step - 1:
            update = cosines({n: p.detach() - q for (n, p), q in zip(params.items(), self._previous, strict=True)},
                             dict(zip(params, self._previous, strict=True)))
            values["update_cosine"] = update.cosine
            values["update_per_tensor"] = _labelled(update.per_tensor)
            self._previous_step = -1
        return values


def _labelled(per: dict[str, float]) -> Labelled:
    return Labelled(np.array([per[n] for n in per], dtype=np.float64), tuple(per))

