"""Gradient coherence: statistics of the per-example gradients g_i = ∇ℓ_i on one batch.

Definitions (METRICS.md §2; m examples, ḡ = (1/m) Σ g_i):

* coherence α = ‖ḡ‖² / ((1/m) Σ ‖g_i‖²) and its orthogonal limit α⊥ = 1/m; m-coherence
  α/α⊥ = ‖Σ g_i‖² / Σ ‖g_i‖², about how many examples a step on one example helps
  (Chatterjee & Zielinski 2022, "On the Generalization Mystery in Deep Learning");
* stiffness, the m×m matrix of cos(g_i, g_j), averaged within and between classes
  (Fort et al. 2019, "Stiffness: A New Perspective on Generalization in Neural Networks");
* gradient signal-to-noise ratio per parameter r_k = mean_i(g_ik)² / var_i(g_ik)
  (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of
  Parameters");
* gradient noise scale B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018, "An Empirical Model of
  Large-Batch Training"), the critical batch size estimate.

Everything except stiffness is accumulated chunk by chunk from Σ g_i, the centred sums of
squares Σ (g_i − ḡ)² (elementwise, merged across chunks by Chan et al.'s parallel update) and
the norms ‖g_i‖², so that no more than one chunk of per-example gradients is held at once, and
of a hooked chunk one layer's: a chunk's gradients come as a stream of groups (:class:`_Gradients`)
that :class:`_Sums` reduces and frees one by one. :func:`memory_model` predicts the peak, which
``memory=`` bounds.
"""

from __future__ import annotations

import copy
import math
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from dynlens import cudagraphs
from dynlens.budget import MemoryBudgetTooSmall
from dynlens.functional import (
    Mode,
    ModelFunction,
    OutOfMemoryError,
    _example_dims,
    batch_size,
    example_losses,
    isolated,
    slice_examples,
    unwrap_model,
)
from dynlens.measures.layer_grads import BiasOf, HookedLayer, Outer, Rep, hookable_layers

__all__ = ["Coherence", "gradient_coherence", "coherence_of", "auto_chunk_size", "memory_model", "MemoryModel",
           "VmapUnsupportedError"]

Fallback = Literal["loop", "error"]
ChunkSize = int | Literal["auto"]

# A parameter entry whose per-example gradients are constant (all zero, typically: a dead unit
# or an unused parameter) has variance 0 and no defined GSNR. Variances at or below this
# fraction of the mean squared gradient are rounding noise of such constant entries.
_CONSTANT_VARIANCE = 1e-12
_MAX_GSNR = (1 - _CONSTANT_VARIANCE) / _CONSTANT_VARIANCE  # r_k at that variance
# Layer hooks are used only when the hooked layers hold at least this share of the parameters:
# otherwise the vmap pass for the rest dominates and the batched pass would only add to it.
HOOKED_SHARE = 0.5
# Factored layers in float32 on the CPU (see _factored_moments): entries whose centred sum of
# squares is below this share of their sum of squares are summed again in float64; if more than
# MAX_RESUMMED of a layer's entries are, the whole layer is.
CANCELLATION = 0.25
MAX_RESUMMED = 0.02
# The factored path's batched forward is checked against this many examples of each chunk (evenly
# spaced), each evaluated alone by vmap.
CHECKED_EXAMPLES = 4
# chunk_size="auto": the per-example gradients of one chunk may take this much memory (bytes):
# on CUDA this share of the free memory (what the driver reports free plus what PyTorch's caching
# allocator holds unused), at most the cap; elsewhere the fixed CPU budget.
CUDA_FREE_SHARE = 0.25
CUDA_BUDGET = 2 * 2**30
CPU_BUDGET = 256 * 2**20
# Without stiffness, chunks on the CPU are kept to this estimated working set: past it the caches
# stop holding a chunk's activations and per-example gradients. Measured on this project's 2-core
# VM (32 MiB L3; benchmarks/RESULTS.md): a CNN with 32 channels at 32×32 (600 KiB an example)
# took 86 ms in chunks of 86 to 128 examples against 172 ms for the whole batch of 256, while
# LeNet-5 (130 KiB) and an MLP (14 KiB) were fastest in one chunk.
CPU_CACHE_BUDGET = 64 * 2**20
# Per-parameter work on a chunk is done in blocks of at most this many entries of a parameter
# tensor (the moments' float64 scratch, the class sums), so that no temporary grows with the
# largest tensor (a GPT-2 embedding has 38.6M entries).
BLOCK = 2**22
# The class sums of a chunk, (classes in it) × (entries of a parameter tensor), in blocks of at
# most this many numbers.
CLASS_BLOCK = 2**20


class VmapUnsupportedError(RuntimeError):
    """``torch.func.vmap`` cannot compute the per-example gradients of this model."""


@dataclass(frozen=True, eq=False)
class Coherence:
    """Per-example gradient statistics of one batch (all values float64 on the CPU).

    Attributes:
        alpha: coherence α = ‖ḡ‖² / mean_i ‖g_i‖², in [0, 1]; 1 when all g_i are equal.
            NaN when every per-example gradient is zero.
        alpha_orthogonal: α⊥ = 1/m, the value of α if all g_i were orthogonal.
        m_coherence: α/α⊥ = ‖Σ g_i‖² / Σ ‖g_i‖², in [0, m] (a count of examples): 1 for
            orthogonal gradients, m for identical ones.
        per_class: {class label: m-coherence of that class's examples alone} (‖Σ_{i∈c} g_i‖² /
            Σ_{i∈c} ‖g_i‖², in [0, m_c]); empty when there are no class labels.
        class_counts: {class label: number of examples of that class in the batch}.
        stiffness_within: mean of cos(g_i, g_j) over ordered pairs i ≠ j of the same class,
            in [−1, 1]; NaN without stiffness, class labels or such pairs.
        stiffness_between: mean of cos(g_i, g_j) over pairs of different classes; NaN likewise.
        stiffness_mean: mean of cos(g_i, g_j) over all pairs i ≠ j (defined without classes).
        stiffness: the m×m matrix of cos(g_i, g_j) (diagonal 1), or None if not computed.
            Examples with a zero gradient have NaN rows and are left out of every mean.
        class_stiffness: (C, C) matrix of mean cos(g_i, g_j) for i in class ``classes[a]``,
            j in class ``classes[b]`` (i ≠ j), or None.
        classes: the class labels, sorted, in the order of ``class_stiffness`` (empty if none).
        labels: (m,) the class label of each example (empty if none).
        gsnr: mean over parameter entries of r_k = mean_i(g_ik)² / var_i(g_ik), with the
            population variance var_i = (1/m) Σ_i (g_ik − mean_i g_ik)² (the batch is the
            distribution); dimensionless. Entries with constant gradients are excluded (below).
        gsnr_per_layer: {layer: mean r_k over that layer's entries}; a layer is the module owning
            the parameter (its name without the last dotted component). NaN for a layer whose
            entries are all excluded.
        gsnr_excluded: number of parameter entries left out of the GSNR because their gradient
            variance is zero (at most 1e-12 of their mean squared gradient).
        noise_scale: B_simple = tr(Σ)/‖G‖², in examples: the batch size above which larger
            batches stop paying off. +inf when the unbiased estimate of ‖G‖² is ≤ 0 (the batch
            gradient is indistinguishable from noise: the noise scale exceeds what this batch
            can resolve; measure on a larger batch); NaN when tr(Σ) = 0 and ‖G‖² ≤ 0.
        trace_sigma: tr(Σ) ≈ (1/(m−1)) Σ ‖g_i − ḡ‖², the per-example gradient variance
            (squared loss-gradient units).
        grad_sq_norm: ‖G‖² ≈ ‖ḡ‖² − tr(Σ)/m, the unbiased estimate of the squared norm of the
            true gradient (can be ≤ 0).
        mean_grad_norm: ‖ḡ‖, the norm of the batch gradient.
        grad_norms: (m,) array of ‖g_i‖ in batch order: which examples dominate the gradient.
        size: m, the number of examples.
        method: how the per-example gradients were taken: "vmap" (torch.func, chunked) or "loop"
            (one backward pass per example, the fallback for models vmap cannot run); "hooks"
            when every parameter's came from layer hooks (one batched pass), "hooks + vmap" or
            "hooks + loop" when the others came by vmap or the loop.
        accumulation_dtype: the dtype of the sums across chunks ("float64"; within a chunk the
            parameters' dtype is used).
    """

    alpha: float
    alpha_orthogonal: float
    m_coherence: float
    per_class: dict[int, float]
    class_counts: dict[int, int]
    stiffness_within: float
    stiffness_between: float
    stiffness_mean: float
    stiffness: np.ndarray | None = field(repr=False)
    class_stiffness: np.ndarray | None = field(repr=False)
    classes: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    gsnr: float
    gsnr_per_layer: dict[str, float]
    gsnr_excluded: int
    noise_scale: float
    trace_sigma: float
    grad_sq_norm: float
    mean_grad_norm: float
    grad_norms: np.ndarray = field(repr=False)
    size: int
    method: str = "vmap"
    accumulation_dtype: str = "float64"
    notes: tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------- helpers


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _batchnorm_layers(model: nn.Module) -> list[str]:
    return [n or type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_mode(model: nn.Module, mode: Mode) -> None:
    """Raise if per-example gradients are ill-defined: train mode with BatchNorm layers."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if mode == "train":
        bn = _batchnorm_layers(model)
        if bn:
            raise ValueError(
                f"per-example gradients are ill-defined in train mode for a model with BatchNorm "
                f"(layers {bn}): with batch statistics each example's output depends on every "
                "other example of the batch, so ℓ_i is not a function of example i alone. Measure "
                "with mode='eval' (running statistics), or replace BatchNorm by GroupNorm/LayerNorm"
            )


def class_labels(targets: Any, size: int) -> Tensor | None:
    """The targets as class labels, if they are integer labels of shape (m,); else None."""
    if isinstance(targets, Tensor) and targets.dim() == 1 and targets.shape[0] == size \
            and not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool:
        return targets
    return None


def _failing_module(model: nn.Module, err: BaseException) -> str | None:
    """The innermost module of ``model`` whose code was running when ``err`` was raised."""
    names = {id(m): (n or "<model>", type(m).__name__) for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    return None if found is None else f"{found[0]!r} ({found[1]})"


class _NotFactorable(Exception):
    """The hooked layers' per-example gradients cannot be taken from one batched pass (the vmap
    path is used)."""


def _restricted(fn: ModelFunction, params: Sequence[str] | None = None, batch: tuple[Any, Any] | None = None,
                size: int | None = None) -> ModelFunction:
    """``fn`` differentiating only ``params`` (the others held fixed), or on the examples
    ``batch`` (``size`` of them): a shallow copy sharing every tensor. A new ModelFunction would
    copy the buffers again, and for a half-precision model widen every parameter again."""
    new = copy.copy(fn)
    if params is not None:
        new.params = {n: fn.params[n] for n in params}
        new.fixed = {**fn.fixed, **{n: t for n, t in fn.params.items() if n not in new.params}}
    if batch is not None:
        new.inputs, new.targets = batch
        new.size = size
    return new


Group = list[tuple[int, Rep]]  # (index of the parameter in fn.params, its per-example gradients)


class _Gradients:
    """Per-example gradients of any example range, one representation per parameter tensor: an
    (n, P_k) matrix in the parameters' dtype (by vmap, the loop, or a layer's hook rule), or for
    the weights of linear layers on (batch, features) inputs the factors of g_i = δ_i a_iᵀ
    (:class:`Outer`; their biases :class:`BiasOf`). A chunk comes as a stream of groups, one per
    hooked layer and then one for the parameters taken by vmap, so that the consumer can reduce
    and free each before the next is formed: at most one hooked layer's gradients exist at a time.

    The examples are taken in batch order, or in ``order`` (a device index of the batch) when it
    is set: coherence sorts them by class when per-class sums must be carried across chunks.

    The hooked path (:mod:`dynlens.measures.layer_grads`) is checked without waiting on the
    device: each chunk's batched per-example losses of a few examples are compared with those
    examples evaluated alone, and the comparisons are and-ed into one device flag that
    :meth:`verified` reads once, after the last chunk."""

    def __init__(self, fn: ModelFunction, fallback: Fallback, hooks: bool | Literal["auto"] = True) -> None:
        self.fn = fn
        self.chunk_size = 64
        self.agrees: Tensor | None = None  # device bool: every checked chunk matched the reference
        self.fallback = fallback
        self.method = "vmap"
        self.notes: list[str] = []
        self.order: Tensor | None = None
        self.index = {name: k for k, name in enumerate(fn.params)}
        self.layers: list[HookedLayer] = hookable_layers(fn.model, fn.params) if hooks is not False else []
        hooked = sum(fn.params[p].numel() for layer in self.layers for p in layer.params)
        if hooked < HOOKED_SHARE * fn.num_params:
            self.layers = []  # the vmap pass dominates; a batched pass on top would only add
        self.rest: ModelFunction | None = None
        if self.layers:
            taken = {p for layer in self.layers for p in layer.params}
            rest = [n for n in fn.params if n not in taken]
            if rest:
                self.rest = _restricted(fn, rest)

    @property
    def hooked(self) -> bool:
        return bool(self.layers)

    @property
    def description(self) -> str:
        if not self.layers:
            return self.method
        return "hooks" + (f" + {self.method}" if self.rest is not None else "")

    def bytes_per_example(self) -> int:
        """An estimate of one example's per-example gradients, for the chunk size's speed rule:
        P_k entries in the parameters' dtype per parameter by vmap; for a hooked layer its input,
        output gradient and representation (:meth:`HookedLayer.bytes_per_example`)."""
        taken = {p for layer in self.layers for p in layer.params}
        total = sum(t.numel() * t.element_size() for n, t in self.fn.params.items() if n not in taken)
        total += sum(layer.bytes_per_example() for layer in self.layers)
        return max(total, 1)

    def drop_hooks(self, why: str | None = None) -> None:
        """Take every parameter's gradients by vmap from now on (with a note saying ``why``)."""
        if why is not None:
            self.notes.append(f"layer hooks not used ({why}); all gradients by vmap")
        self.layers, self.rest, self.agrees = [], None, None

    def pairs_prefer_vmap(self, chunk: int, m: int, stiffness: bool) -> bool:
        """Whether ``hooks="auto"`` should take vmap instead: on GPUs, for stiffness over a batch
        split into chunks, when the model has convolutions. Stiffness visits every pair of chunks,
        each visit a new pass, and the hooks' chunks (their estimate counts the patches) are
        smaller; on an H100 a ResNet-18 took 102 against 56 ms (width 16, m = 256) and 247
        against 159 (width 64, m = 64), while the hooks won without stiffness (42 against 55, 68
        against 71) and for small CNNs whose batch is one chunk (c32: 3.7 against 4.5 ms with
        stiffness, replayed; benchmarks/RESULTS.md). On the CPU the hooks won everywhere."""
        return (stiffness and chunk < m and self.fn.device.type != "cpu"
                and any(layer.kind == "conv" for layer in self.layers))

    def verified(self) -> bool:
        """Whether every factored chunk's batched losses matched the examples evaluated alone
        (one device-to-host read)."""
        return self.agrees is None or bool(self.agrees)

    def _examples(self, start: int, stop: int) -> tuple[Any, Any]:
        """Inputs and targets of examples start:stop (views), or of those positions of ``order``."""
        fn = self.fn
        if self.order is None:
            return slice_examples(fn.inputs, start, stop), slice_examples(fn.targets, start, stop)
        index = self.order[start:stop]

        def take(t: Any) -> Any:
            return t.index_select(0, index) if isinstance(t, Tensor) and t.dim() > 0 else t

        return tree_map(take, fn.inputs), tree_map(take, fn.targets)

    def _reference_losses(self, x: Any, y: Any, step: int) -> Tensor:
        """ℓ_i of the checked examples 0, step, 2·step, ... of the chunk (x, y), each evaluated
        alone (vmap): the batched forward must match them. A layer that mixes examples changes
        every example's loss; Python control flow on tensor values, which the batched forward
        would take for the whole batch, makes vmap fail."""
        fn = self.fn
        n = batch_size(x)
        x, y = slice_examples(x, 0, n, step), slice_examples(y, 0, n, step)
        try:
            alone = torch.func.vmap(fn._example_loss, in_dims=(None, _example_dims(x), _example_dims(y)),
                                    randomness="different")
            return alone(fn.params, x, y).detach()
        except OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - the dense path reports or works around it
            raise _NotFactorable(f"{type(err).__name__} evaluating examples alone") from err

    def chunk(self, start: int, stop: int) -> Iterator[Group]:
        """The chunk's per-example gradients as a stream of groups (see the class); the hooked
        path raises :class:`_NotFactorable` when the hooked layers' gradients cannot be taken from
        one batched pass (the caller drops the hooks and starts over)."""
        x, y = self._examples(start, stop)
        if self.layers:
            return self._hooked(x, y, stop - start)
        return iter([self._dense(self.fn, x, y, stop - start)])

    def _dense(self, fn: ModelFunction, x: Any, y: Any, n: int) -> Group:
        fn = _restricted(fn, batch=(x, y), size=n)
        if self.method != "loop":
            try:
                grads = fn.per_example_grads_of(0, n)
            except OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any vmap failure is reported or worked around
                self._vmap_failed(err)
                grads = fn.per_example_grads_loop(0, n)
        else:
            grads = fn.per_example_grads_loop(0, n)
        return [(self.index[name], grads.pop(name).reshape(n, -1)) for name in list(grads)]

    def _hooked(self, x: Any, y: Any, n: int) -> Iterator[Group]:
        """One batched forward with hooks on the layers, the per-example losses
        (:func:`dynlens.functional.example_losses`), one backward to the layers' outputs: their
        inputs and δ_i, from which each layer's rule gives its per-example gradients, one layer
        at a time. Then the check against examples evaluated alone, and the other parameters'
        gradients by vmap (a pass of its own, after this one's tensors are freed)."""
        fn = self.fn
        records: dict[str, list[tuple[Tensor, Tensor] | None]] = {layer.name: [] for layer in self.layers}

        def recorder(layer: HookedLayer) -> Callable[..., Tensor | None]:
            def hook(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
                saved = layer.saved(args, output, n)
                if saved is None:
                    records[layer.name].append(None)
                    return None
                z = output if output.requires_grad else output.detach().requires_grad_(True)
                records[layer.name].append((saved, z))
                return z

            return hook

        handles = [layer.module.register_forward_hook(recorder(layer)) for layer in self.layers]
        try:
            with torch.enable_grad():
                out = fn.outputs(None, x)
        finally:
            for handle in handles:
                handle.remove()
        for layer in self.layers:
            calls = records[layer.name]
            if len(calls) != 1 or calls[0] is None:
                raise _NotFactorable(f"layer {layer.name!r} is called {len(calls)} times or not on a "
                                     "batched input")
        if not (isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == n
                and isinstance(y, Tensor) and y.dim() > 0 and y.shape[0] == n):
            raise _NotFactorable("outputs and targets are not tensors with a batch dimension")

        with torch.enable_grad():
            losses = example_losses(fn.loss_fn, out, y)
        del out
        saved: list[Tensor | None] = [records[layer.name][0][0] for layer in self.layers]
        outputs = [records[layer.name][0][1] for layer in self.layers]
        records.clear()
        with torch.enable_grad():
            deltas: list[Tensor | None] = list(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
        deltas = [torch.zeros_like(z) if d is None else d.detach() for z, d in zip(outputs, deltas, strict=True)]
        losses = losses.detach()
        del outputs
        for k, layer in enumerate(self.layers):
            reps = layer.gradients(saved[k], deltas[k], n)
            saved[k] = deltas[k] = None
            yield [(self.index[name], reps.pop(name)) for name in list(reps)]
        # the check last, when this pass's tensors are freed: its forward then adds to nothing
        step = -(-n // CHECKED_EXAMPLES)
        reference = self._reference_losses(x, y, step)
        # rounding differs between a batch and one example: 1e-10 in float64, 1e-4 in float32,
        # 8 units of the last place in 16-bit types (a layer mixing examples changes far more)
        tolerance = 1e-10 if losses.dtype == torch.float64 else max(1e-4, 8 * torch.finfo(losses.dtype).eps)
        agrees = torch.isclose(losses[::step], reference, rtol=tolerance, atol=tolerance).all()
        self.agrees = agrees if self.agrees is None else self.agrees & agrees
        if self.rest is not None:
            yield self._dense(self.rest, x, y, n)

    def _vmap_failed(self, err: BaseException) -> None:
        where = _failing_module(self.fn.model, err)
        what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        place = f" in layer {where}" if where else ""
        if self.fallback == "error":
            raise VmapUnsupportedError(
                f"per-example gradients by torch.func.vmap failed{place}: {what}. vmap cannot run "
                "in-place operations on batched tensors (e.g. x.add_(...), ReLU(inplace=True)) or "
                "Python control flow that depends on tensor values (if x.sum() > 0). Rewrite that "
                "layer out-of-place / with torch.where, or pass fallback='loop' (one backward pass "
                "per example: same numbers, slower)"
            ) from err
        self.method = "loop"
        note = (f"vmap failed{place} ({what}); per-example gradients computed by a loop of one "
                "backward pass per example")
        self.notes.append(note)
        warnings.warn(f"dynlens: {note}", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- memory


def auto_chunk_size(bytes_per_example: int, m: int, device: torch.device, pairs: bool = False) -> int:
    """The chunk size of ``chunk_size="auto"`` for speed, m examples whose per-example gradients
    take ``bytes_per_example`` each: on CUDA ``CUDA_FREE_SHARE`` of the free memory
    (``torch.cuda.mem_get_info`` plus what the caching allocator holds unused), at most
    ``CUDA_BUDGET``; elsewhere ``CPU_BUDGET``, or without ``pairs`` the smaller
    ``CPU_CACHE_BUDGET``. With ``pairs`` (stiffness over several chunks holds two at a time) the
    budget is split in two. The batch is then cut into that many chunks of equal size (no small
    remainder chunk). A memory limit is applied on top (:func:`memory_model`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(int(free * CUDA_FREE_SHARE), CUDA_BUDGET)
    else:
        budget = CPU_BUDGET if pairs else min(CPU_BUDGET, CPU_CACHE_BUDGET)
    chunk = budget // bytes_per_example
    if pairs and chunk < m:
        chunk = budget // (2 * bytes_per_example)
    return _equal_chunks(max(1, chunk), m)


def _equal_chunks(chunk: int, m: int) -> int:
    """The size of equal chunks, at most ``chunk``, that cut m examples into as few as ``chunk`` allows."""
    chunk = int(max(1, min(m, chunk)))
    pieces = -(-m // chunk)
    return -(-m // pieces)


# The memory model (memory_model): a pass over a chunk holds up to this many times the
# activations a gradient of its examples saves (_footprint), besides the output gradients and
# per-example gradients it forms. Measured with benchmarks/coherence_memory.py, beyond those:
# the hooked pass of a GPT-2-sized decoder (width 128, CPU) 1.1 times, of a ResNet-18 (width 16)
# less than once; vmap of grad 1.8 times (the ResNet-18, CPU), 2.5 (the small decoder, CPU) and
# 2.35 (GPT-2 124M, 512 tokens, H200: its tied embedding's per-example gradients are formed
# twice and added).
HOOKS_ACTIVATIONS = 1.5
VMAP_ACTIVATIONS = 3.0
# On CUDA the caching allocator rounds blocks up (to 512 bytes, and a large one may keep up to
# 1 MiB of its segment) and cuDNN and cuBLAS take workspaces: the model's estimate is raised by
# this share, plus the fixed reserve, before it is compared with the limit. On an H200 the
# measured peaks of the reference jobs were 0.6 (ResNet-18) and 0.8 (GPT-2) of the estimate.
CUDA_MARGIN = 0.1
CUDA_RESERVE = 64 * 2**20


@dataclass(frozen=True)
class MemoryModel:
    """The most bytes a coherence measurement holds at once beyond what was allocated before it,
    for chunks of n examples (:meth:`peak`):

        peak(n) = max(fixed + n · per_example + min(min(C, n) · per_class, class_cap), finish)
        peak(m) = max(whole, finish)                 (one chunk of the whole batch)

    on CUDA raised by ``margin``. Built by :func:`memory_model`.

    Attributes:
        fixed: bytes that do not grow with the chunk: the float64 mean and centred sum of squares
            of every parameter entry (16 bytes each), ‖g_i‖², the moments' scratch of one block
            of a parameter tensor (float64) and its temporaries, a factored layer's float32 sums;
            with classes the running sum of the class that goes on into the next chunk (8 bytes
            per entry: the examples are sorted by class, so one class at a time is open); with
            stiffness the m × m Gram matrix and its by-products.
        per_example: bytes per example of the chunk, the larger of its passes: the activations a
            gradient saves (:meth:`~dynlens.functional.ModelFunction.activation_bytes`) times
            ``HOOKS_ACTIVATIONS``, every hooked layer's output gradient and the largest layer's
            per-example gradients (hooked pass); the activations times ``VMAP_ACTIVATIONS`` and
            the per-example gradients of every parameter vmap takes (they come together); with
            stiffness over several chunks the representations of two chunks.
        classes: C, the number of classes (0 without per-class statistics).
        per_class: bytes of one class's sums over a parameter tensor (the largest), in the
            parameters' dtype and float64, squared; a chunk holds at most min(C, n) classes.
        class_cap: the most those sums take (they are formed in blocks of ``CLASS_BLOCK`` numbers).
        whole: the peak for one chunk of all m examples (no class carried, one chunk held).
        finish: the reduction after the last chunk (the accumulators and the GSNR's mask).
        margin: (share, bytes) added on CUDA: ``CUDA_MARGIN`` and ``CUDA_RESERVE``.
    """

    fixed: int
    per_example: int
    classes: int
    per_class: int
    class_cap: int
    whole: int
    finish: int
    margin: tuple[float, int] = (0.0, 0)

    def peak(self, chunk: int, m: int) -> int:
        """The predicted peak (bytes, the margin included) for chunks of ``chunk`` of m examples."""
        if chunk >= m:
            raw = self.whole
        else:
            raw = (self.fixed + chunk * self.per_example
                   + min(min(self.classes, chunk) * self.per_class, self.class_cap))
        return int(max(raw, self.finish) * (1 + self.margin[0])) + self.margin[1]

    def largest_chunk(self, memory: int, m: int) -> int:
        """The most examples per chunk whose peak fits ``memory`` bytes (0 if not even one)."""
        if self.peak(m, m) <= memory:
            return m
        low, high = 0, m - 1  # peak grows with the chunk: bisect for the last that fits
        while low < high:
            middle = (low + high + 1) // 2
            if self.peak(middle, m) <= memory:
                low = middle
            else:
                high = middle - 1
        return low


def _footprint(fn: ModelFunction) -> tuple[int, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """(bytes a gradient saves for one example, {hookable layer: (its input's shape, its output's
    shape) for that example}): one forward pass of one example, nothing kept.

    The bytes are counted as :meth:`~dynlens.functional.ModelFunction.activation_bytes` counts
    them (each storage the graph saves once, parameters and buffers left out), and the batch left
    out too (a saved input is a view of the whole batch's storage, allocated before the
    measurement), with the saved tensors packed detached: packed as they are, a saved output
    refers to the node that saves it, a cycle that keeps the graph alive after the pass."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    batch = [t for t in tree_flatten((fn.inputs, fn.targets))[0] if isinstance(t, Tensor)]
    owned = {t.untyped_storage().data_ptr() for t in (*fn.params.values(), *fn.fixed.values(),
                                                      *fn.buffers.values(), *batch)}
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t.detach()

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))

        return hook

    handles = [layer.module.register_forward_hook(recorder(layer.name))
               for layer in hookable_layers(fn.model, fn.params)]
    leaves = {n: t.detach().requires_grad_(True) for n, t in fn.params.items()}
    x, y = slice_examples(fn.inputs, 0, 1), slice_examples(fn.targets, 0, 1)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn._loss_of(fn.outputs(leaves, x), y)
    finally:
        for handle in handles:
            handle.remove()
    return total, shapes


def _memory_model(source: _Gradients, footprint: tuple[int, dict], m: int, stiffness: bool,
                  classes: int) -> MemoryModel:
    """:class:`MemoryModel` of measuring ``source``'s model on m examples (``classes`` labels, 0
    without per-class statistics), from its :func:`_footprint`."""
    fn = source.fn
    activation, shapes = footprint
    itemsize = max(t.element_size() for t in fn.params.values())
    # a chunk's examples, gathered when they are taken in class order
    examples = sum(t.numel() * t.element_size() for t in tree_flatten((fn.inputs, fn.targets))[0]
                   if isinstance(t, Tensor)) // max(fn.size, 1)
    total = fn.num_params
    largest = max(t.numel() for t in fn.params.values())
    block = min(largest, BLOCK)
    taken = {p for layer in source.layers for p in layer.params}
    by_vmap = sum(t.numel() for n, t in fn.params.items() if n not in taken) * itemsize
    # the hooked pass: the backward pass holds the activations and the output gradients made so
    # far; then layer k's gradients are formed while the output gradients and inputs of the
    # layers after it are still held (and for stiffness the earlier layers' gradients)
    layers = [layer.memory(*shapes.get(layer.name, ((1, 0), (1, 0))), itemsize, fn.device)
              for layer in source.layers]
    held = sum(layer.held for layer in layers)
    kept = sum(layer.kept for layer in layers)
    reducing = 0
    for k, layer in enumerate(layers):
        earlier = sum(other.kept for other in layers[:k]) if stiffness else 0
        later = sum(other.held + other.saved for other in layers[k:])
        reducing = max(reducing, earlier + later + layer.working)
    factored = max([fn.params[layer.weight].numel() for layer in source.layers
                    if layer.kind == "linear" and layer.weight is not None
                    and len(shapes.get(layer.name, ((),))[0]) == 2] or [0])
    kept_all = kept + by_vmap
    # a chunk's moments: one block of float64 scratch (2 × 8 bytes; a factored layer is one
    # block) and of temporaries in the parameters' dtype (2 × itemsize); a factored layer's float32
    # sums (3 × 4 bytes)
    fixed = 16 * total + 16 * m + 16 * max(block, factored) + 2 * itemsize * block + 12 * factored
    per_class = (itemsize + 16) * largest if classes else 0
    class_cap = (itemsize + 16) * CLASS_BLOCK
    whole = fixed + min(classes * per_class, class_cap)
    if classes:
        fixed += 8 * total
    if stiffness:
        fixed += 4 * 8 * m * m  # the Gram matrix, its cosines, weights and one more product
        whole += 4 * 8 * m * m
    passes = [0.0]
    if by_vmap or not source.layers:  # vmap, or the loop's rows and their stack (after the hooked
        # layers, whose gradients stiffness keeps)
        passes += [VMAP_ACTIVATIONS * activation + by_vmap + (kept if stiffness else 0),
                   2 * by_vmap + (kept if stiffness else 0)]
    if source.layers:
        passes += [HOOKS_ACTIVATIONS * activation + held, reducing]
        passes.append(activation)  # the check of examples evaluated alone, a forward pass
    per_example = int(max(passes)) + examples
    whole += m * per_example
    if stiffness:
        per_example += kept_all  # the chunk held while the others are formed
    margin = (CUDA_MARGIN, CUDA_RESERVE) if fn.device.type == "cuda" else (0.0, 0)
    return MemoryModel(int(fixed), per_example, classes, per_class, class_cap, int(whole),
                       17 * total + 16 * m, margin)


def memory_model(fn: ModelFunction, *, stiffness: bool = True, hooks: bool | Literal["auto"] = "auto",
                 classes: Tensor | Sequence[int] | np.ndarray | bool | None = None) -> MemoryModel:
    """The :class:`MemoryModel` of :func:`coherence_of` on ``fn``'s batch with these options:
    what ``memory=`` is checked against. Cost: one forward pass of one example."""
    source = _Gradients(fn, "loop", hooks)
    labels = _resolve_classes(fn, classes, fn.size)
    count = 0 if labels is None else len(torch.unique(labels))
    return _memory_model(source, _footprint(fn), fn.size, stiffness, count)


def _too_small(plan: MemoryModel, memory: int, m: int) -> MemoryBudgetTooSmall:
    need = plan.peak(1, m)
    return MemoryBudgetTooSmall(
        f"gradient coherence needs about {_gib(need)} on one example at a time "
        f"({_gib(plan.fixed)} for the sums over all parameters, {_gib(plan.per_example)} per example "
        f"of a chunk) and {_gib(max(memory, 0))} is allowed; allow more memory (memory_budget=), "
        "turn stiffness off, or measure fewer parameters"
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- measurement


@dataclass
class _Part:
    """One chunk of a batch sorted by class: its classes lo, ..., lo + classes − 1 (each has
    examples in it), whether the first began in the chunk before and the last goes on into the
    next, its rows' one-hot class matrix (n, classes) by dtype and its layout for factored layers
    (:meth:`_Classes.layout`)."""

    lo: int
    classes: int
    carried_in: bool
    continues: bool
    onehot: dict[torch.dtype, Tensor]
    layout: tuple[Tensor, Any] | None


@dataclass
class _Classes:
    """Class labels of the batch: the sorted label values, each example's class index (on the
    device and on the host), the layout that sums a factored layer by class in a chunk of the
    whole batch, and for a batch measured in chunks sorted by class the order and each chunk's
    :class:`_Part`."""

    values: Tensor
    index: Tensor
    host_index: np.ndarray
    onehot: dict[torch.dtype, Tensor] = field(default_factory=dict)
    layouts: dict[tuple[int, int], tuple[Tensor, Any]] = field(default_factory=dict)
    order: Tensor | None = None
    parts: dict[tuple[int, int], _Part] = field(default_factory=dict)

    def prepare(self, bounds: list[tuple[int, int]], dtypes: set[torch.dtype], factored: bool,
                by_class: bool) -> None:
        """Make every device tensor the chunks need before the first chunk is queued: copies
        from the host made inside the loop would wait for the device to finish its queue.
        ``by_class``: the chunks are of the batch sorted by class."""
        device, classes = self.index.device, len(self.values)
        if not by_class:
            for dtype in dtypes:
                self.onehot_as(dtype)
            if factored:
                for start, stop in bounds:
                    if (start, stop) not in self.layouts:
                        self.layouts[start, stop] = self.layout(self.host_index[start:stop], classes)
            return
        order = np.argsort(self.host_index, kind="stable")
        if self.order is None:
            self.order = torch.as_tensor(order, device=device)
        ranks = self.host_index[order]
        for start, stop in bounds:
            if (start, stop) in self.parts:
                continue
            lo = int(ranks[start])
            local = ranks[start:stop] - lo
            count = int(local[-1]) + 1
            rows = torch.as_tensor(local, device=device)
            self.parts[start, stop] = _Part(
                lo, count, start > 0 and ranks[start - 1] == lo,
                stop < len(ranks) and ranks[stop] == ranks[stop - 1],
                {dtype: torch.nn.functional.one_hot(rows, count).to(dtype) for dtype in dtypes},
                self.layout(local, count) if factored else None)

    def onehot_as(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self.onehot:
            self.onehot[dtype] = torch.nn.functional.one_hot(self.index, len(self.values)).to(dtype)
        return self.onehot[dtype]

    def layout(self, index: np.ndarray, classes: int) -> tuple[Tensor, int] | tuple[Tensor, list[int]]:
        """How to sum a factored chunk whose rows have the class indices ``index`` (of
        ``classes``) by class with few kernels. Balanced enough (C × the largest class ≤ 2n): (an
        index of shape (C, L) into the chunk's rows, padded with n, a zero row; L). Otherwise:
        (the order that sorts the chunk by class, the class sizes). Built on the host: no device
        sync."""
        n = len(index)
        sizes = np.bincount(index, minlength=classes)
        order = np.argsort(index, kind="stable")
        if classes * sizes.max() > 2 * n:
            return torch.as_tensor(order, device=self.index.device), sizes.tolist()
        width = int(sizes.max())
        padded = np.full((classes, width), n, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rank = np.arange(n) - offsets[index[order]]
        padded[index[order], rank] = order
        return torch.as_tensor(padded, device=self.index.device), width


def coherence_of(
    fn: ModelFunction,
    chunk_size: ChunkSize = "auto",
    stiffness: bool = True,
    classes: Tensor | Sequence[int] | np.ndarray | bool | None = None,
    fallback: Fallback = "loop",
    hooks: bool | Literal["auto"] = "auto",
    graphs: bool | Literal["auto"] = "auto",
    memory: int | None = None,
) -> Coherence:
    """Gradient coherence of ``fn``'s batch (see :func:`gradient_coherence`; call it inside
    :func:`dynlens.functional.isolated`, as probes do through ``ctx.fn``)."""
    m = fn.size
    if m < 2:
        raise ValueError(f"gradient coherence needs at least 2 examples; the batch has {m}")
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
        raise ValueError(f"chunk_size must be 'auto' or a positive number of examples, got {chunk_size!r}")
    labels = _resolve_classes(fn, classes, m)
    if hooks not in (True, False, "auto"):
        raise ValueError(f"hooks must be True, False or 'auto', got {hooks!r}")
    source = _Gradients(fn, fallback, hooks)
    names = list(fn.params)
    device = fn.device
    group = None
    if labels is not None:
        host_labels = labels.cpu()
        values, index = torch.unique(host_labels, return_inverse=True)
        group = _Classes(values, index.to(device), index.numpy())

    layer_of = [_layer_of(name) for name in names]
    layers = list(dict.fromkeys(layer_of))
    layer_index = torch.tensor([layers.index(layer) for layer in layer_of], device=device)
    sizes = [t.numel() for t in fn.params.values()]

    footprint = None  # measured once, when memory is limited

    def chunk_of() -> int:
        """The chunk size: "auto"'s speed rule or the given size, at most what fits ``memory``
        (then in equal parts), or MemoryBudgetTooSmall before anything is allocated."""
        nonlocal footprint
        if chunk_size == "auto":
            chunk = auto_chunk_size(source.bytes_per_example(), m, device, pairs=stiffness)
        else:
            chunk = min(chunk_size, m)
        if memory is None:
            return chunk
        if footprint is None:
            footprint = _footprint(fn)
        plan = _memory_model(source, footprint, m, stiffness, 0 if group is None else len(group.values))
        fits = plan.largest_chunk(memory, m)
        if fits < 1:
            raise _too_small(plan, memory, m)
        return chunk if chunk <= fits else _equal_chunks(fits, m)

    chunk = chunk_of()
    if hooks == "auto" and source.pairs_prefer_vmap(chunk, m, stiffness):
        source.drop_hooks()
        hooks = False
        chunk = chunk_of()
    per_example = source.bytes_per_example()
    packed = stiff = key = None
    if _graphable(fn, graphs, chunk, per_example, stiffness):
        key = _graph_key(fn, chunk, stiffness, hooks, fallback, None if labels is None else host_labels)
        packed, stiff, method, notes = _graphed(fn, key, group, chunk, stiffness, fallback, hooks,
                                                layer_index, len(layers))
    if packed is None:
        hooked = source.hooked
        while True:
            source.chunk_size = chunk
            try:
                sums = _accumulate(source, chunk, group, stiffness)
                if source.verified():
                    break
                why = "the batched forward differs from evaluating examples alone"
            except _NotFactorable as err:
                why = str(err)
            source.drop_hooks(why)
            chunk = chunk_of()
        packed, stiff = _reduce(sums, sizes, layer_index, len(layers), group, m)
        method, notes = source.description, list(source.notes)
        if key is not None and source.hooked == hooked and source.method != "loop":
            cudagraphs.graphs().saw(key)
        if key is not None and key in cudagraphs.graphs().failed:
            notes.append(f"not replayed from a CUDA graph: recording failed "
                         f"({cudagraphs.graphs().failed[key][:200]}); measured eagerly")

    # every number the result needs in one transfer to the host
    host = packed.cpu().tolist()
    mean_sq_norm, sum_sq_norms, centred_sum = host[:3]
    ratio_sums = host[3:3 + len(layers)]
    kept_counts = host[3 + len(layers):3 + 2 * len(layers)]
    offset = 3 + 2 * len(layers)
    grad_norms = np.asarray(host[offset:offset + m])
    offset += m
    alpha = mean_sq_norm / (sum_sq_norms / m) if sum_sq_norms > 0 else math.nan

    per_class: dict[int, float] = {}
    counts: dict[int, int] = {}
    if group is not None:
        classes_n = len(group.values)
        numerators_host = host[offset:offset + classes_n]
        class_sq_host = host[offset + classes_n:offset + 2 * classes_n]
        sizes_per_class = np.bincount(group.host_index, minlength=classes_n)
        for c, num, den, size in zip(group.values.tolist(), numerators_host, class_sq_host,
                                     sizes_per_class.tolist(), strict=True):
            per_class[int(c)] = num / den if den > 0 else math.nan
            counts[int(c)] = int(size)

    per_layer = {layer: (r / c if c > 0 else math.nan) for layer, r, c in zip(layers, ratio_sums, kept_counts, strict=True)}
    kept_total = sum(kept_counts)
    gsnr = sum(ratio_sums) / kept_total if kept_total > 0 else math.nan

    trace_sigma = centred_sum / (m - 1)
    grad_sq_norm = mean_sq_norm - trace_sigma / m
    if grad_sq_norm > 0:
        noise_scale = trace_sigma / grad_sq_norm
    else:
        noise_scale = math.inf if trace_sigma > 0 else math.nan

    matrix = class_matrix = None
    within = between = overall = math.nan
    if stiff is not None:
        matrix, class_matrix, (overall, within, between) = _stiffness_on_host(stiff, group is not None)

    return Coherence(
        alpha=alpha,
        alpha_orthogonal=1.0 / m,
        m_coherence=alpha * m,
        per_class=per_class,
        class_counts=counts,
        stiffness_within=within,
        stiffness_between=between,
        stiffness_mean=overall,
        stiffness=matrix,
        class_stiffness=class_matrix,
        classes=(group.values.numpy().astype(np.int64) if group is not None
                 else np.zeros(0, dtype=np.int64)),
        labels=(host_labels.numpy().astype(np.int64) if labels is not None
                else np.zeros(0, dtype=np.int64)),
        gsnr=gsnr,
        gsnr_per_layer=per_layer,
        gsnr_excluded=int(sum(sizes) - kept_total),
        noise_scale=noise_scale,
        trace_sigma=trace_sigma,
        grad_sq_norm=grad_sq_norm,
        mean_grad_norm=math.sqrt(mean_sq_norm),
        grad_norms=grad_norms,
        size=m,
        method=method,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- CUDA graphs

# Coherence on CUDA is replayed from a CUDA graph (dynlens.cudagraphs) when its per-example
# gradients of one chunk fit this many bytes (auto): small models, whose measurement is bound by
# launching kernels; the graph keeps that memory while it is cached (dynlens.cudagraphs: 2 graphs
# at most, freed by dynlens.cudagraphs.clear_graphs()).
GRAPH_MEMORY = 512 * 2**20


def _graphable(fn: ModelFunction, graphs: bool | str, chunk: int, bytes_per_example: int,
               stiffness: bool) -> bool:
    if graphs not in (True, False, "auto"):
        raise ValueError(f"graphs must be True, False or 'auto', got {graphs!r}")
    if graphs is False or fn.device.type != "cuda" or fn.model.training:
        return False
    held = chunk * bytes_per_example * (2 if stiffness and chunk < fn.size else 1)
    return graphs is True or held <= GRAPH_MEMORY


def _graph_key(fn: ModelFunction, chunk: int, stiffness: bool, hooks: bool | str, fallback: str,
               labels: Tensor | None) -> tuple:
    """Everything the recorded kernels depend on: the model's structure and hooks, the addresses,
    shapes and dtypes of its parameters and buffers, the batch's shapes and dtypes (its values
    are copied in), the options and the class labels (their layout is baked in)."""
    model = fn.model
    structure = tuple((name, type(module), len(module._forward_hooks), len(module._forward_pre_hooks))
                      for name, module in model.named_modules())
    tensors = tuple((name, t.data_ptr(), tuple(t.shape), t.dtype, t.requires_grad)
                    for name, t in (*model.named_parameters(), *model.named_buffers()))
    batch_leaves, spec = tree_flatten((fn.inputs, fn.targets))
    batch = tuple((tuple(x.shape), x.dtype) if isinstance(x, Tensor) else x for x in batch_leaves)
    return ("coherence", id(model), id(fn.loss_fn), structure, tensors, str(spec), batch, tuple(fn.params),
            chunk, stiffness, hooks, fallback, None if labels is None else labels.numpy().tobytes(), fn.seed)


def _graphed(fn: ModelFunction, key: tuple, group: _Classes | None, chunk: int, stiffness: bool,
             fallback: Fallback, hooks: bool | str, layer_index: Tensor, n_layers: int) -> tuple:
    """(packed, stiffness tensors, method, notes) of :func:`_accumulate` and :func:`_reduce`
    replayed from the graph of ``key`` (recorded now if the key was seen before), with the method
    and notes of the recorded run; four Nones when there is no graph or its per-example check
    failed (the caller computes eagerly)."""
    leaves, spec = tree_flatten((fn.inputs, fn.targets))
    inputs = [x for x in leaves if isinstance(x, Tensor)]

    def body(statics: list[Tensor]) -> tuple[Any, Any]:
        fresh = iter(statics)
        x, y = tree_unflatten([next(fresh) if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)
        inner = ModelFunction(fn.model, fn.loss_fn, (x, y), params=list(fn.params), seed=fn.seed)
        source = _Gradients(inner, fallback, hooks)
        source.chunk_size = chunk
        sums = _accumulate(source, chunk, group, stiffness)
        packed, stiff = _reduce(sums, [t.numel() for t in fn.params.values()], layer_index, n_layers,
                                group, fn.size)
        agrees = source.agrees if source.agrees is not None else torch.ones((), dtype=torch.bool, device=fn.device)
        # the graph reads the class layout and layer index made outside it, and its key names the
        # model and loss by id: the entry keeps them alive (an id is not reused while it is cached)
        return (packed, stiff, agrees), (source.description, list(source.notes),
                                         (group, layer_index, fn.model, fn.loss_fn))

    hit = cudagraphs.graphs().replay(key, inputs)
    if hit is None and key in cudagraphs.graphs().seen and key not in cudagraphs.graphs().failed:
        if group is not None:  # host-to-device copies cannot be recorded: make them first
            bounds = _chunk_bounds(fn.size, chunk)
            group.prepare(bounds, {t.dtype for t in fn.params.values()}, True,
                          _sorted_by_class(group, len(bounds), stiffness))
        hit = cudagraphs.graphs().record(key, inputs, body)
    if hit is None:
        return None, None, None, None
    (packed, stiff, agrees), (method, notes, _) = hit
    if not bool(agrees):
        return None, None, None, None
    return packed, stiff, f"{method} (CUDA graph)", notes


def _chunk_bounds(m: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``chunk`` examples of a batch of m (the last may be shorter)."""
    return [(start, min(start + chunk, m)) for start in range(0, m, chunk)]


def _sorted_by_class(group: _Classes | None, chunks: int, stiffness: bool) -> bool:
    """Whether the batch is measured sorted by class: per-class sums must then be carried across
    chunks (with stiffness the per-class norms come from the Gram matrix)."""
    return group is not None and chunks > 1 and not stiffness


def _accumulate(source: _Gradients, chunk_size: int, group: _Classes | None,
                stiffness: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One pass over the batch in chunks, all on the device with no host sync: (mean, centred
    sums of squares, ‖g_i‖², ‖Σ_{i∈c} g_i‖² per class or None, Gram matrix or None), float64.

    The per-class norms come from the Gram matrix when stiffness asks for it (block sums),
    from the class blocks of each factored layer's Gram matrix when the batch is one chunk, and
    otherwise from per-class sums Σ_{i∈c} g_i over the batch sorted by class, so that one class
    at a time is carried from a chunk into the next."""
    fn = source.fn
    bounds = _chunk_bounds(fn.size, chunk_size)
    by_class = _sorted_by_class(group, len(bounds), stiffness)
    if group is not None:
        group.prepare(bounds, {t.dtype for t in fn.params.values()}, source.hooked, by_class)
    source.order = group.order if by_class else None
    sums = _Sums(fn, group, len(bounds), stiffness, by_class)
    for a, (start, stop) in enumerate(bounds):
        if sums.gram is None:
            for piece in source.chunk(start, stop):
                sums.add(piece, start, stop)
        else:
            chunk = _in_order(source.chunk(start, stop), len(fn.params))
            sums.gram[start:stop, start:stop] = _dot(chunk, chunk)
            for other_start, other_stop in bounds[a + 1:]:
                block = _dot(chunk, _in_order(source.chunk(other_start, other_stop), len(fn.params)))
                sums.gram[start:stop, other_start:other_stop] = block
                sums.gram[other_start:other_stop, start:stop] = block.T
            # last: dense chunks are centred in place, so nothing may read them afterwards
            sums.add(list(enumerate(chunk)), start, stop)
            del chunk
        sums.count += stop - start  # the chunk is merged: the next one's moments are merged into it
    return sums.result()


def _in_order(pieces: Iterator[Group], count: int) -> list[Rep]:
    """A chunk's representations in ``fn.params`` order."""
    reps: list[Any] = [None] * count
    for piece in pieces:
        for k, rep in piece:
            reps[k] = rep
    return reps


class _Sums:
    """The running sums of one pass over the batch, on the device in float64: the mean and the
    centred sum of squares Σ_i (g_ik − ḡ_k)² of every parameter entry, ‖g_i‖², ‖Σ_{i∈c} g_i‖² per
    class, the Gram matrix. Filled one group of a chunk at a time (:meth:`add`), each group
    reduced, parameter tensor by parameter tensor, before the next is formed.

    A chunk's mean and centred sum of one parameter tensor are merged into the running ones by
    Chan et al.'s parallel update, in blocks of at most ``BLOCK`` entries through one float64
    scratch pair; the first chunk's are written straight into the accumulators (what adding them
    to zeros would give)."""

    def __init__(self, fn: ModelFunction, group: _Classes | None, chunks: int, stiffness: bool,
                 by_class: bool) -> None:
        m, device, f64 = fn.size, fn.device, torch.float64
        sizes = [t.numel() for t in fn.params.values()]
        offsets = np.cumsum([0, *sizes]).tolist()
        self.slices = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        self.total = offsets[-1]
        self.mean = self.centred = self.carry = self.scratch = None
        self.sq_norms = torch.zeros(m, dtype=f64, device=device)
        self.gram = torch.empty(m, m, dtype=f64, device=device) if stiffness else None
        self.group = group
        self.whole_by_class = group is not None and chunks == 1 and not stiffness
        self.by_class = by_class
        counted = self.whole_by_class or by_class
        self.class_norms = torch.zeros(len(group.values), dtype=f64, device=device) if counted else None
        self.block = min(max(sizes), BLOCK)
        self.count = 0

    def add(self, piece: Group, start: int, stop: int) -> None:
        """Reduce one group of the chunk start:stop (positions in the order the examples are
        taken) into the sums, emptying the list: dense representations are centred in place."""
        n = stop - start
        if self.mean is None:  # once the first pass has freed its temporaries
            self.mean = torch.empty(self.total, dtype=torch.float64, device=self.sq_norms.device)
            self.centred = torch.empty_like(self.mean)
        self.sq_norms[start:stop] += _sq_norms([rep for _, rep in piece])
        part = self.group.parts[start, stop] if self.by_class else None
        while piece:
            k, rep = piece.pop()
            if self.whole_by_class:
                onehot = None if isinstance(rep, Outer) else self.group.onehot_as(_dtype(rep))
                layout = self.group.layouts.get((start, stop))
                for _, _, block in _blocks(rep, max(1, CLASS_BLOCK // len(self.group.values)), factored=False):
                    self.class_norms += _class_norm(block, onehot, layout)
            elif part is not None:
                self._class_sums(k, rep, part)
            self._moments(k, rep, n)

    def _class_sums(self, k: int, rep: Rep, part: _Part) -> None:
        """Add the chunk's Σ_{i∈c} g_i of parameter k to the class carried in, square those of the
        classes that end in this chunk into their norms and carry the last one if it goes on."""
        where = self.slices[k]
        if self.carry is None and (part.carried_in or part.continues):
            self.carry = torch.empty_like(self.mean)
        carry = None if self.carry is None else self.carry[where]
        onehot = None if isinstance(rep, Outer) else part.onehot[_dtype(rep)]
        done = part.classes - part.continues
        for a, b, block in _blocks(rep, max(1, CLASS_BLOCK // part.classes)):
            sums = _class_sum(block, onehot, part.layout)
            if part.carried_in:
                sums[0] += carry[a:b]
            if done:
                self.class_norms[part.lo:part.lo + done] += sums[:done].square().sum(dim=1)
            if part.continues:
                carry[a:b] = sums[-1]

    def _moments(self, k: int, rep: Rep, n: int) -> None:
        """Merge the chunk's mean and centred sum of squares of parameter k into the running ones."""
        where = self.slices[k]
        mean, centred = self.mean[where], self.centred[where]
        writable = isinstance(rep, Tensor) and rep.is_contiguous()
        for a, b, block in _blocks(rep, BLOCK, factored=False):
            if self.count == 0:
                _moments(block, n, mean[a:b], centred[a:b], writable)
                continue
            if self.scratch is None or self.scratch.shape[1] < b - a:  # or a factored layer larger than a block
                self.scratch = None
                self.scratch = torch.empty(2, max(b - a, self.block), dtype=self.mean.dtype, device=self.mean.device)
            chunk_mean, chunk_centred = self.scratch[0, :b - a], self.scratch[1, :b - a]
            _moments(block, n, chunk_mean, chunk_centred, writable)
            total = self.count + n
            difference = chunk_mean.sub_(mean[a:b])
            centred[a:b].add_(chunk_centred).addcmul_(difference, difference, value=self.count * n / total)
            mean[a:b].add_(difference, alpha=n / total)

    def result(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(mean, centred sums, ‖g_i‖² in batch order, class norms or None, Gram or None)."""
        sq_norms, class_norms = self.sq_norms, self.class_norms
        if self.by_class:  # back from class order
            sq_norms = torch.empty_like(sq_norms).index_copy_(0, self.group.order, sq_norms)
        if self.group is not None and self.gram is not None:
            onehot = self.group.onehot_as(torch.float64)
            class_norms = ((onehot.T @ self.gram) * onehot.T).sum(dim=1)
        return self.mean, self.centred, sq_norms, class_norms, self.gram


def _blocks(rep: Rep, width: int, factored: bool = True) -> Iterator[tuple[int, int, Rep]]:
    """(start, stop, the representation of entries start:stop) of a parameter's flattened entries
    in blocks of about ``width``: column blocks of a dense (n, P_k) chunk, blocks of whole rows
    of a factored layer's (out, in) grid (whole when not ``factored``: its float32 resummation
    decides per layer)."""
    if isinstance(rep, Outer):
        rows, columns = rep.delta.shape[1], rep.inputs.shape[1]
        step = rows if not factored else max(1, width // columns)
        for r in range(0, rows, step):
            stop = min(r + step, rows)
            block = rep if step >= rows else Outer(rep.delta[:, r:stop], rep.inputs, rep.bias)
            yield r * columns, stop * columns, block
        return
    matrix = rep.delta if isinstance(rep, BiasOf) else rep
    size = matrix.shape[1]
    if size <= width:
        yield 0, size, rep
        return
    for a in range(0, size, width):
        b = min(a + width, size)
        yield a, b, BiasOf(matrix[:, a:b]) if isinstance(rep, BiasOf) else matrix[:, a:b]


def _dtype(rep: Rep) -> torch.dtype:
    return rep.delta.dtype if isinstance(rep, (Outer, BiasOf)) else rep.dtype


def _sq_norms(chunk: list[Rep]) -> Tensor:
    """‖g_i‖² of each example of a chunk (float64): ‖δ_i a_iᵀ‖² = ‖δ_i‖²‖a_i‖² for factored ones
    (‖δ_i‖²(‖a_i‖² + 1) with the layer's bias)."""
    dense = [r for r in chunk if isinstance(r, Tensor)]
    total = 0
    if dense:
        total = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in dense], dim=1).to(torch.float64).square().sum(dim=1)
    for r in chunk:
        if isinstance(r, Outer):
            inputs = r.inputs.square().sum(dim=1, dtype=torch.float64)
            total = total + r.delta.square().sum(dim=1, dtype=torch.float64) * (inputs + 1 if r.bias else inputs)
    return total


def _by_class(rows: Tensor, index: Tensor) -> Tensor:
    """(C, L, d): the rows of an (n, d) chunk by class, padded with zero rows (``index`` from the
    balanced layout of :meth:`_Classes.layout`, whose padding entries point at row n)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])[index]


def _class_sum(rep: Rep, onehot: Tensor | None, layout: tuple[Tensor, Any] | None) -> Tensor:
    """(C, P_k) float64: Σ_{i in class c} g_i for each class. A dense chunk from its (n, C)
    one-hot matrix; a factored one as δ_cᵀ a_c per class (``layout``, see :meth:`_Classes.layout`):
    one batched product over the classes padded to the largest with zero rows, or, when the
    classes are too unequal for padding, one product per class in class-sorted order."""
    if isinstance(rep, BiasOf):
        rep = rep.delta
    if isinstance(rep, Tensor):
        return (onehot.T @ rep).to(torch.float64)
    index, shape = layout
    delta, inputs = rep.delta.to(torch.float64), rep.inputs.to(torch.float64)
    if isinstance(shape, int):
        delta, inputs = _by_class(delta, index), _by_class(inputs, index)
        return torch.bmm(delta.transpose(1, 2), inputs).reshape(index.shape[0], -1)
    delta, inputs = delta[index], inputs[index]
    out = torch.zeros(len(shape), delta.shape[1] * inputs.shape[1], dtype=torch.float64,
                      device=delta.device)
    offset = 0
    for k, size in enumerate(shape):
        if size:
            out[k] = (delta[offset:offset + size].T @ inputs[offset:offset + size]).reshape(-1)
            offset += size
    return out


def _class_norm(rep: Rep, onehot: Tensor | None, layout: tuple[Tensor, Any] | None) -> Tensor:
    """(C,) float64: ‖Σ_{i∈c} g_i‖² of each class, the batch being one chunk. A dense
    representation through its class sums; a factored one without forming them, as the sum of
    its Gram matrix (δ_i·δ_j)(a_i·a_j) over the pairs of one class (Σ_c n_c²(in + out)
    multiply-adds instead of n·in·out): one batched product over the classes padded with zero
    rows, or one product per class when the classes are too unequal for padding. A factored
    layer's bias is included in its weight's pairs (a_i·a_j + 1), so a :class:`BiasOf` adds 0."""
    if isinstance(rep, BiasOf):
        return torch.zeros(onehot.shape[1], dtype=torch.float64, device=rep.delta.device)
    if isinstance(rep, Tensor):
        return (onehot.T @ rep).to(torch.float64).square().sum(dim=1)
    index, shape = layout
    if isinstance(shape, int):
        delta, inputs = _by_class(rep.delta, index), _by_class(rep.inputs, index)
        products = torch.bmm(inputs, inputs.transpose(1, 2))
        if rep.bias:
            products.add_(1.0)  # padding rows have δ = 0, so their + 1 adds nothing
        pairs = torch.bmm(delta, delta.transpose(1, 2)) * products
        return pairs.sum(dim=(1, 2), dtype=torch.float64)
    delta, inputs = rep.delta[index], rep.inputs[index]
    out, offset = [], 0
    for size in shape:
        d, a = delta[offset:offset + size], inputs[offset:offset + size]
        out.append(((d @ d.T) * (a @ a.T + 1 if rep.bias else a @ a.T)).sum(dtype=torch.float64))
        offset += size
    return torch.stack(out)


def _moments(rep: Rep, n: int, mean: Tensor, centred: Tensor, writable: bool) -> None:
    """Write the chunk's mean and centred sum of squares Σ_i (g_i − mean)² of one parameter tensor
    (or a block of its entries) into the float64 vectors ``mean`` and ``centred``. A dense chunk
    is centred in place when ``writable`` (vmap may return expanded zeros, which are copied, and
    a bias's δ is shared with its weight's factors); torch.var_mean is several times slower on
    the CPU for reductions over dim 0."""
    if isinstance(rep, Outer):
        _factored_moments(rep, n, mean, centred)
        return
    if isinstance(rep, BiasOf):
        rep, writable = rep.delta, False
    chunk_mean = rep.mean(dim=0)
    deviations = rep.sub_(chunk_mean) if writable else rep - chunk_mean
    mean.copy_(chunk_mean)
    centred.copy_(deviations.square_().sum(dim=0))


def _factored_moments(rep: Outer, n: int, mean: Tensor, centred: Tensor) -> None:
    """:func:`_moments` of a factored layer: Σ g_i = δᵀa and Σ g_i² = (δ²)ᵀ(a²), the centred
    sum their difference Σ g_i² − n·mean².

    That difference cancels where the variance is small against the squared mean (and must still
    resolve constant entries, see ``_CONSTANT_VARIANCE``), so it needs float64 sums. On the CPU,
    float32 factors are first summed in float32 (float64 products cost twice as much there): the
    rounding of those sums is below about n·u·Σ g_i² (u = 2⁻²⁴) in the centred sum, and every
    entry whose centred sum is below ``CANCELLATION`` × Σ g_i² (per-entry GSNR above 3) is
    summed again exactly in float64 from its factors, so the others keep a relative error below
    n·u/``CANCELLATION`` (6e-5 for n = 256 at worst, about 1e-6 in practice). When more than
    ``MAX_RESUMMED`` of the entries need it, the whole layer is summed in float64."""
    f64 = torch.float64
    delta, inputs = rep.delta, rep.inputs
    grid = (delta.shape[1], inputs.shape[1])
    if delta.dtype == torch.float32 and delta.device.type == "cpu":
        # in float32 until the result: where the difference keeps more than CANCELLATION of
        # Σ g², its own rounding adds under 4u relative error (u = 2⁻²⁴), and float32 passes over
        # the P entries move half the bytes of float64 ones
        sums = delta.T @ inputs
        squares = delta.square().T @ inputs.square()
        sums.mul_(1.0 / n)
        squares.addcmul_(sums, sums, value=-n)
        # centred < CANCELLATION·Σ g² = CANCELLATION·(centred + n·mean²)
        limit = sums.square().mul_(n * CANCELLATION / (1 - CANCELLATION))
        suspect = (squares < limit).view(-1).nonzero().squeeze(1)
        del limit
        if suspect.numel() <= MAX_RESUMMED * centred.numel():
            mean.view(grid).copy_(sums)
            centred.view(grid).copy_(squares.clamp_(min=0))
            if suspect.numel():
                width = grid[1]
                terms = delta[:, suspect // width].to(f64) * inputs[:, suspect % width].to(f64)
                exact = terms.sum(dim=0).div_(n)
                mean[suspect] = exact
                centred[suspect] = (terms.square_().sum(dim=0) - exact.square() * n).clamp_(min=0)
            return
    delta, inputs = delta.to(f64), inputs.to(f64)
    torch.mm(delta.T, inputs, out=mean.view(grid))
    torch.mm(delta.square().T, inputs.square(), out=centred.view(grid))
    mean.mul_(1.0 / n)
    centred.addcmul_(mean, mean, value=-n).clamp_(min=0)


def _dot(rows: list[Rep], columns: list[Rep]) -> Tensor:
    """The (n_a, n_b) block of g_i·g_j between two chunks, summed over parameters in float64:
    each parameter's product in its dtype, (δ_i·δ_j)(a_i·a_j) for a factored one, or
    (δ_i·δ_j)(a_i·a_j + 1) for a factored weight and its bias together."""
    total = 0
    for a, b in zip(rows, columns, strict=True):
        if isinstance(a, Outer):
            inputs = a.inputs @ b.inputs.T
            if a.bias:
                inputs.add_(1.0)
            total = total + ((a.delta @ b.delta.T) * inputs).to(torch.float64)
        elif isinstance(a, BiasOf):
            continue
        else:
            total = total + (a @ b.T).to(torch.float64)
    return total


def _reduce(sums: tuple, sizes: list[int], layer_index: Tensor, n_layers: int, group: _Classes | None,
            m: int) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The device part of the summary, without host syncs (so a CUDA graph can record it): one
    float64 vector of every number the result needs, [‖ḡ‖², Σ‖g_i‖², Σ‖g_i − ḡ‖², the GSNR sum and
    the count of kept entries per layer, ‖g_i‖ per example, ‖Σ_{i∈c} g_i‖² and Σ_{i∈c} ‖g_i‖² per
    class], and the stiffness tensors (:func:`_stiffness`) or None. Consumes ``sums`` (in place)."""
    f64 = torch.float64
    mean, centred, sq_norms, class_norms, gram = sums
    device = mean.device
    totals = torch.stack([torch.dot(mean, mean), sq_norms.sum(), centred.sum()])
    # r_k = mean² / variance over every parameter entry, in place: on the CPU each fresh tensor of
    # P float64 entries costs more than the arithmetic (page faults), and torch.where on a bool
    # mask is ten times slower than arithmetic masking
    ratio = mean.square_().div_(centred.mul_(1.0 / m))  # population variance: centred / m
    # kept: variance > _CONSTANT_VARIANCE · mean_i g_ik², i.e. r_k below _MAX_GSNR (0/0 and x/0 are
    # NaN and inf, left out too)
    kept = ratio < _MAX_GSNR
    ratio.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(kept)
    per_tensor = torch.stack([torch.stack([r.sum(), k.sum(dtype=f64)])
                              for r, k in zip(ratio.split(sizes), kept.split(sizes), strict=True)])
    per_layer_sums = torch.zeros(n_layers, 2, dtype=f64, device=device).index_add_(0, layer_index, per_tensor)
    parts = [totals, per_layer_sums.T.reshape(-1), sq_norms.sqrt()]
    if group is not None:
        class_sq = torch.zeros(len(group.values), dtype=f64, device=device).index_add_(0, group.index, sq_norms)
        parts += [class_norms, class_sq]
    stiff = None
    if gram is not None:
        stiff = _stiffness(gram, sq_norms, None if group is None else group.index,
                           0 if group is None else len(group.values))
    return torch.cat(parts), stiff


def _stiffness(gram: Tensor, sq_norms: Tensor, class_index: Tensor | None,
               classes: int) -> tuple[Tensor, ...]:
    """Device part of the stiffness: (cosines with 0 on the diagonal and for zero gradients,
    1 where the gradient is non-zero) and, with classes, the (C, C) sums of cosines and counts of
    pairs i ≠ j of non-zero gradients by class."""
    f64 = torch.float64
    # masks by arithmetic, not torch.where (ten times slower on the CPU for bool masks)
    nonzero = (sq_norms > 0).to(f64)
    inverse = nonzero / sq_norms.sqrt().add(1.0 - nonzero)  # 1/‖g_i‖, 0 for a zero gradient
    values = gram * inverse[:, None] * inverse[None, :]
    values.fill_diagonal_(0.0)
    if class_index is None:
        return values, nonzero
    weights = nonzero[:, None] * nonzero[None, :]
    weights.fill_diagonal_(0.0)
    onehot = torch.nn.functional.one_hot(class_index, classes).to(f64)
    return values, nonzero, onehot.T @ values @ onehot, onehot.T @ weights @ onehot


def _stiffness_on_host(stiff: tuple[Tensor, ...], by_class: bool) -> tuple[np.ndarray, np.ndarray | None,
                                                                           tuple[float, float, float]]:
    """The cosine matrix, the (C, C) class means and (overall, within, between) means, all over
    pairs i ≠ j whose gradients are non-zero."""
    values, nonzero = stiff[0], stiff[1]
    matrix = _cosine_matrix(values, nonzero)
    if not by_class:
        valid = np.isfinite(matrix)
        np.fill_diagonal(valid, False)
        pairs = int(valid.sum())
        total = float(values.sum()) if pairs else 0.0
        return matrix, None, (total / pairs if pairs else math.nan, math.nan, math.nan)
    host_sums, host_pairs = stiff[2].cpu().numpy(), stiff[3].cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        class_matrix = np.where(host_pairs > 0, host_sums / host_pairs, np.nan)
    total, total_pairs = float(host_sums.sum()), float(host_pairs.sum())
    same, same_pairs = float(np.trace(host_sums)), float(np.trace(host_pairs))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    means = (ratio(total, total_pairs), ratio(same, same_pairs), ratio(total - same, total_pairs - same_pairs))
    return matrix, class_matrix, means


def _cosine_matrix(values: Tensor, nonzero: Tensor) -> np.ndarray:
    """The m×m cosine matrix on the host: ``values`` (cosines, 0 on the diagonal and for zero
    gradients) with 1 on the diagonal and NaN in the rows and columns of zero gradients."""
    matrix = values.cpu().numpy().copy()  # on the CPU .numpy() would share (and change) values
    valid = nonzero.cpu().numpy() > 0
    np.fill_diagonal(matrix, 1.0)
    matrix[~valid, :] = np.nan
    matrix[:, ~valid] = np.nan
    return matrix


def _resolve_classes(fn: ModelFunction, classes: Any, m: int) -> Tensor | None:
    if classes is False:
        return None
    if classes is None or classes is True:
        labels = class_labels(fn.targets, m)
        if labels is None and classes is True:
            raise ValueError(
                "classes=True needs integer class labels of shape (m,) as targets; pass "
                "classes=<array of m labels> to group the examples yourself"
            )
        return None if labels is None else labels.to(fn.device).long()
    labels = torch.as_tensor(np.asarray(classes), device=fn.device)
    if labels.dim() != 1 or labels.shape[0] != m or labels.is_floating_point():
        raise ValueError(
            f"classes must be {m} integer labels (one per example), got shape {tuple(labels.shape)} "
            f"and dtype {labels.dtype}"
        )
    return labels.long()


def gradient_coherence(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    *,
    chunk_size: ChunkSize = "auto",
    stiffness: bool = True,
    mode: Mode = "eval",
    classes: Tensor | Sequence[int] | np.ndarray | bool | None = None,
    fallback: Fallback = "loop",
    hooks: bool | Literal["auto"] = "auto",
    graphs: bool | Literal["auto"] = "auto",
    seed: int = 0,
    memory: int | None = None,
) -> Coherence:
    """Per-example gradient statistics of ``batch``: coherence, m-coherence (overall and per
    class), stiffness, GSNR and the gradient noise scale (METRICS.md §2).

    The per-example gradients g_i = ∇ℓ_i come from layer hooks (below) or ``torch.func``
    (``vmap`` of ``grad``) in chunks of ``chunk_size`` examples. ``chunk_size="auto"`` (the
    default) takes the largest chunk, up to the whole batch, whose per-example gradients fit a
    budget for speed: chunk × (the parameters by vmap × their element size + an estimate per
    hooked layer of its input and output gradient) bytes, against a quarter of the free GPU
    memory (``torch.cuda.mem_get_info`` plus the caching allocator's unused reserve), at most
    2 GiB, on CUDA, and on the CPU 256 MiB with stiffness and 64 MiB without it (a working set
    the caches can hold: the chunks are faster); halved when stiffness needs two chunks at once;
    the batch is then cut into chunks of equal size. Few chunks matter on a GPU, where each chunk
    costs a fixed number of kernel launches.

    Memory: with ``memory`` given, the chunk (an explicit ``chunk_size`` too) is at most the
    largest whose predicted peak fits it (:func:`memory_model`: a fixed part plus a part per
    example of the chunk, activations included; measured peaks were 0.6 to 0.9 of it), or
    :class:`dynlens.budget.MemoryBudgetTooSmall` is raised before anything is allocated. The
    fixed part is 16 bytes per parameter entry (the float64 running mean and centred sum of
    squares; 24 with per-class statistics over several chunks) plus a block of scratch: each
    chunk is reduced per parameter tensor, in blocks of at most ``BLOCK`` entries, in the
    parameters' dtype (mean, centred sum of squares Σ (g_i − chunk mean)², the norms ‖g_i‖²) and
    merged into the float64 running sums (Chan et al.'s parallel update), so a float64 model is
    measured in float64 throughout. Per example: one pass's activations and the per-example
    gradients of the largest hooked layer (the layers' gradients are formed and reduced one
    layer at a time, and the parameters vmap takes after the hooked pass has freed its tensors),
    or by vmap those of all its parameters. Per-class m-coherence over several chunks measures
    the batch sorted by class (the results are in batch order), so that one class's float64 sum
    Σ_{i∈c} g_i at a time is carried from a chunk into the next. Stiffness needs the m × m Gram
    matrix g_i·g_j, built block by block: two chunks' gradients are held at a time and each pair
    of chunks is visited once, which recomputes later chunks (n(n−1)/2 extra chunk passes for
    n = ⌈m/chunk_size⌉; none when chunk_size ≥ m).

    Cost: one forward and backward pass over the batch, vectorised (plus the stiffness passes).
    The chunks are reduced on the device without waiting on it; the results come to the host
    once, at the end.
    Models ``vmap`` cannot run (in-place ops on batched tensors, data-dependent Python control
    flow) fall back to a loop of one ``torch.autograd.grad`` per example (``fallback="loop"``,
    the same numbers, about m times slower, with a warning) or raise
    :class:`VmapUnsupportedError` naming the layer (``fallback="error"``).

    Layer hooks (``hooks=True``, and ``"auto"`` except for stiffness of convolutional models
    on GPUs when the batch needs several chunks; eval mode): the per-example gradients of
    ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` and BatchNorm (running statistics) layers follow
    from each layer's input and the gradient δ_i at its output, both from one batched forward
    (hooks, removed afterwards) and one backward of Σ ℓ_i (:mod:`dynlens.measures.layer_grads`;
    Goodfellow 2015, "Efficient per-example gradient computations"; Dangel et al. 2020, BackPACK);
    the other parameters' come from vmap. A linear layer on (batch, features) inputs is kept
    factored, g_i = δ_i a_iᵀ never formed: Σ g_i = δᵀa, Σ g_i² = (δ²)ᵀ(a²),
    ‖g_i‖² = ‖δ_i‖²‖a_i‖², g_i·g_j = (δ_i·δ_j)(a_i·a_j) (a_i·a_j + 1 with the layer's bias), the
    per-class norms from the class blocks of those pair products; the sums that cancel
    (Σ g_i² − n·mean²) in float64 (on the CPU in float32, with the entries where cancellation
    could cost accuracy summed again in float64). Hooks apply to layers called once per forward
    on batched inputs whose parameters no other module shares, when those layers hold at least
    half of the parameters (otherwise the vmap pass dominates and the batched pass would only add
    to it). They are checked on every chunk: the batched forward's per-example losses of 4 evenly
    spaced examples of the chunk must equal (rtol = atol = 1e-10 in float64, 1e-4 in float32,
    8 units of the last place in 16-bit types) those of each evaluated alone (vmap). A layer that mixes examples changes every
    example's loss; Python control flow on tensor values makes vmap fail. The comparisons stay on
    the device and are read once after the last chunk; if any failed, or a hooked layer is called
    twice or not on a batched input, the whole batch is measured again with everything by vmap
    (chunk size resolved anew), with a note.

    CUDA graphs (``graphs``, on CUDA in eval mode): small models are measured at the speed of
    launching their kernels, hundreds of them. The second call with the same model, parameter
    and buffer tensors (same addresses and shapes), batch shapes, options and class labels
    records the per-example pass in a CUDA graph (:mod:`dynlens.cudagraphs`; after a warm-up run
    in which any host synchronisation raises, in which case it is never tried again for them),
    and later calls copy the batch in and replay it (the method then ends in "(CUDA graph)"). The
    graph reads the parameters and buffers where they are, so in-place optimizer steps are seen;
    it replays the kernels of the recorded forward, so a model whose forward takes another path
    with the same tensors (a Python flag changed between calls) needs ``graphs=False``. At most two
    graphs are kept, each holding the memory of one pass (and a reference to its model and loss);
    :func:`dynlens.cudagraphs.clear_graphs` frees them.

    Runs inside :func:`dynlens.functional.isolated`: parameters, ``.grad``, buffers, training
    flags and random states are left exactly as they were. A float16 or bfloat16 model is
    measured in float32 at its own weights (:class:`~dynlens.functional.ModelFunction`).

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss.
        batch: ``(inputs, targets)``.
        chunk_size: examples per vmap call (memory ∝ chunk_size), or "auto" (above).
        stiffness: compute the stiffness matrix (the only statistic needing pairs of examples).
        memory: bytes the measurement may allocate beyond what is in use when it starts (None:
            no limit): the chunks are cut to fit it, or MemoryBudgetTooSmall is raised when one
            example does not (Memory, above). Sizing the chunks costs a forward pass of one
            example.
        mode: "eval" (default: BatchNorm running statistics, no dropout) or "train" (dropout with
            a fixed seed). Train mode with BatchNorm raises ValueError: with batch statistics an
            example's loss depends on the whole batch, so per-example gradients are ill-defined.
        classes: None (default): class labels from the targets when they are integer labels of
            shape (m,), otherwise no per-class statistics; an array of m integer labels to group
            by; False to skip per-class statistics.
        fallback: "loop" or "error" when vmap fails (see above).
        hooks: take the per-example gradients of Linear, Conv1d/Conv2d and BatchNorm layers from
            layer hooks (below; True), or every parameter's by vmap (False); "auto" (default):
            hooks, except on GPUs for the stiffness of a model with convolutions whose batch
            does not fit one chunk (stiffness visits every pair of chunks, and the hooks' chunks
            are smaller: vmap was faster there).
        graphs: on CUDA, replay the measurement from a CUDA graph (below); "auto" (default): when
            one chunk's per-example gradients fit ``GRAPH_MEMORY`` (512 MiB), in eval mode.
        seed: dropout seed in train mode.

    Returns:
        :class:`Coherence`, float64 values on the CPU.
    """
    model = unwrap_model(model)
    check_mode(model, mode)
    with isolated(model, mode, seed):
        fn = ModelFunction(model, loss_fn, batch, seed=seed)
        return coherence_of(fn, chunk_size=chunk_size, stiffness=stiffness, classes=classes,
                            fallback=fallback, hooks=hooks, graphs=graphs, memory=memory)

