"""The opposing-signals probe: the loss ledger of the tracked examples (each example's loss,
p(y) and correctness at every measurement), from which :func:`dynlens.opposing_signals` finds
groups of examples with opposing signals and :func:`dynlens.data_map` draws the data map
(:mod:`dynlens.measures.opposing`)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from dynlens.batches import split_batch
from dynlens.budget import examples_within
from dynlens.distributed import gather_rows, is_sharded
from dynlens.measures.opposing import along_direction, ledger_entry
from dynlens.probes.base import TOP_EIGENVECTOR, Context, Labelled, Probe, Values

__all__ = ["OpposingSignals"]


# the tracked examples' inputs are stored once (for what opposing groups share) when they are
# floating point and at most this many numbers (64 MB in float32)
MAX_STORED_INPUTS = 16 * 2**20


def _stored_inputs(inputs: Any, n: int, group: Any) -> np.ndarray | None:
    """The tracked examples' inputs as float32, to store once; None where they are not one
    floating tensor with a row per example, or too large (``MAX_STORED_INPUTS``)."""
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        return None
    if group is not None:
        inputs = gather_rows(inputs.detach(), group)
    if inputs.shape[0] != n or inputs.numel() > MAX_STORED_INPUTS:
        return None
    return inputs.detach().float().cpu().numpy()


class OpposingSignals(Probe):
    """Per-example loss, p(y) and correctness of the tracked examples at every measurement.

    Args:
        every / at / schedule: the schedule (see :class:`Probe`); every step by default, since
            the oscillations it looks for take a few steps.
        track: the examples to follow, ``(inputs, targets)`` on the model's device; default the
            probe batch. Evaluated in eval mode in chunks of ``chunk_size``.
        chunk_size: examples per forward pass.

    Records arrays labelled by example index: ``loss``, ``p_y`` (float32) and ``correct``
    (uint8, 1/0) at every measurement; at the first, the labels ``labels`` and, where the inputs
    are one floating-point tensor of at most ``MAX_STORED_INPUTS`` numbers, the inputs ``inputs``
    (float32, their own shape: what opposing groups share is read from them). When the Lens
    also runs the Hessian probe, ``along_top``: each example's ⟨∇ℓ_i, v⟩ with the top
    eigenvector v of its latest measurement (float32; one forward pass with a tangent), which
    :func:`dynlens.opposing_signals` compares with its split of each pair. Read the
    ledger back with :func:`dynlens.rules.opposing_signals.ledger_of` (or pass the run to
    ``dl.opposing_signals`` / ``dl.data_map``).

    Cost per measurement: one forward pass of the tracked examples without autograd (about a
    third of a training step for a tracked set as large as the training batch), and 9 bytes
    per example in the run database; with a top eigenvector, one forward pass with tangents
    more and 4 bytes per example.
    """

    name = "opposing_signals"
    default_every: ClassVar[int] = 1
    pure: ClassVar[bool] = True

    def __init__(self, every: int | None = None, at: Any = None, schedule: Any = None, *,
                 track: Any = None, chunk_size: int = 1024) -> None:
        super().__init__(every=every, at=at, schedule=schedule)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of examples, got {chunk_size!r}")
        self.track, self.chunk_size = track, chunk_size
        self._ids: tuple[str, ...] | None = None
        self._per_example: int | None = None  # bytes of one example's activations
        self._along_failed = False

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tracked": "probe batch" if self.track is None else "own set",
                "chunk_size": self.chunk_size}

    def measure(self, ctx: Context) -> Values:
        batch = ctx.probe_batch if self.track is None else self.track
        chunk = self.chunk_size
        if ctx.memory is not None and not is_sharded(ctx.model):
            # within the Lens's memory allowance: a forward pass without autograd keeps less
            # than the activations a gradient saves, so this bounds it (on an H200 the whole
            # batch at once took 1.0 GB beyond what was in use, 1.3x a ResNet-18's training peak)
            if self._per_example is None:
                self._per_example = ctx.fn.activation_bytes(1)
            chunk = examples_within(ctx.memory, self._per_example, chunk, "the ledger's forward pass")
        entry = ledger_entry(ctx.model, ctx.loss_fn, batch, chunk_size=chunk, group=ctx.group)
        values: dict[str, Any] = {}
        if self._ids is None:
            # under torch.distributed the entries are every rank's, in rank order
            self._ids = tuple(str(i) for i in range(len(entry.loss)))
            _, targets = split_batch(batch)
            if ctx.group is not None and hasattr(targets, "detach"):
                targets = gather_rows(targets.detach(), ctx.group)
            labels = np.asarray(targets.detach().cpu().reshape(len(self._ids), -1)[:, 0]) \
                if hasattr(targets, "detach") else np.full(len(self._ids), -1)
            if np.issubdtype(labels.dtype, np.integer):
                values["labels"] = Labelled(labels.astype(np.int64), self._ids)
            inputs = _stored_inputs(split_batch(batch)[0], len(self._ids), ctx.group)
            if inputs is not None:
                values["inputs"] = Labelled(inputs, self._ids)
        values["loss"] = Labelled(entry.loss.astype(np.float32), self._ids)
        values["p_y"] = Labelled(entry.p_y.astype(np.float32), self._ids)
        values["correct"] = Labelled(entry.correct.astype(np.uint8), self._ids)
        top = ctx.shared.get(TOP_EIGENVECTOR)
        if top is not None and not self._along_failed:
            try:
                along = along_direction(ctx.model, ctx.loss_fn, batch, top[1], chunk_size=chunk, group=ctx.group)
            except Exception as err:  # noqa: BLE001 - the ledger never fails for this extra
                self._along_failed = True
                warnings.warn(f"dynlens: OpposingSignals cannot take ⟨∇ℓ_i, v⟩ along the Hessian's top "
                              f"eigenvector ({type(err).__name__}: {err}); the ledger goes on without it",
                              RuntimeWarning, stacklevel=2)
            else:
                values["along_top"] = Labelled(along.astype(np.float32), self._ids)
                values["along_top_step"] = float(top[0])
        return values
