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

from dynlens.functional import Mode, ModelFunction, check_loss, isolated, slice_examples

__all__ = ["Coherence", "gradient_coherence", "coherence_of", "auto_chunk_size", "VmapUnsupportedError"]

Fallback = Literal["loop", "error"]
ChunkSize = int | Literal["auto"]

# A parameter entry whose per-example gradients are constant (all zero, typically: a dead unit
# or an unused parameter) has variance 0 and no defined GSNR. Variances at or below this
# fraction of the mean squared gradient are rounding noise of such constant entries.
_CONSTANT_VARIANCE = 1e-12
# Linear layers are taken in factored form only when their weights hold at least this share of
# the parameters: the factored path costs one batched forward and backward more.
FACTOR_SHARE = 0.5
# chunk_size="auto": the per-example gradients of one chunk may take this much memory (bytes):
# on CUDA this share of the free memory (what the driver reports free plus what PyTorch's caching
# allocator holds unused), at most the cap; elsewhere the fixed CPU budget.
CUDA_FREE_SHARE = 0.25
CUDA_BUDGET = 2 * 2**30
CPU_BUDGET = 256 * 2**20


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
            (one backward pass per example, the fallback for models vmap cannot run), prefixed
            with "factored linear + " when linear layers' weights were taken in factored form.
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


@dataclass
class _Outer:
    """The per-example gradients g_i = δ_i a_iᵀ of a linear layer's weight, kept factored (never
    formed): δ_i = ∂ℓ_i/∂z_i the gradient at the layer's output, a_i its input (both float64)."""

    delta: Tensor  # (n, out)
    inputs: Tensor  # (n, in)


Rep = Tensor | _Outer


class _NotFactorable(Exception):
    """The model's linear layers cannot be taken in factored form (the dense path is used)."""


def _linear_layers(fn: ModelFunction) -> dict[str, tuple[nn.Linear, str | None]]:
    """{weight name: (module, bias name)} of the nn.Linear layers whose weight is differentiated
    and owned by that module alone (no weight tying), in eval mode."""
    if fn.model.training:
        return {}
    owners: dict[int, int] = {}
    for module in fn.model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    layers = {}
    for name, module in fn.model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if type(module) is nn.Linear and weight in fn.params and owners.get(id(module.weight)) == 1:
            bias = f"{name}.bias" if name else "bias"
            if module.bias is not None and owners.get(id(module.bias)) != 1:
                continue
            layers[weight] = (module, bias if bias in fn.params else None)
    return layers


class _Gradients:
    """Per-example gradients of any example range, one representation per parameter tensor (in
    ``fn.params`` order): an (n, P_k) matrix in the parameters' dtype (by vmap, or the loop), or,
    for the weights of linear layers, the factors of g_i = δ_i a_iᵀ (:class:`_Outer`).

    The factored path is checked without waiting on the device: each chunk's batched per-example
    losses are compared with those of each example evaluated alone, and the comparisons are
    and-ed into one device flag that :meth:`verified` reads once, after the last chunk."""

    def __init__(self, fn: ModelFunction, fallback: Fallback, factor_linear: bool = True) -> None:
        self.fn = fn
        self.chunk_size = 64
        self.reference: Tensor | None = None
        self.agrees: Tensor | None = None  # device bool: every checked chunk matched the reference
        self.fallback = fallback
        self.method = "vmap"
        self.notes: list[str] = []
        self.linear = _linear_layers(fn) if factor_linear else {}
        factorable = sum(fn.params[w].numel() for w in self.linear)
        if factorable < FACTOR_SHARE * fn.num_params:
            self.linear = {}  # the vmap pass dominates; a batched pass on top would only add
        self.rest: ModelFunction | None = None
        if self.linear:
            factored = set(self.linear) | {b for _, b in self.linear.values() if b is not None}
            rest = [n for n in fn.params if n not in factored]
            if rest:
                self.rest = ModelFunction(fn.model, fn.loss_fn, (fn.inputs, fn.targets), params=rest,
                                          seed=fn.seed)

    @property
    def factored(self) -> bool:
        return bool(self.linear)

    def bytes_per_example(self) -> int:
        """Memory of one example's gradient representation: P_k entries in the parameters' dtype
        per dense parameter; for a factored layer the float64 factors δ_i, a_i plus the layer's
        input and output in its dtype, (in + out)(8 + 2·itemsize)."""
        factored = set(self.linear) | {b for _, b in self.linear.values() if b is not None}
        total = sum(t.numel() * t.element_size() for n, t in self.fn.params.items() if n not in factored)
        for module, _ in self.linear.values():
            total += (module.in_features + module.out_features) * (8 + 2 * module.weight.element_size())
        return max(total, 1)

    def drop_factoring(self, why: str) -> None:
        self.notes.append(f"linear layers not factored ({why}); all gradients by vmap")
        self.linear, self.rest, self.agrees = {}, None, None

    def verified(self) -> bool:
        """Whether every factored chunk's batched losses matched the examples evaluated alone
        (one device-to-host read)."""
        return self.agrees is None or bool(self.agrees)

    def _reference_losses(self) -> Tensor:
        """ℓ_i of every example, each evaluated alone (vmap): the factored path must match them
        (a layer that mixes examples, or branches on the batch, would not)."""
        if self.reference is None:
            try:
                self.reference = self.fn.per_example_losses(chunk_size=self.chunk_size).detach()
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - the dense path reports or works around it
                raise _NotFactorable(f"{type(err).__name__} evaluating examples alone") from err
        return self.reference

    def chunk(self, start: int, stop: int) -> list[Rep]:
        """The chunk's representations; raises :class:`_NotFactorable` when the linear layers
        cannot be factored (the caller drops factoring and starts over)."""
        if self.linear:
            return self._factored(start, stop)
        return list(self._dense(self.fn, start, stop).values())

    def _dense(self, fn: ModelFunction, start: int, stop: int) -> dict[str, Tensor]:
        if self.method != "loop":
            try:
                grads = fn.per_example_grads_of(start, stop)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any vmap failure is reported or worked around
                self._vmap_failed(err)
                grads = fn.per_example_grads_loop(start, stop)
        else:
            grads = fn.per_example_grads_loop(start, stop)
        n = stop - start
        return {name: g.reshape(n, -1) for name, g in grads.items()}

    def _factored(self, start: int, stop: int) -> list[Rep]:
        """One batched forward with hooks on the linear layers, the per-example losses (vmap of
        loss_fn over the outputs), one backward to the layers' outputs: δ_i and a_i. The other
        parameters' per-example gradients by vmap."""
        fn, n = self.fn, stop - start
        x = slice_examples(fn.inputs, start, stop)
        y = slice_examples(fn.targets, start, stop)
        records: dict[str, list[tuple[Tensor, Tensor] | None]] = {w: [] for w in self.linear}

        def recorder(weight: str) -> Callable[..., Tensor | None]:
            def hook(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
                if len(args) != 1 or not isinstance(output, Tensor) or args[0].dim() != 2 \
                        or args[0].shape[0] != n:
                    records[weight].append(None)
                    return None
                z = output if output.requires_grad else output.detach().requires_grad_(True)
                records[weight].append((args[0].detach(), z))
                return z

            return hook

        handles = [module.register_forward_hook(recorder(w)) for w, (module, _) in self.linear.items()]
        try:
            with torch.enable_grad():
                out = fn.outputs(None, x)
        finally:
            for handle in handles:
                handle.remove()
        for weight, calls in records.items():
            if len(calls) != 1 or calls[0] is None:
                raise _NotFactorable(f"layer {weight.rsplit('.', 1)[0]!r} is called {len(calls)} times "
                                     "or not on a (batch, features) input")
        if not (isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == n
                and isinstance(y, Tensor) and y.dim() > 0 and y.shape[0] == n):
            raise _NotFactorable("outputs and targets are not tensors with a batch dimension")

        def example_loss(o: Tensor, t: Tensor) -> Tensor:
            return check_loss(fn.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))

        outputs = [records[w][0][1] for w in self.linear]
        with torch.enable_grad():
            losses = torch.func.vmap(example_loss)(out, y)
        reference = self._reference_losses()[start:stop]
        tolerance = 1e-4 if losses.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-10
        agrees = torch.isclose(losses.detach(), reference, rtol=tolerance, atol=tolerance).all()
        self.agrees = agrees if self.agrees is None else self.agrees & agrees
        with torch.enable_grad():
            deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        reps: dict[str, Rep] = {}
        for (weight, (_, bias)), (a, z), delta in zip(self.linear.items(), (records[w][0] for w in self.linear),
                                                      deltas, strict=True):
            delta = torch.zeros_like(z) if delta is None else delta
            reps[weight] = _Outer(delta.to(torch.float64), a.to(torch.float64))
            if bias is not None:
                reps[bias] = delta.detach().clone()
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


def auto_chunk_size(bytes_per_example: int, m: int, device: torch.device, pairs: bool = False) -> int:
    """The largest chunk (at most m examples) whose per-example gradients fit the memory budget:
    on CUDA ``CUDA_FREE_SHARE`` of the free memory (``torch.cuda.mem_get_info`` plus what the
    caching allocator holds unused), at most ``CUDA_BUDGET``; elsewhere ``CPU_BUDGET``. With
    ``pairs`` (stiffness over several chunks holds two at a time) the budget is split in two."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(int(free * CUDA_FREE_SHARE), CUDA_BUDGET)
    else:
        budget = CPU_BUDGET
    chunk = budget // bytes_per_example
    if pairs and chunk < m:
        chunk = budget // (2 * bytes_per_example)
    return int(max(1, min(m, chunk)))


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
    factor_linear: bool | Literal["auto"] = "auto",
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
    if factor_linear == "auto":
        # measured (benchmarks/RESULTS.md, m = 256): on the CPU the factored form is 10x faster
        # than vmap for an MLP; on an H100 vmap is faster (5.3 against 9.5 ms), launch-bound
        factor_linear = fn.device.type == "cpu"
    source = _Gradients(fn, fallback, factor_linear)
    names = list(fn.params)
    device = fn.device
    f64 = torch.float64
    group = None
    if labels is not None:
        host_labels = labels.cpu()
        values, index = torch.unique(host_labels, return_inverse=True)
        group = _Classes(values, index.to(device), index.numpy())

    while True:
        chunk = (auto_chunk_size(source.bytes_per_example(), m, device, pairs=stiffness)
                 if chunk_size == "auto" else min(chunk_size, m))
        source.chunk_size = chunk
        try:
            sums = _accumulate(source, chunk, group, stiffness)
            if source.verified():
                break
            why = "the batched forward differs from evaluating examples alone"
        except _NotFactorable as err:
            why = str(err)
        source.drop_factoring(why)

    mean, centred, sq_norms, class_sums, gram = sums
    sizes = [t.numel() for t in fn.params.values()]
    variance = centred / m  # population variance of each parameter entry
    mean_sq = variance + mean.square()  # mean_i g_ik²
    kept = variance > _CONSTANT_VARIANCE * mean_sq
    ratio = torch.where(kept, mean.square() / torch.where(kept, variance, 1.0), 0.0)
    layer_of = [_layer_of(name) for name in names]
    layers = list(dict.fromkeys(layer_of))
    layer_index = torch.tensor([layers.index(layer) for layer in layer_of], device=device)
    per_tensor = torch.stack([piece.sum(dim=1) for piece in torch.split(torch.stack([ratio, kept.to(f64)]), sizes, dim=1)])
    per_layer_sums = torch.zeros(len(layers), 2, dtype=f64, device=device).index_add_(0, layer_index, per_tensor)

    # every number the result needs in one transfer to the host
    parts = [torch.stack([mean.square().sum(), sq_norms.sum(), centred.sum()]), per_layer_sums.T.reshape(-1)]
    classes_n = 0
    if group is not None:
        classes_n = len(group.values)
        class_sq = torch.zeros(classes_n, dtype=f64, device=device).index_add_(0, group.index, sq_norms)
        numerators = sum(c.square().sum(dim=1) for c in class_sums)
        parts += [numerators, class_sq]
    host = torch.cat(parts).cpu().tolist()
    mean_sq_norm, sum_sq_norms, centred_sum = host[:3]
    ratio_sums = host[3:3 + len(layers)]
    kept_counts = host[3 + len(layers):3 + 2 * len(layers)]
    alpha = mean_sq_norm / (sum_sq_norms / m) if sum_sq_norms > 0 else math.nan

    per_class: dict[int, float] = {}
    counts: dict[int, int] = {}
    if group is not None:
        offset = 3 + 2 * len(layers)
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
    if gram is not None:
        matrix, class_matrix, (overall, within, between) = _stiffness(
            gram, sq_norms, None if group is None else group.index, None if group is None else group.values)

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
        gsnr_excluded=int(mean.numel() - kept_total),
        noise_scale=noise_scale,
        trace_sigma=trace_sigma,
        grad_sq_norm=grad_sq_norm,
        mean_grad_norm=math.sqrt(mean_sq_norm),
        grad_norms=sq_norms.sqrt().cpu().numpy(),
        size=m,
        method=("factored linear + " if source.factored else "") + source.method,
        notes=tuple(source.notes),
    )


def _accumulate(source: _Gradients, chunk_size: int, group: _Classes | None,
                stiffness: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor | None]:
    """One pass over the batch in chunks, all on the device with no host sync: (mean, centred
    sums of squares, ‖g_i‖², per-class sums, Gram matrix or None), float64."""
    fn = source.fn
    m, device, f64 = fn.size, fn.device, torch.float64
    # float64 accumulators, one entry per parameter entry (the sums of each chunk are taken in
    # the parameters' dtype, which for float64 models makes everything float64). They start as
    # the first chunk's values (what adding them to zeros would give, without filling zeros).
    count = 0
    mean = centred = None  # centred: Σ_i (g_ik − ḡ_k)², elementwise
    sq_norms = torch.empty(m, dtype=f64, device=device)
    class_sums: list[Tensor] = []
    gram = torch.empty(m, m, dtype=f64, device=device) if stiffness else None
    bounds = [(s, min(s + chunk_size, m)) for s in range(0, m, chunk_size)]
    if group is not None:
        group.prepare(bounds, {t.dtype for t in fn.params.values()}, source.factored)

    for a, (start, stop) in enumerate(bounds):
        chunk = source.chunk(start, stop)
        n = stop - start
        sq_norms[start:stop] = _sq_norms(chunk)
        if group is not None:
            layout = group.layouts.get((start, stop))
            for k, rep in enumerate(chunk):
                onehot = None if isinstance(rep, _Outer) else group.onehot_as(rep.dtype)[start:stop]
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
        moments = [_moments(rep, n) for rep in chunk]
        if mean is None:
            mean, centred = torch.cat([mu for mu, _ in moments]), torch.cat([m2 for _, m2 in moments])
        else:
            total = count + n
            delta = torch.cat([mu for mu, _ in moments]) - mean
            centred += torch.cat([m2 for _, m2 in moments]) + delta.square() * (count * n / total)
            mean += delta * (n / total)
        count += n
        del chunk
    return mean, centred, sq_norms, class_sums, gram


def _sq_norms(chunk: list[Rep]) -> Tensor:
    """‖g_i‖² of each example of a chunk (float64): ‖δ_i a_iᵀ‖² = ‖δ_i‖²‖a_i‖² for factored ones."""
    dense = [r for r in chunk if isinstance(r, Tensor)]
    total = 0
    if dense:
        total = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in dense], dim=1).to(torch.float64).square().sum(dim=1)
    for r in chunk:
        if isinstance(r, _Outer):
            total = total + r.delta.square().sum(dim=1) * r.inputs.square().sum(dim=1)
    return total


def _class_sum(rep: Rep, onehot: Tensor | None, layout: tuple[Tensor, Any] | None) -> Tensor:
    """(C, P_k) float64: Σ_{i in class c} g_i for each class. A dense chunk from its (n, C)
    one-hot matrix; a factored one as δ_cᵀ a_c per class (``layout``, see :meth:`_Classes.layout`):
    one batched product over the classes padded to the largest with zero rows, or, when the
    classes are too unequal for padding, one product per class in class-sorted order."""
    if isinstance(rep, Tensor):
        return (onehot.T @ rep).to(torch.float64)
    index, shape = layout
    if isinstance(shape, int):
        delta = torch.cat([rep.delta, rep.delta.new_zeros(1, rep.delta.shape[1])])[index]
        inputs = torch.cat([rep.inputs, rep.inputs.new_zeros(1, rep.inputs.shape[1])])[index]
        return torch.bmm(delta.transpose(1, 2), inputs).reshape(index.shape[0], -1)
    delta, inputs = rep.delta[index], rep.inputs[index]
    out = torch.zeros(len(shape), delta.shape[1] * inputs.shape[1], dtype=torch.float64,
                      device=delta.device)
    offset = 0
    for k, size in enumerate(shape):
        if size:
            out[k] = (delta[offset:offset + size].T @ inputs[offset:offset + size]).reshape(-1)
            offset += size
    return out


def _moments(rep: Rep, n: int) -> tuple[Tensor, Tensor]:
    """(mean over the chunk, Σ_i (g_i − mean)²), float64 vectors of P_k entries. A dense chunk is
    centred in place (vmap may return expanded zeros, which are copied); torch.var_mean is
    several times slower on the CPU for reductions over dim 0."""
    if isinstance(rep, _Outer):
        mean = (rep.delta.T @ rep.inputs).reshape(-1) / n
        squares = (rep.delta.square().T @ rep.inputs.square()).reshape(-1)
        return mean, (squares - n * mean.square()).clamp_(min=0)
    mean = rep.mean(dim=0)
    centred = rep.sub_(mean) if rep.is_contiguous() else rep - mean
    return mean.to(torch.float64), centred.square_().sum(dim=0).to(torch.float64)


def _dot(rows: list[Rep], columns: list[Rep]) -> Tensor:
    """The (n_a, n_b) block of g_i·g_j between two chunks, summed over parameters in float64:
    a dense parameter's product in its dtype; (δ_i·δ_j)(a_i·a_j) for a factored one."""
    total = 0
    for a, b in zip(rows, columns, strict=True):
        if isinstance(a, _Outer):
            total = total + (a.delta @ b.delta.T) * (a.inputs @ b.inputs.T)
        else:
            total = total + (a @ b.T).to(torch.float64)
    return total


def _stiffness(gram: Tensor, sq_norms: Tensor, class_index: Tensor | None,
               class_values: Tensor | None) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """The cosine matrix, the (C, C) class means and (overall, within, between) means, all over
    pairs i ≠ j whose gradients are non-zero."""
    m = gram.shape[0]
    norms = sq_norms.sqrt()
    denominator = norms[:, None] * norms[None, :]
    valid = denominator > 0
    matrix = torch.where(valid, gram / torch.where(valid, denominator, 1.0), torch.nan)
    valid &= ~torch.eye(m, dtype=torch.bool, device=gram.device)
    weights = valid.to(torch.float64)
    values = torch.where(valid, matrix, 0.0)
    if class_index is None:
        total, pairs = torch.stack([values.sum(), weights.sum()]).tolist()
        return matrix.cpu().numpy(), None, (total / pairs if pairs else math.nan, math.nan, math.nan)
    onehot = torch.nn.functional.one_hot(class_index, len(class_values)).to(torch.float64)
    sums = onehot.T @ values @ onehot
    pairs = onehot.T @ weights @ onehot
    class_matrix = torch.where(pairs > 0, sums / torch.where(pairs > 0, pairs, 1.0), torch.nan)
    total, total_pairs, same, same_pairs = torch.stack(
        [sums.sum(), pairs.sum(), sums.trace(), pairs.trace()]).tolist()

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    means = (ratio(total, total_pairs), ratio(same, same_pairs), ratio(total - same, total_pairs - same_pairs))
    return matrix.cpu().numpy(), class_matrix.cpu().numpy(), means


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
    factor_linear: bool | Literal["auto"] = "auto",
    seed: int = 0,
) -> Coherence:
    """Per-example gradient statistics of ``batch``: coherence, m-coherence (overall and per
    class), stiffness, GSNR and the gradient noise scale (METRICS.md §2).

    The per-example gradients g_i = ∇ℓ_i come from ``torch.func`` (``vmap`` of ``grad``) in
    chunks of ``chunk_size`` examples. ``chunk_size="auto"`` (the default) takes the largest
    chunk, up to the whole batch, whose per-example gradients fit a memory budget: chunk × (the
    non-factored parameters × their element size + (in + out) × (8 + 2 × element size) per
    factored linear layer, below) bytes, against a quarter of the free GPU memory
    (``torch.cuda.mem_get_info`` plus the caching allocator's unused reserve), at most 2 GiB, on
    CUDA, and 256 MiB on the CPU; halved when stiffness needs two chunks at once. The chunk's
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

    Linear layers (``factor_linear=True``, the default on the CPU; eval mode): the per-example gradient of an
    ``nn.Linear`` weight is the outer product g_i = δ_i a_iᵀ of the gradient δ_i at the layer's
    output and its input a_i, so every statistic is computed from the factors without forming
    g_i (Goodfellow 2015, "Efficient per-example gradient computations"; Dangel et al. 2020,
    BackPACK): Σ g_i = δᵀa, Σ g_i² = (δ²)ᵀ(a²), ‖g_i‖² = ‖δ_i‖²‖a_i‖², g_i·g_j = (δ_i·δ_j)(a_i·a_j),
    in float64. δ and a come from one batched forward (hooks on those layers, removed afterwards)
    and one backward of Σ ℓ_i; the other parameters' per-example gradients still come from vmap.
    It applies to layers called once per forward on (batch, features) inputs whose weight no
    other module shares, when their weights hold at least half of the parameters (otherwise
    the vmap pass dominates and the batched pass would only add to it). It is checked on every
    chunk: the batched forward's per-example losses must equal (rtol = atol = 1e-10 in float64,
    1e-4 in lower precision) those of each example evaluated alone, from one vmap forward over the
    batch per call. A layer that mixes examples or branches on the batch fails the check. The
    comparisons stay on the device and are read once after the last chunk; if any failed, or a
    linear layer cannot be factored (called twice, not on (batch, features) inputs), the whole
    batch is measured again with everything by vmap (chunk size resolved anew), with a note.

    Runs inside :func:`dynlens.functional.isolated`: parameters, ``.grad``, buffers, training
    flags and random states are left exactly as they were.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss.
        batch: ``(inputs, targets)``.
        chunk_size: examples per vmap call (memory ∝ chunk_size), or "auto" (above).
        stiffness: compute the stiffness matrix (the only statistic needing pairs of examples).
        mode: "eval" (default: BatchNorm running statistics, no dropout) or "train" (dropout with
            a fixed seed). Train mode with BatchNorm raises ValueError: with batch statistics an
            example's loss depends on the whole batch, so per-example gradients are ill-defined.
        classes: None (default): class labels from the targets when they are integer labels of
            shape (m,), otherwise no per-class statistics; an array of m integer labels to group
            by; False to skip per-class statistics.
        fallback: "loop" or "error" when vmap fails (see above).
        factor_linear: take the weights of ``nn.Linear`` layers in factored form (below);
            "auto" (default): on the CPU, where it is faster, not on GPUs, where vmap is.
        seed: dropout seed in train mode.

    Returns:
        :class:`Coherence`, float64 values on the CPU.
    """
    check_mode(model, mode)
    with isolated(model, mode, seed):
        fn = ModelFunction(model, loss_fn, batch, seed=seed)
        return coherence_of(fn, chunk_size=chunk_size, stiffness=stiffness, classes=classes,
                            fallback=fallback, factor_linear=factor_linear)

