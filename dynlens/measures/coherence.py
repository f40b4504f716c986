"""Gradient coherence: statistics of the per-example gradients g_i = ∇ℓ_i on one batch.

Definitions (m examples, ḡ = (1/m) Σ g_i; each with the paper it comes from):

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
that ``_Sums`` reduces and frees one by one. :func:`memory_model` predicts the peak, which
``memory=`` bounds.

This module holds the result (:class:`Coherence`), the statistics read from the accumulated
sums and the public functions. The machinery lives beside it: the per-example gradient sources
(hooks, vmap, the loop) in :mod:`dynlens.measures._coherence_sources`, the chunked accumulation
on the device and its CUDA-graph replay in :mod:`dynlens.measures._coherence_accumulation`, the
memory model in :mod:`dynlens.measures._coherence_memory`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from dynlens import cudagraphs
from dynlens.distributed import all_sum, gather_rows, lockstep, refuse_sharded, weighted_sum
from dynlens.functional import ModelFunction
from dynlens.isolation import Mode, isolated
from dynlens.linalg.operator import available_device_memory
from dynlens.measures._coherence_accumulation import (
    CANCELLATION,  # noqa: F401 - re-exported: tests/measures/test_coherence.py
    MAX_RESUMMED,  # noqa: F401 - re-exported: tests/measures/test_coherence.py
    BlockSizes,
    _accumulate,
    _Classes,
    _factored_moments,  # noqa: F401 - re-exported: tests/measures/test_coherence.py
    _graph_key,
    _graphable,
    _graphed,
    _reduce,
)
from dynlens.measures._coherence_memory import MemoryModel, _footprint, _memory_model, _too_small
from dynlens.measures._coherence_sources import (
    Fallback,
    VmapUnsupportedError,
    _Gradients,
    _NotFactorable,
)
from dynlens.parameters import layer_of, unwrap_model

__all__ = ["Coherence", "gradient_coherence", "coherence_of", "auto_chunk_size", "memory_model", "MemoryModel",
           "VmapUnsupportedError"]

ChunkSize = int | Literal["auto"]

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
# most this many numbers. Both are read when a measurement starts and handed to the accumulation
# and the memory model as BlockSizes.
CLASS_BLOCK = 2**20


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
        budget = min(int(available_device_memory(device) * CUDA_FREE_SHARE), CUDA_BUDGET)
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


def memory_model(fn: ModelFunction, *, stiffness: bool = True, hooks: bool | Literal["auto"] = "auto",
                 classes: Tensor | Sequence[int] | np.ndarray | bool | None = None) -> MemoryModel:
    """The :class:`MemoryModel` of :func:`coherence_of` on ``fn``'s batch with these options:
    what ``memory=`` is checked against. Cost: one forward pass of one example."""
    source = _Gradients(fn, "loop", hooks)
    labels = _resolve_classes(fn, classes, fn.size)
    count = 0 if labels is None else len(torch.unique(labels))
    return _memory_model(source, _footprint(fn), fn.size, stiffness, count, BlockSizes(BLOCK, CLASS_BLOCK))


# ----------------------------------------------------------------------------- measurement


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
    :func:`dynlens.functional.isolated`, as probes do through ``ctx.fn``). With ``fn.group`` set
    (a batch split across ranks) the statistics are the whole batch's (``gradient_coherence``'s
    ``group``)."""
    m = fn.size
    distributed = fn.group is not None
    if distributed:
        refuse_sharded(fn.model, "gradient coherence (per-example gradients)")
        # pairs and class sums across ranks would need every rank's per-example gradients
        stiffness, classes, graphs = False, False, False
        if fn.total_size < 2:
            raise ValueError(f"gradient coherence needs at least 2 examples; the batch has {fn.total_size}")
    elif m < 2:
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

    owners = [layer_of(name) for name in names]
    layers = list(dict.fromkeys(owners))
    layer_index = torch.tensor([layers.index(layer) for layer in owners], device=device)
    sizes = [t.numel() for t in fn.params.values()]
    blocks = BlockSizes(BLOCK, CLASS_BLOCK)

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
        plan = _memory_model(source, footprint, m, stiffness, 0 if group is None else len(group.values),
                             blocks)
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
                                                layer_index, len(layers), blocks)
    if packed is None:
        hooked = source.hooked
        while True:
            source.chunk_size = chunk
            try:
                sums = _accumulate(source, chunk, group, stiffness, blocks)
                if source.verified():
                    break
                why = "the batched forward differs from evaluating examples alone"
            except _NotFactorable as err:
                why = str(err)
            source.drop_hooks(why)
            chunk = chunk_of()
        if distributed:
            sums = _merged_across_ranks(sums, fn)
            m = fn.total_size
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


def _merged_across_ranks(sums: tuple, fn: ModelFunction) -> tuple:
    """Every rank's running sums merged into the whole batch's (Chan et al.'s parallel update
    across ranks): the mean is the size-weighted sum of the shards' means, the centred sums of
    squares add with m_r·(mean_r − mean)², the norms ‖g_i‖² are gathered in rank order. Two
    all-reduces of P float64 numbers and one gather of m."""
    mean, centred, sq_norms, _, _ = sums
    whole = weighted_sum(mean, fn.share, fn.group)
    difference = mean.sub_(whole)
    centred = all_sum(centred.addcmul_(difference, difference, value=float(fn.size)), fn.group)
    return whole, centred, gather_rows(sq_norms, fn.group, fn.shard_sizes), None, None


# ----------------------------------------------------------------------------- statistics on the host


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
    group: Any = None,
) -> Coherence:
    """Per-example gradient statistics of ``batch``: coherence, m-coherence (overall and per
    class), stiffness, GSNR and the gradient noise scale (defined in this module's docstring).

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
        group: a ``torch.distributed`` process group (None: not distributed). Each rank passes
            its shard of the batch and every rank gets the statistics of the whole batch, the
            shards concatenated in rank order: the running sums Σ g_i, Σ (g_i − ḡ)² (merged
            across ranks by Chan et al.'s update) and the norms ‖g_i‖² (gathered), so α,
            m-coherence = ‖Σ g_i‖²/Σ‖g_i‖², GSNR, the noise scale and ``grad_norms`` equal the
            single-process values on the whole batch. Stiffness and the per-class statistics
            need every pair of examples or per-class gradient sums across ranks and are not
            computed (``stiffness=None``, ``per_class`` empty): measure them on one process.
            Cost beyond one rank's shard: two all-reduces of P float64 numbers.

    Returns:
        :class:`Coherence`, float64 values on the CPU.
    """
    model = unwrap_model(model)
    check_mode(model, mode)
    with lockstep(group), isolated(model, mode, seed):
        fn = ModelFunction(model, loss_fn, batch, seed=seed, group=group)
        return coherence_of(fn, chunk_size=chunk_size, stiffness=stiffness, classes=classes,
                            fallback=fallback, hooks=hooks, graphs=graphs, memory=memory)
