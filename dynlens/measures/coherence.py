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
the norms ‖g_i‖², so that no more than one chunk of per-example gradients is held at once.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynlens import cudagraphs
from dynlens.functional import (
    Mode,
    ModelFunction,
    OutOfMemoryError,
    _example_dims,
    example_losses,
    isolated,
    slice_examples,
    unwrap_model,
)
from dynlens.measures.layer_grads import BiasOf, HookedLayer, Outer, Rep, hookable_layers

__all__ = ["Coherence", "gradient_coherence", "coherence_of", "auto_chunk_size", "VmapUnsupportedError"]

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


class _Gradients:
    """Per-example gradients of any example range, one representation per parameter tensor (in
    ``fn.params`` order): an (n, P_k) matrix in the parameters' dtype (by vmap, the loop, or a
    layer's hook rule), or for the weights of linear layers on (batch, features) inputs the
    factors of g_i = δ_i a_iᵀ (:class:`Outer`; their biases :class:`BiasOf`).

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
        self.layers: list[HookedLayer] = hookable_layers(fn.model, fn.params) if hooks is not False else []
        hooked = sum(fn.params[p].numel() for layer in self.layers for p in layer.params)
        if hooked < HOOKED_SHARE * fn.num_params:
            self.layers = []  # the vmap pass dominates; a batched pass on top would only add
        self.rest: ModelFunction | None = None
        if self.layers:
            taken = {p for layer in self.layers for p in layer.params}
            rest = [n for n in fn.params if n not in taken]
            if rest:
                self.rest = ModelFunction(fn.model, fn.loss_fn, (fn.inputs, fn.targets), params=rest,
                                          seed=fn.seed)

    @property
    def hooked(self) -> bool:
        return bool(self.layers)

    @property
    def description(self) -> str:
        if not self.layers:
            return self.method
        return "hooks" + (f" + {self.method}" if self.rest is not None else "")

    def bytes_per_example(self) -> int:
        """An estimate of one example's memory: P_k entries in the parameters' dtype per
        parameter by vmap; for a hooked layer its input, output gradient and representation
        (:meth:`HookedLayer.bytes_per_example`)."""
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

    def _reference_losses(self, start: int, stop: int, step: int) -> Tensor:
        """ℓ_i of the checked examples start, start + step, ... < stop, each evaluated alone
        (vmap): the batched forward must match them. A layer that mixes examples changes every
        example's loss; Python control flow on tensor values, which the batched forward would
        take for the whole batch, makes vmap fail."""
        fn = self.fn
        x, y = slice_examples(fn.inputs, start, stop, step), slice_examples(fn.targets, start, stop, step)
        try:
            alone = torch.func.vmap(fn._example_loss, in_dims=(None, _example_dims(x), _example_dims(y)),
                                    randomness="different")
            return alone(fn.params, x, y).detach()
        except OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - the dense path reports or works around it
            raise _NotFactorable(f"{type(err).__name__} evaluating examples alone") from err

    def chunk(self, start: int, stop: int) -> list[Rep]:
        """The chunk's representations; raises :class:`_NotFactorable` when the hooked layers'
        gradients cannot be taken from one batched pass (the caller drops the hooks and starts
        over)."""
        if self.layers:
            return self._hooked(start, stop)
        return list(self._dense(self.fn, start, stop).values())

    def _dense(self, fn: ModelFunction, start: int, stop: int) -> dict[str, Tensor]:
        if self.method != "loop":
            try:
                grads = fn.per_example_grads_of(start, stop)
            except OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any vmap failure is reported or worked around
                self._vmap_failed(err)
                grads = fn.per_example_grads_loop(start, stop)
        else:
            grads = fn.per_example_grads_loop(start, stop)
        n = stop - start
        return {name: g.reshape(n, -1) for name, g in grads.items()}

    def _hooked(self, start: int, stop: int) -> list[Rep]:
        """One batched forward with hooks on the layers, the per-example losses
        (:func:`dynlens.functional.example_losses`), one backward to the layers' outputs: their
        inputs and δ_i, from which each layer's rule gives the per-example gradients. The other
        parameters' by vmap."""
        fn, n = self.fn, stop - start
        x = slice_examples(fn.inputs, start, stop)
        y = slice_examples(fn.targets, start, stop)
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
        step = -(-n // CHECKED_EXAMPLES)
        reference = self._reference_losses(start, stop, step)
        # rounding differs between a batch and one example: 1e-10 in float64, 1e-4 in float32,
        # 8 units of the last place in 16-bit types (a layer mixing examples changes far more)
        tolerance = 1e-10 if losses.dtype == torch.float64 else max(1e-4, 8 * torch.finfo(losses.dtype).eps)
        agrees = torch.isclose(losses.detach()[::step], reference, rtol=tolerance, atol=tolerance).all()
        self.agrees = agrees if self.agrees is None else self.agrees & agrees
        outputs = [records[layer.name][0][1] for layer in self.layers]
        with torch.enable_grad():
            deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        reps: dict[str, Rep] = {}
        for layer, z, delta in zip(self.layers, outputs, deltas, strict=True):
            delta = torch.zeros_like(z) if delta is None else delta.detach()
            reps.update(layer.gradients(records[layer.name][0][0], delta, n))
        if self.rest is not None:
            reps.update(self._dense(self.rest, start, stop))
        return [reps[name] for name in fn.params]

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


# ----------------------------------------------------------------------------- measurement


def auto_chunk_size(bytes_per_example: int, m: int, device: torch.device, pairs: bool = False,
                    memory: int | None = None) -> int:
    """A chunk size for m examples whose per-example gradients fit the memory budget: on CUDA
    ``CUDA_FREE_SHARE`` of the free memory (``torch.cuda.mem_get_info`` plus what the caching
    allocator holds unused), at most ``CUDA_BUDGET``; elsewhere ``CPU_BUDGET``, or without
    ``pairs`` the smaller ``CPU_CACHE_BUDGET``; and at most half of ``memory`` (the bytes the
    measurement may allocate, e.g. a Lens's memory budget; the other half is for the chunk's
    activations). With ``pairs`` (stiffness over several chunks holds two at a time) the budget
    is split in two. The batch is then cut into that many chunks of equal size (no small
    remainder chunk)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(int(free * CUDA_FREE_SHARE), CUDA_BUDGET)
    else:
        budget = CPU_BUDGET if pairs else min(CPU_BUDGET, CPU_CACHE_BUDGET)
    if memory is not None:
        budget = min(budget, memory // 2)
    chunk = budget // bytes_per_example
    if pairs and chunk < m:
        chunk = budget // (2 * bytes_per_example)
    chunk = int(max(1, min(m, chunk)))
    pieces = -(-m // chunk)
    return -(-m // pieces)


@dataclass
class _Classes:
    """Class labels of the batch: the sorted label values, each example's class index (on the
    device and on the host), and per chunk the layout that sums a factored layer by class."""

    values: Tensor
    index: Tensor
    host_index: np.ndarray
    onehot: dict[torch.dtype, Tensor] = field(default_factory=dict)
    layouts: dict[tuple[int, int], tuple[Tensor, Any]] = field(default_factory=dict)

    def prepare(self, bounds: list[tuple[int, int]], dtypes: set[torch.dtype], factored: bool) -> None:
        """Make every device tensor the chunks need before the first chunk is queued: copies
        from the host made inside the loop would wait for the device to finish its queue."""
        for dtype in dtypes:
            self.onehot_as(dtype)
        if factored:
            for start, stop in bounds:
                if (start, stop) not in self.layouts:
                    self.layouts[start, stop] = self.layout(start, stop)

    def onehot_as(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self.onehot:
            self.onehot[dtype] = torch.nn.functional.one_hot(self.index, len(self.values)).to(dtype)
        return self.onehot[dtype]

    def layout(self, start: int, stop: int) -> tuple[Tensor, int] | tuple[Tensor, list[int]]:
        """How to sum a factored chunk by class with few kernels. Balanced enough (C × the
        largest class ≤ 2n): (an index of shape (C, L) into the chunk's rows, padded with n, a
        zero row; L). Otherwise: (the order that sorts the chunk by class, the class sizes).
        Built from the host copy of the labels: no device sync."""
        index = self.host_index[start:stop]
        n, classes = stop - start, len(self.values)
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

    def chunk_of(bytes_per_example: int) -> int:
        if chunk_size == "auto":
            return auto_chunk_size(bytes_per_example, m, device, pairs=stiffness, memory=memory)
        return min(chunk_size, m)

    per_example = source.bytes_per_example()
    chunk = chunk_of(per_example)
    if hooks == "auto" and source.pairs_prefer_vmap(chunk, m, stiffness):
        source.drop_hooks()
        hooks = False
        per_example = source.bytes_per_example()
        chunk = chunk_of(per_example)
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
            chunk = chunk_of(source.bytes_per_example())
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
            group.prepare(_chunk_bounds(fn.size, chunk), {t.dtype for t in fn.params.values()}, True)
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


def _accumulate(source: _Gradients, chunk_size: int, group: _Classes | None,
                stiffness: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One pass over the batch in chunks, all on the device with no host sync: (mean, centred
    sums of squares, ‖g_i‖², ‖Σ_{i∈c} g_i‖² per class or None, Gram matrix or None), float64.

    The per-class norms come from the Gram matrix when stiffness asks for it (block sums),
    from the class blocks of each factored layer's Gram matrix when the batch is one chunk, and
    otherwise from per-class sums Σ_{i∈c} g_i carried across chunks."""
    fn = source.fn
    m, device, f64 = fn.size, fn.device, torch.float64
    # float64 accumulators, one entry per parameter entry (the sums of each chunk are taken in
    # the parameters' dtype, which for float64 models makes everything float64). They start as
    # the first chunk's values (what adding them to zeros would give, without filling zeros).
    count = 0
    mean = centred = None  # centred: Σ_i (g_ik − ḡ_k)², elementwise
    sq_norms = torch.empty(m, dtype=f64, device=device)
    class_sums: list[Tensor] = []
    class_norms = None
    gram = torch.empty(m, m, dtype=f64, device=device) if stiffness else None
    bounds = _chunk_bounds(m, chunk_size)
    sizes = [t.numel() for t in fn.params.values()]
    total_size = sum(sizes)
    offsets = np.cumsum([0, *sizes]).tolist()
    slices = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    chunk_mean = chunk_centred = None
    by_blocks = group is not None and gram is None and len(bounds) == 1
    if group is not None:
        group.prepare(bounds, {t.dtype for t in fn.params.values()}, source.hooked)

    for a, (start, stop) in enumerate(bounds):
        chunk = source.chunk(start, stop)
        n = stop - start
        sq_norms[start:stop] = _sq_norms(chunk)
        if by_blocks:
            layout = group.layouts.get((start, stop))
            onehot = group.onehot_as
            class_norms = sum(_class_norm(rep, None if isinstance(rep, Outer) else onehot(_dtype(rep)), layout)
                              for rep in chunk)
        elif group is not None and gram is None:
            layout = group.layouts.get((start, stop))
            for k, rep in enumerate(chunk):
                onehot = None if isinstance(rep, Outer) else group.onehot_as(_dtype(rep))[start:stop]
                sums = _class_sum(rep, onehot, layout)
                if a == 0:
                    class_sums.append(sums)
                else:
                    class_sums[k] += sums
        if gram is not None:
            gram[start:stop, start:stop] = _dot(chunk, chunk)
            for other_start, other_stop in bounds[a + 1:]:
                block = _dot(chunk, source.chunk(other_start, other_stop))
                gram[start:stop, other_start:other_stop] = block
                gram[other_start:other_stop, start:stop] = block.T
        # Last (dense chunks are centred in place, so nothing may read them afterwards): merge the
        # chunk's mean and centred sum of squares into the running ones (Chan et al.).
        # The first chunk's moments are written straight into the accumulators, later ones into
        # scratch vectors (no P-sized temporaries per chunk: on the CPU each costs page faults).
        if mean is None:
            mean, centred = torch.empty(total_size, dtype=f64, device=device), torch.empty(total_size, dtype=f64, device=device)
            chunk_mean, chunk_centred = mean, centred
        elif chunk_mean is mean:
            chunk_mean, chunk_centred = torch.empty_like(mean), torch.empty_like(centred)
        for rep, where in zip(chunk, slices, strict=True):
            _moments(rep, n, chunk_mean[where], chunk_centred[where])
        if chunk_mean is not mean:
            total = count + n
            difference = chunk_mean.sub_(mean)
            centred.add_(chunk_centred).addcmul_(difference, difference, value=count * n / total)
            mean.add_(difference, alpha=n / total)
        count += n
        del chunk
    if class_sums:
        class_norms = sum(c.square().sum(dim=1) for c in class_sums)
    elif group is not None and gram is not None:
        onehot = group.onehot_as(f64)
        class_norms = ((onehot.T @ gram) * onehot.T).sum(dim=1)
    return mean, centred, sq_norms, class_norms, gram


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


def _moments(rep: Rep, n: int, mean: Tensor, centred: Tensor) -> None:
    """Write the chunk's mean and centred sum of squares Σ_i (g_i − mean)² of one parameter tensor
    into the float64 vectors ``mean`` and ``centred`` (P_k entries each). A dense chunk is
    centred in place (vmap may return expanded zeros, which are copied); torch.var_mean is several
    times slower on the CPU for reductions over dim 0."""
    if isinstance(rep, Outer):
        _factored_moments(rep, n, mean, centred)
        return
    if isinstance(rep, BiasOf):
        rep = rep.delta
        chunk_mean = rep.mean(dim=0)
        deviations = rep - chunk_mean  # δ is shared with the weight's Outer
    else:
        chunk_mean = rep.mean(dim=0)
        deviations = rep.sub_(chunk_mean) if rep.is_contiguous() else rep - chunk_mean
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
    memory budget: chunk × (the parameters by vmap × their element size + an estimate per hooked
    layer of its input and output gradient) bytes, against a quarter of the free GPU memory
    (``torch.cuda.mem_get_info`` plus the caching allocator's unused reserve), at most 2 GiB, on
    CUDA, and on the CPU 256 MiB with stiffness and 64 MiB without it (a working set the caches
    can hold: the chunks are faster); halved when stiffness needs two chunks at once; the batch
    is then cut into chunks of equal size. The chunk's
    activations are not counted: pass an integer for models whose activations dwarf their
    parameters. Few chunks matter on a GPU, where each chunk costs a fixed number of kernel
    launches. Each chunk is reduced per parameter tensor in the
    parameters' dtype (mean, centred sum of squares Σ (g_i − chunk mean)², the norms ‖g_i‖²) and merged into float64 running sums across chunks (Chan et al.'s parallel update),
    so a float64 model is measured in float64 throughout. Peak memory grows with the chunk
    (chunk_size × P numbers for P parameters, plus temporaries of the largest parameter tensor),
    never with m. Per-class m-coherence keeps one
    float64 sum per class present (C × P). Stiffness needs the m × m Gram matrix g_i·g_j, built
    block by block: two chunks are held at a time and each pair of chunks is visited once, which
    recomputes later chunks (n(n−1)/2 extra chunk passes for n = ⌈m/chunk_size⌉; none when
    chunk_size ≥ m).

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
        memory: bytes the measurement may allocate (None: the rule above); with
            ``chunk_size="auto"`` the per-example gradients of a chunk take at most half of it.
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

