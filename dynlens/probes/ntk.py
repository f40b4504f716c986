"""The empirical-NTK probe: how far and how fast the tangent kernel moves, and how it aligns with
the task (:mod:`dynlens.measures.ntk`; Fort et al. 2020, Baratin et al. 2021, Chizat et al. 2019)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from dynlens.batches import (
    _last_tokens,
    _token_length,
    batch_size,
    call_model,
    slice_examples,
    split_batch,
)
from dynlens.budget import MemoryBudgetTooSmall, OverBudget
from dynlens.distributed import gather_rows, gather_sizes, rank
from dynlens.functional import is_out_of_memory, isolated
from dynlens.measures.ntk import (
    condition_number,
    effective_rank,
    kernel_distance,
    kernel_eigenvalues,
    kernel_target_alignment,
    ntk_of,
)
from dynlens.parameters import trainable_parameters, unwrap_model
from dynlens.probes.base import Context, Labelled, Probe, Values

__all__ = ["NTK"]

TOP_EIGENVALUES = 5
# the most examples whose kernel is stored (float32: 1 MB a measurement at 512)
STORED_KERNEL = 512
# the most host memory the probe's copy of the parameters at its first kernel may take (for the
# relative parameter change); a larger model's change is not recorded, with a note
PARAMETER_COPY_BYTES = 2 * 1024**3
# the parameters' difference is taken on their device in pieces of this many entries (64 MB in
# float32), each piece of the host copy brought over in turn
_PIECE = 16 * 1024**2
# a sequence model's first kernel halves its tokens down to this many while it does not fit
MIN_TOKENS = 8


class _Projected(nn.Module):
    """The model's outputs as the probe sees them: a sequence model's last position, and more
    than ``max_outputs`` classes projected on fixed Gaussian directions (R/√k: the projected
    trace kernel is an unbiased estimate of the trace kernel)."""

    def __init__(self, model: nn.Module, projection: Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model(*args, **kwargs)
        out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        if out.dim() >= 3:
            out = out[:, -1]
        out = out.reshape(out.shape[0], -1)
        return out if self.projection is None else out @ self.projection.to(out.dtype)


def _host_copy(tensor: Tensor) -> Tensor:
    """A host copy of ``tensor``, in page-locked memory when it lives on a GPU (copies to and
    from pageable memory ran at 1.2 and 5 GB/s on an H200: 0.40 s and 0.10 s for the 124M
    decoder's parameters); pageable where the host refuses to lock more."""
    if tensor.device.type == "cuda":
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError:
            return tensor.detach().to("cpu", copy=True)
        return host.copy_(tensor.detach())
    return tensor.detach().to("cpu", copy=True)


def _relative_change(parameters: list[Tensor], initial: list[Tensor], initial_norm: float,
                     memory: int | None = None) -> float:
    """‖θ − θ₀‖/‖θ₀‖ of ``parameters`` against their host copies ``initial``, in float64, taken
    on the parameters' device in pieces of ``_PIECE`` entries at most, fewer where ``memory``
    (bytes; None: no limit) would not hold a piece's copy, difference and float64 squares (one
    reading of the device at the end); NaN when ‖θ₀‖ = 0."""
    if initial_norm == 0:
        return float("nan")
    total: Tensor | None = None
    for p, p0 in zip(parameters, initial, strict=True):
        flat, flat0 = p.detach().reshape(-1), p0.reshape(-1)
        size = _PIECE if memory is None else max(1, min(_PIECE, memory // (2 * flat.element_size() + 8)))
        for start in range(0, flat.numel(), size):
            # from page-locked memory the copy is queued on the stream before the subtraction
            piece = flat[start:start + size] - flat0[start:start + size].to(flat.device, non_blocking=True)
            square = torch.linalg.vector_norm(piece, dtype=torch.float64) ** 2
            total = square if total is None else total + square.to(total.device)
    return math.sqrt(float(total)) / initial_norm if total is not None else 0.0


class NTK(Probe):
    """The empirical NTK's trace kernel on the first ``n`` examples of the probe batch, against
    the kernel at the first measurement and at the last one.

    Records: ``distance_from_init`` (kernel distance to the first kernel, Fort et al. 2020: 1 −
    cosine of the two kernels), ``velocity`` (distance to the previous kernel per step between
    them), ``alignment`` (centred kernel–target alignment with the examples' targets, Cortes et
    al. 2012), ``parameter_change`` (‖θ_t − θ_0‖/‖θ_0‖ over the trainable parameters, θ_0
    those of the first kernel, Chizat et al. 2019: with a small kernel distance, the lazy
    regime), ``effective_rank``, ``condition_number``, ``trace`` (Σ_i Θ(x_i, x_i)), ``outputs``
    (O measured); arrays ``eigenvalues`` (all n, descending), ``top_eigenvalues``, ``kernel``
    (the trace kernel in float32, of the first ``STORED_KERNEL`` examples at most, for its
    image sorted by class in the report), ``targets`` (those examples' classes, where they are
    integer classes) and, with ``per_layer``, ``alignment_per_layer`` (labelled by layer).

    What is measured: outputs flattened per example; a sequence model's (batch, positions,
    classes) outputs at the last position (the next-token prediction); more than
    ``max_outputs`` outputs projected on ``max_outputs`` fixed Gaussian directions (the
    projected trace kernel is an unbiased estimate of the full trace kernel; a language model's
    vocabulary becomes 32 random directions). Targets for the alignment: integer classes
    (one-hot), or values; a sequence model's at the last position.

    Long sequences: where the inputs are token sequences (an integer tensor of shape (examples,
    T), with any attention mask beside it) and the first kernel's factors do not fit the memory
    allowance on whole sequences, it is taken on the last T/2, T/4, ... tokens of each
    sequence (at least ``MIN_TOKENS``), the longest that fits, and every later kernel on as many
    (recorded as ``tokens``, with a note), so that the kernels compare: the NTK of the model on
    those shorter inputs, still at their last position. A first kernel stopped at its deadline
    after its memory test starts its next try from the tokens that fitted. On the 124M decoder
    of 512 tokens with 32 outputs, 1.75 GB allowed at step 0 takes 32 tokens and 0.75 GB 16,
    one sequence a chunk (the planner's answer; at 64 tokens the check of its structured layers
    alone, every layer's inputs and output gradients on two sequences, takes more). Not under
    ``torch.distributed``, where the ranks' allowances differ: there a kernel that does not fit
    waits.

    Args:
        every / at / schedule: the schedule (see :class:`Probe`); default every 200 steps.
        n: examples of the probe batch the kernel is taken on (the first n).
        max_outputs: the most outputs measured before projecting.
        per_layer: also each layer's kernel and its alignment.
        seed: the projection's seed.

    Cost per measurement: n·O backward passes through the model, O ≤ ``max_outputs`` (32·32 =
    1,024 at the defaults), plus the products of :func:`dynlens.measures.ntk.ntk_of`'s structured
    layers (linear, convolutional, embedding and normalisation layers) or the Jacobian
    contraction of the other parameters; memory within the Lens's allowance, in chunks of
    examples, waiting for memory where one example's share does not fit (a model of other
    layers needs two examples' Jacobians, 2·O·P numbers). Where the factors of every layer do
    not fit the allowance at once, on a GPU the layers are measured in groups that each keep
    theirs, when that costs the host fewer passes (:func:`dynlens.measures.ntk.ntk_of`). The
    parameter change reads the host copy of θ_0 back to the device, P numbers a measurement in
    64-MB pieces, and keeps that copy in page-locked host memory (none past
    ``PARAMETER_COPY_BYTES``): on an H200 13.7 ms a measurement and 0.48 s for the copy, once,
    on the 124M decoder (0.53 and 19 training steps), 5.6 ms and 73 ms on the ResNet-18 (0.42
    and 5.5 steps; from pageable memory it was 0.10 s and 14 ms a measurement,
    ``benchmarks/ntk_parameter_change.py``). The
    measurements themselves on the H200 reference jobs, without the parameter change
    (``benchmarks/RESULTS.md``, cost section, fourteenth session):

    - ResNet-18, batch 256: 0.5–0.9 s a measurement (60 training steps of 11.4 ms; 0.8–1.3 s
      before the layer groups). In 0.5 GiB the groups took it from 1.9–2.3 s to 0.6–0.8 s.
    - Decoder, 8 sequences of 512 tokens, on the last 16 tokens: 3.9 s the first measurement,
      then 0.67 s (28 steps).
    - The decoder at the 0.7 GiB allowed at step 0: 2.5–3.0 s.

    A first measurement stops at the Lens's deadline between chunks and blocks (under
    ``torch.distributed``, each rank on its own clock in its own rows, and every rank with
    it). Under the default 5% time budget the decoder's first try, stopped at
    1 s, was not tried again within 3,000 steps: the probe stayed within the budget there
    without a value.
    """

    name = "ntk"
    default_every: ClassVar[int] = 200
    pure: ClassVar[bool] = True

    def __init__(self, every: int | None = None, at: Any = None, schedule: Any = None, *, n: int = 32,
                 max_outputs: int = 32, per_layer: bool = True, seed: int = 0) -> None:
        super().__init__(every=every, at=at, schedule=schedule)
        if n < 2 or max_outputs < 1:
            raise ValueError(f"n must be at least 2 and max_outputs at least 1; got n={n}, max_outputs={max_outputs}")
        self.n, self.max_outputs, self.per_layer, self.seed = n, max_outputs, per_layer, seed
        self._initial: Tensor | None = None
        self._previous: tuple[int, Tensor] | None = None
        # the trainable parameters at the first kernel, on the host, and their norm (None: not
        # kept, the model being too large for PARAMETER_COPY_BYTES)
        self._initial_parameters: tuple[list[Tensor], float] | None = None
        self._projection: Tensor | None = None
        self._wrapper: _Projected | None = None
        self._projected_from: int | None = None
        self._tokens: int | None = None
        self._fitted: int | None = None  # the tokens a first kernel stopped at its deadline fitted

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n": self.n, "max_outputs": self.max_outputs, "per_layer": self.per_layer}

    def with_schedule(self, every: int | None = None, at: Any = None, schedule: Any = None) -> NTK:
        """:meth:`Probe.with_schedule`, without copying the wrapper of the model measured (which
        holds the model itself): the copy makes its own when it measures."""
        wrapper, self._wrapper = self._wrapper, None
        try:
            return super().with_schedule(every=every, at=at, schedule=schedule)  # type: ignore[return-value]
        finally:
            self._wrapper = wrapper

    def _model(self, ctx: Context, inputs: Any) -> _Projected:
        # the user's own module: DistributedDataParallel's forward would synchronise buffers
        # and prepare its reducer for a backward pass that never comes
        model = unwrap_model(ctx.model)
        if self._projected_from is None:
            # in eval mode, as every kernel is taken (a BatchNorm in train mode would update its
            # running statistics, and refuse one example), also when measure is called directly
            with isolated(model, "eval"), torch.no_grad():
                outputs = call_model(_Projected(model, None), inputs).shape[1]
            self._projected_from = outputs
            if outputs > self.max_outputs:
                g = torch.Generator().manual_seed(self.seed)
                self._projection = torch.randn(outputs, self.max_outputs, generator=g) / self.max_outputs**0.5
                self.note("projection", f"{outputs} outputs on {self.max_outputs} Gaussian directions")
        if self._projection is not None:
            self._projection = self._projection.to(next(model.parameters()).device)
        # the same wrapper every time while the model and its device stay: ntk_of keeps what it
        # learns of a model per model (its layers' check, one example's activation bytes), which
        # a new wrapper a measurement would throw away
        wrapper = self._wrapper
        if wrapper is None or wrapper.model is not model or wrapper.projection is not self._projection:
            wrapper = self._wrapper = _Projected(model, self._projection)
        return wrapper

    def measure(self, ctx: Context) -> Values:
        inputs, targets = split_batch(ctx.probe_batch)
        model = self._model(ctx, slice_examples(inputs, 0, 1))
        take = self.n
        if ctx.group is not None:
            # the first n examples of the whole batch (the shards in rank order): this rank's part
            sizes = gather_sizes(batch_size(inputs), ctx.group)
            before = sum(sizes[: rank(ctx.group)])
            take = max(0, min(self.n - before, sizes[rank(ctx.group)]))
            if isinstance(targets, Tensor):
                targets = gather_rows(targets[:take], ctx.group)
        inputs = slice_examples(inputs, 0, take)
        # under a memory limit, Jacobian contraction in chunks or a wait for memory: never the
        # NTK-vector products, which fit but stall training for minutes on a large model
        # a first measurement stops at the Lens's deadline between chunks and blocks; under
        # torch.distributed on each rank's own clock, as the ranks' rows differ (a rank that
        # stops makes every rank stop at the rows' gather)
        check = None
        if ctx.deadline != math.inf:
            check = ctx.check_time if ctx.group is None else ctx.check_time_locally
        length = _token_length(inputs) if ctx.group is None else None
        tokens = length if length is None else min(self._tokens or self._fitted or length, length)
        waiting: MemoryBudgetTooSmall | None = None  # the whole sequences' memory error
        while True:
            shortened = inputs if tokens == length else _last_tokens(inputs, length, tokens)
            try:
                result = ntk_of(model, shortened, mode="trace", per_layer=self.per_layer, memory=ctx.memory,
                                group=ctx.group, vector_products=ctx.memory is None, check=check)
                break
            except MemoryBudgetTooSmall as err:
                # a first kernel of token sequences: their last half, down to MIN_TOKENS
                if self._tokens is not None or tokens is None or tokens // 2 < MIN_TOKENS:
                    raise
                waiting = waiting or err
                tokens //= 2
            except OverBudget:
                # stopped at the deadline past the memory test: the next try starts from these tokens
                if self._tokens is None and tokens is not None:
                    self._fitted = tokens
                raise
            except Exception as err:
                # integer inputs that are not sequences to shorten (categorical features): the
                # probe waits for memory, as it did on the whole inputs
                if waiting is None or is_out_of_memory(err):
                    raise
                raise waiting from err
        if length is not None and self._tokens is None:
            self._tokens = tokens
            if tokens < length:
                self.note("tokens", f"the kernel is taken on the last {tokens} of {length} tokens of each sequence "
                                    f"(the longest that fitted memory={ctx.memory} bytes at step {ctx.step}), "
                                    "and so at every measurement")
        kernel = result.kernel.detach().double().cpu()
        values: dict[str, Any] = {"trace": float(kernel.diagonal().sum()), "outputs": float(result.num_outputs),
                                  "effective_rank": effective_rank(kernel),
                                  "condition_number": condition_number(kernel)}
        if tokens is not None:
            values["tokens"] = float(tokens)
        spectrum = kernel_eigenvalues(kernel).numpy()
        values["eigenvalues"] = spectrum
        eigenvalues = spectrum[:TOP_EIGENVALUES]
        values["top_eigenvalues"] = Labelled(eigenvalues, tuple(f"λ{i + 1}" for i in range(len(eigenvalues))))
        values["kernel"] = kernel[:STORED_KERNEL, :STORED_KERNEL].float().numpy()
        parameters = list(trainable_parameters(ctx.model).values())
        if self._initial is None:
            self._initial = kernel
            self._initial_parameters = self._kept_parameters(parameters)
        values["distance_from_init"] = kernel_distance(kernel, self._initial)
        if self._initial_parameters is not None:
            if [p.shape for p in parameters] != [p.shape for p in self._initial_parameters[0]]:
                # the trainable parameters are no longer those of the first kernel
                self.note("parameter_change", f"not recorded from step {ctx.step}: the trainable parameters "
                                              "changed in number or shape since the first kernel")
                self._initial_parameters = None
            else:
                values["parameter_change"] = _relative_change(parameters, *self._initial_parameters,
                                                              memory=ctx.memory)
        if self._previous is not None and ctx.step > self._previous[0]:
            values["velocity"] = kernel_distance(kernel, self._previous[1]) / (ctx.step - self._previous[0])
        self._previous = (ctx.step, kernel)
        y = self._targets(targets)
        if y is not None and len(y) != kernel.shape[0]:
            y = None
        if y is not None and not y.is_floating_point() and y.dim() == 1:
            values["targets"] = y[:STORED_KERNEL].numpy().astype(np.int64)
        # examples whose class target is negative (padding, ignore_index=-100) have no class:
        # the alignment is over the others
        keep = None if y is None or y.is_floating_point() else y >= 0
        if keep is not None:
            y = y[keep]
        else:
            keep = torch.ones(kernel.shape[0], dtype=torch.bool)
        if y is not None and len(y) >= 2:
            values["alignment"] = kernel_target_alignment(kernel[keep][:, keep], y)
            if result.per_layer:
                names = tuple(name.removeprefix("model.").removeprefix("model") or "(root)"
                              for name in result.per_layer)
                aligned = [kernel_target_alignment(k.detach().double().cpu()[keep][:, keep], y)
                           for k in result.per_layer.values()]
                values["alignment_per_layer"] = Labelled(np.asarray(aligned, dtype=np.float64), names)
        return values

    def _kept_parameters(self, parameters: list[Tensor]) -> tuple[list[Tensor], float] | None:
        """A host copy of ``parameters`` and their norm, or None (with a note) when the copy
        would take more than ``PARAMETER_COPY_BYTES``."""
        size = sum(p.numel() * p.element_size() for p in parameters)
        if size > PARAMETER_COPY_BYTES:
            self.note("parameter_change", f"not recorded: a host copy of the {sum(p.numel() for p in parameters):,} "
                                          f"trainable parameters would take {size / 1e9:.3g} GB, more than "
                                          f"{PARAMETER_COPY_BYTES / 1e9:.3g} GB")
            return None
        copies = [_host_copy(p) for p in parameters]
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in copies))
        return copies, norm

    def _targets(self, targets: Any) -> Tensor | None:
        if not isinstance(targets, Tensor):
            return None
        y = targets[: self.n].detach().cpu()
        if y.dim() >= 2 and not y.is_floating_point():
            y = y[:, -1]  # a sequence model's next token at the last position
        return y
