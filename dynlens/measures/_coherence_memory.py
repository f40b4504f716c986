"""The memory model of gradient coherence: the most bytes a measurement holds at once, for chunks
of n examples, so that ``memory=`` can cap the chunk before anything is allocated.

:class:`MemoryModel` is a fixed part (the float64 sums over every parameter entry, a block of
scratch, the Gram matrix for stiffness) plus a part per example of a chunk (one pass's
activations, measured once by :func:`_footprint`, and the per-example gradients that pass forms,
source by source: :mod:`dynlens.measures._coherence_sources`). The public entry points,
:func:`dynlens.measures.coherence.memory_model` and the ``memory=`` argument of
:func:`dynlens.measures.coherence.gradient_coherence`, are in :mod:`dynlens.measures.coherence`;
``benchmarks/coherence_memory.py`` checks the prediction against measured peaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from dynlens.batches import slice_examples
from dynlens.budget import MemoryBudgetTooSmall
from dynlens.functional import ModelFunction
from dynlens.measures._coherence_accumulation import BlockSizes
from dynlens.measures._coherence_sources import _Gradients
from dynlens.measures.layer_grads import hookable_layers

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

    on CUDA raised by ``margin``. Built by :func:`dynlens.measures.coherence.memory_model`.

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
        class_cap: the most those sums take (they are formed in blocks of
            ``BlockSizes.class_numbers``, ``CLASS_BLOCK``, numbers).
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
                  classes: int, blocks: BlockSizes) -> MemoryModel:
    """:class:`MemoryModel` of measuring ``source``'s model on m examples (``classes`` labels, 0
    without per-class statistics), from its :func:`_footprint`, each chunk reduced in ``blocks``."""
    fn = source.fn
    activation, shapes = footprint
    itemsize = max(t.element_size() for t in fn.params.values())
    # a chunk's examples, gathered when they are taken in class order
    examples = sum(t.numel() * t.element_size() for t in tree_flatten((fn.inputs, fn.targets))[0]
                   if isinstance(t, Tensor)) // max(fn.size, 1)
    total = fn.num_params
    largest = max(t.numel() for t in fn.params.values())
    block = min(largest, blocks.entries)
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
    class_cap = (itemsize + 16) * blocks.class_numbers
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
