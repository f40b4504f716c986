"""The chunked accumulation behind gradient coherence, and its replay from a CUDA graph.

One pass over the batch in chunks of examples, all on the device with no host sync: each
chunk's per-example gradients (a stream of groups from :mod:`dynlens.measures._coherence_sources`)
are reduced, parameter tensor by parameter tensor and in blocks of entries (:class:`BlockSizes`),
into float64 running sums (:class:`_Sums`): the mean and the centred sums of squares
Σ (g_i − ḡ)² of every parameter entry, merged across chunks by Chan et al.'s parallel update,
the norms ‖g_i‖², the per-class norms ‖Σ_{i∈c} g_i‖² (the batch taken in class order when one
class must be carried from a chunk into the next, :class:`_Classes`) and, for stiffness, the
Gram matrix g_i·g_j built block by block. :func:`_reduce` then packs every number the result
needs into one device vector, still without a host sync, so that on CUDA the whole pass can be
recorded once and replayed from a CUDA graph (:func:`_graphed`, :mod:`dynlens.cudagraphs`).

The statistics read from those numbers, and the public functions, are in
:mod:`dynlens.measures.coherence`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynlens import cudagraphs
from dynlens.functional import ModelFunction
from dynlens.measures._coherence_sources import Fallback, Group, _Gradients
from dynlens.measures.layer_grads import BiasOf, Outer, Rep

# A parameter entry whose per-example gradients are constant (all zero, typically: a dead unit
# or an unused parameter) has variance 0 and no defined GSNR. Variances at or below this
# fraction of the mean squared gradient are rounding noise of such constant entries.
_CONSTANT_VARIANCE = 1e-12
_MAX_GSNR = (1 - _CONSTANT_VARIANCE) / _CONSTANT_VARIANCE  # r_k at that variance
# Factored layers in float32 on the CPU (see _factored_moments): entries whose centred sum of
# squares is below this share of their sum of squares are summed again in float64; if more than
# MAX_RESUMMED of a layer's entries are, the whole layer is.
CANCELLATION = 0.25
MAX_RESUMMED = 0.02


class BlockSizes(NamedTuple):
    """How finely a chunk is reduced, so that no temporary grows with the largest parameter
    tensor (a GPT-2 embedding has 38.6M entries): per-parameter work (the moments' float64
    scratch, a factored layer's rows) in blocks of at most ``entries`` entries of a parameter
    tensor, and the class sums of a chunk, (classes in it) × (entries of a parameter tensor), in
    blocks of at most ``class_numbers`` numbers. :mod:`dynlens.measures.coherence` sets both
    (``BLOCK``, ``CLASS_BLOCK``)."""

    entries: int
    class_numbers: int


# ----------------------------------------------------------------------------- classes


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


# ----------------------------------------------------------------------------- accumulation


def _chunk_bounds(m: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``chunk`` examples of a batch of m (the last may be shorter)."""
    return [(start, min(start + chunk, m)) for start in range(0, m, chunk)]


def _sorted_by_class(group: _Classes | None, chunks: int, stiffness: bool) -> bool:
    """Whether the batch is measured sorted by class: per-class sums must then be carried across
    chunks (with stiffness the per-class norms come from the Gram matrix)."""
    return group is not None and chunks > 1 and not stiffness


def _accumulate(source: _Gradients, chunk_size: int, group: _Classes | None, stiffness: bool,
                blocks: BlockSizes) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One pass over the batch in chunks, all on the device with no host sync: (mean, centred
    sums of squares, ‖g_i‖², ‖Σ_{i∈c} g_i‖² per class or None, Gram matrix or None), float64,
    each chunk reduced in ``blocks``.

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
    sums = _Sums(fn, group, len(bounds), stiffness, by_class, blocks)
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
    Chan et al.'s parallel update, in blocks of at most ``blocks.entries`` entries through one
    float64 scratch pair; the first chunk's are written straight into the accumulators (what adding them
    to zeros would give)."""

    def __init__(self, fn: ModelFunction, group: _Classes | None, chunks: int, stiffness: bool,
                 by_class: bool, blocks: BlockSizes) -> None:
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
        self.blocks = blocks
        self.block = min(max(sizes), blocks.entries)
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
                width = max(1, self.blocks.class_numbers // len(self.group.values))
                for _, _, block in _blocks(rep, width, factored=False):
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
        for a, b, block in _blocks(rep, max(1, self.blocks.class_numbers // part.classes)):
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
        for a, b, block in _blocks(rep, self.blocks.entries, factored=False):
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
             fallback: Fallback, hooks: bool | str, layer_index: Tensor, n_layers: int,
             blocks: BlockSizes) -> tuple:
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
        sums = _accumulate(source, chunk, group, stiffness, blocks)
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
