"""The empirical neural tangent kernel (NTK) and the statistics read from it.

NTK: Θ(x, x') = J(x) J(x')ᵀ ∈ R^{O×O}, J(x) = ∂f(x)/∂θ the Jacobian of the model's outputs on one
example (flattened to O entries) with respect to the chosen parameters θ (Jacot et al. 2018,
"Neural Tangent Kernel"). :func:`empirical_ntk` returns it on two sets of inputs in one of
three modes (see the docs: What dynlens measures § Empirical neural tangent kernel):

* ``"full"``: (n₁, n₂, O, O), ``kernel[i, j] = Θ(x_i, x'_j)``;
* ``"trace"``: (n₁, n₂), Σ_o Θ(x_i, x'_j)_oo, the plain sum over outputs (neural-tangents'
  ``trace_axes`` divides by O: multiply its kernel by O to compare);
* ``"diagonal"``: (n₁, O), Θ(x_i, x_i)_oo, the squared norm of each output's gradient.

Three ways to compute it (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel"; the
torch.func NTK tutorial), chosen by ``implementation``:

* ``"jacobian"``, Jacobian contraction: the per-example Jacobians (``vmap`` of ``jacrev``),
  contracted over the parameters. Cost ≈ N·O backward passes + N₁·N₂·O²·P multiply-adds; memory
  for a chunk of Jacobians, chunk·O·P numbers.
* ``"ntk_vector"``, NTK-vector products: for each output o of each example x_i, the
  vector-Jacobian product v = J(x_i)ᵀ e_o, then the Jacobian-vector products J(x')v on the second
  set (``jvp`` of ``vjp``). Cost ≈ N₁·O·(one backward + one forward with tangents over N₂
  examples), never forming a Jacobian; memory for a chunk of P-vectors and their activations.
* ``"structured"``, structured derivatives (Novak et al. 2022) of the layers that allow them
  (:func:`_structured_layers`): ``nn.Linear``; ``nn.Conv1d``/``nn.Conv2d`` with groups 1 and zero
  padding given as numbers, "valid" or a symmetric "same", as a linear map of their unfolded
  input patches (a = ``F.unfold`` of the input, (n, T, C_in·kernel size) at the T output
  positions); ``nn.Embedding`` (no ``max_norm`` or ``scale_grad_by_freq``) as a linear map of
  one-hot tokens, a_t·a'_s = [token_t = token'_s] (not the padding token), always on the
  positions route, also one called on indices shared by the examples (GPT-2's position
  embedding on ``arange(T)``), whose output the factor passes expand to the examples where the
  model's outputs stay the same (:func:`_broadcasts`); and the affine parameters of BatchNorm (eval mode, running statistics),
  LayerNorm and GroupNorm; and a weight W (V×d) shared by exactly one ``nn.Embedding`` and one
  ``nn.Linear`` (V outputs, d inputs) as both their ``weight`` (GPT-2's token embedding tied to
  its output layer), whose Jacobian is the sum of both uses', J = J_emb + J_lin, with
  J_emb(x)_o = Σ_t e_(token_t) ⊗ g^emb_(o,t) (no row for the padding token) and J_lin(x)_o =
  Σ_s g^lin_(o,s) ⊗ h_s (h_s the linear layer's input): ⟨J(x)_o, J(x')_o'⟩ is the embedding's
  and the linear layer's own products (below) plus the cross terms ⟨J_emb(x)_o, J_lin(x')_o'⟩ =
  Σ_(t,s) g^lin'_(o',s)[token_t] (g^emb_(o,t)·h'_s) and its mirror, the linear layer's output
  gradients gathered at the embedding's tokens, no V×d Jacobian formed (:func:`_tied_cross`;
  the linear layer's positions whose gradient is zero, all but the last for a language model
  measured at its last position, are dropped). The linear layer's bias, if any, is its own
  parameter, contracted as Jacobians; any other sharing (a weight of two linear layers, or of
  three modules) is contracted as Jacobians. With a layer's inputs a and the gradients g_o of
  output o with respect to its outputs (from forward hooks and O backward passes, on a GPU
  several outputs a pass where the allowance leaves room: :func:`_output_gradients`), a linear or
  convolutional layer (and a tied weight) takes one of two routes, chosen per layer by multiply-adds
  (:func:`_route`; O' = O² for ``"full"``, else O; pairs = n₁·n₂, or n for ``"diagonal"``; N the
  examples whose factors are computed):

  - *positions*: ⟨J_W(x)_o, J_W(x')_o'⟩ = Σ_(t,s) (a_t·a'_s)(g_(o,t)·g'_(o',s)) (Σ_(t,s) g·g' for
    the bias), no Jacobian formed: pairs·T²·(k + O'·out + O') multiply-adds ("full", T > 1:
    pairs·(T²·(k + O·out) + T·O²·out)), intermediates of pairs·T² numbers and more;
  - *jacobians*: the per-example Jacobians from the same factors, J = Σ_t g_t ⊗ a_t
    (N·O·T·out·k), contracted (pairs·O'·out·k): cheaper for many positions and small patches
    (a ResNet's early convolutions, T = 1024), while the positions win for few positions and
    large patches (its last stage, T = 16, k = 4608). A layer applied once (T = 1) always takes
    the positions route: (a·a')(g·g').

  A tied weight's Jacobian route forms J = J_lin + J_emb (N·O·S·V·d) and contracts it; its
  positions route adds the cross terms to the two layers' products (:func:`_tied_route`).
  A normalisation's per-example Jacobians are formed directly: γ's is Σ over positions of g·x̂,
  β's Σ of g, with x̂ its input normalised by its own statistics. Every structured layer is
  checked exact (parameters not shared, except a tied weight's two modules, called once a
  forward pass, gradient from its factors, for a tied weight the sum of both modules', equal to
  autograd's); the other parameters are contracted as Jacobians. Chunks of examples
  keep two chunks' factors (or Jacobians) and a block's products within ``memory``
  (:func:`_structured_chunk`); every chunk's factors of the second set are kept for the whole
  kernel when they take at most half of ``memory`` (:func:`_keeps_factors`), else computed
  again for the blocks that need them. Of one set, only the blocks on and above the diagonal
  are computed, the rest mirrored (:func:`_kernel_blocks`); on a GPU, chunks that split the
  examples are multiples of 128 (:func:`_tiled`). A ``"trace"`` kernel whose routes would keep
  too much (more Jacobians: its Jacobian route costs O, not O², a pair) and so compute some
  chunk's factors twice takes the ``"full"`` kernel's routes when those keep their factors or,
  neither keeping, cost less counting the factors computed again (:func:`_plan_cost`). A
  ``"full"`` kernel with layers at several positions on the positions route sizes its chunks,
  on a GPU, in three quarters of ``memory`` and takes the rest for several examples of the
  second set at once (:func:`_full_by_positions`: one at a time was a matrix product of O
  columns per pair, slow there; on the CPU one at a time is the faster). Cost ≈ N·O backward passes (of one set in C chunks whose factors are not kept,
  (1 + C(C−1)/2)·chunk·O; of two, N₁·O + C·N₂·O for C chunks of the first set) + the routes'
  multiply-adds.

``implementation="auto"``: ``"structured"`` when the structured layers hold every parameter (an
MLP, a ResNet of convolutions, BatchNorm and a linear head, a GPT-2-style decoder of linear
layers, embeddings, LayerNorm and a tied output layer), or leave at most a tenth of them
(``_REST_FRACTION``) whose per-example Jacobians for chunks of two (2·2·O·P_rest numbers) fit
``memory``; the check runs only when the candidate layers meet that, and is kept per model,
parameter set, O and example shape. Otherwise ``"jacobian"`` when chunks of at least two
examples fit ``memory`` (2·c·O·P numbers for chunks of c; default 1 GiB, or a quarter of the
device's free memory (the host's on the CPU) when that is more): chunk by chunk
it computes n₁/c·n₂ example Jacobians (O backward passes each, batched), against the n₁·O
passes with tangents over all n₂ examples of NTK-vector products, so it is the faster of the
two from c = 2 up; otherwise
``"ntk_vector"``, whose memory does not grow with O·P.

The kernel is defined in eval mode: BatchNorm in train mode normalises each example by the
batch's statistics, so an example's outputs depend on the others' and Θ is no longer a function
of a pair of examples. Every kernel is computed inside :func:`dynlens.functional.isolated` in
eval mode: the model's training flags, ``.grad``, buffers and random states are untouched.

Statistics of a kernel (pure functions of the tensor): :func:`kernel_eigenvalues`,
:func:`condition_number`, :func:`effective_rank`, :func:`kernel_distance` (Fort et al. 2020)
and :func:`kernel_target_alignment` (Cortes et al. 2012).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten

from dynlens.batches import _example_dims, _unsqueeze, _widened_tree
from dynlens.budget import MemoryBudgetTooSmall
from dynlens.distributed import gather_examples, gather_rows, lockstep, refuse_sharded
from dynlens.functional import (
    ModelFunction,
    OutOfMemoryError,
    batch_size,
    isolated,
    slice_examples,
    to_device,
)
from dynlens.linalg.operator import available_device_memory, available_host_memory
from dynlens.parameters import Params, failing_module, layer_of, model_device, unwrap_model

__all__ = [
    "NTK",
    "ntk_of",
    "empirical_ntk",
    "kernel_eigenvalues",
    "condition_number",
    "effective_rank",
    "kernel_distance",
    "kernel_target_alignment",
]

KernelMode = Literal["trace", "full", "diagonal"]
Implementation = Literal["auto", "jacobian", "ntk_vector", "structured"]

# memory=None: what the Jacobians or product vectors of one chunk may take (at least this, or a
# quarter of the device's free memory). No upper cap: the 8 GiB one answered an illegal memory
# access that was the torch.func tutorial's products, not ours; given 110 GiB on an H200 our
# methods ran a ResNet-18's kernels of 256 images with tensors of up to 109 GB, and the
# structured products of 64 images took 0.10 s against 0.45 s at the 8 GiB cap
_DEFAULT_MEMORY = 2**30


def _default_memory(device: torch.device) -> int:
    """``memory=None``'s bytes: the larger of 1 GiB and a quarter of the memory free on the
    device (on a GPU with what the caching allocator holds unused, so that the allowance does
    not shrink after a large computation; on the CPU, the host's available memory where the
    system says it; else 1 GiB). A kernel of a ResNet-18 on 64 images takes 29 GB of Jacobians:
    chunked to 1 GiB on an 80 GB card it recomputed them thousands of times, and on a CPU with
    20 GB available the Jacobian contraction of 8 full-width images took 47.7 s against the
    torch.func tutorial's 12.4 s."""
    if device.type == "cuda":
        free = available_device_memory(device)
    else:
        free = available_host_memory()
    return max(_DEFAULT_MEMORY, free // 4)


@dataclass(frozen=True)
class NTK:
    """The empirical NTK of a model on two sets of inputs.

    Fields:
        kernel: ``mode="full"``: (n₁, n₂, O, O), ``kernel[i, j, a, b]`` = ⟨∂f_a(x_i)/∂θ,
            ∂f_b(x'_j)/∂θ⟩; ``"trace"``: (n₁, n₂), Σ_a of those with a = b; ``"diagonal"``:
            (n₁, O), ``kernel[i, a]`` = ‖∂f_a(x_i)/∂θ‖². Units: output² (the outputs' units
            squared, per unit parameter²). In the dtype of the model's outputs (float32 for a
            half-precision model), on the model's device.
        per_layer: with ``per_layer=True``, the kernel restricted to each layer's parameters,
            by module name (:func:`dynlens.parameters.layer_of`), in parameter order; they sum
            to ``kernel``. Otherwise None.
        mode: "trace", "full" or "diagonal".
        implementation: the one used, "jacobian", "ntk_vector" or "structured" (after "auto" chose).
        num_outputs: O, the entries of one example's outputs.
        num_params: P, the parameters differentiated.
        elapsed: wall-clock seconds.
    """

    kernel: Tensor
    per_layer: dict[str, Tensor] | None
    mode: str
    implementation: str
    num_outputs: int
    num_params: int
    elapsed: float


# ----------------------------------------------------------------------------- the model's outputs


def _flat_outputs(function: ModelFunction, p: Params, inputs: Any) -> Tensor:
    """The outputs on ``inputs`` as (n, O): every output tensor's entries of one example, in order."""
    return _flattened(function.outputs(p, inputs))


def _flattened(outputs: Any) -> Tensor:
    """A model's outputs as (n, O) (:func:`_flat_outputs`)."""
    leaves = [t for t in tree_flatten(outputs)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise ValueError("the model returned no tensor; the NTK needs tensor outputs")
    n = leaves[0].shape[0] if leaves[0].dim() > 0 else 1
    return torch.cat([t.reshape(n, -1) for t in leaves], dim=1)


def _sum_of_outputs(outputs: Any, targets: Any) -> Tensor:
    return sum(t.sum() for t in tree_flatten(outputs)[0] if isinstance(t, Tensor))  # type: ignore[return-value]


def _fitting(budget: int, per_item: int, memory: int | None, what: str) -> int:
    """How many items of ``per_item`` bytes fit in ``budget``; MemoryBudgetTooSmall when not even
    one fits a ``memory`` the caller set (the default budget is a chunking guide, not a limit)."""
    if memory is not None and per_item > memory:
        raise MemoryBudgetTooSmall(
            f"{what} needs about {per_item:,} bytes and memory={memory:,} is allowed; raise memory or "
            "measure fewer parameters (params=)"
        )
    return max(1, budget // per_item)


def _numel(function: ModelFunction, names: Sequence[str]) -> int:
    return sum(function.params[n].numel() for n in names)


def _layers(names: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    return groups


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _tiled(chunk: int, n: int, device: torch.device) -> int:
    """``chunk`` on the devices of :data:`_TILED_ON` when it splits ``n`` examples: rounded down
    to a multiple of :data:`_TILE` when it is at least one tile, else evened out (as many
    chunks, of equal size: the room it leaves goes to the factor passes, :func:`_pass_group`).
    The products of two chunks' Jacobians have chunk × chunk outputs, which a GPU's GEMMs cut
    into tiles of 128: on an H200 the trace contraction ran at 13.8 TFLOP/s with chunks of 152
    and 33 with chunks of 128 (the same time for 128 as for 152 examples would take:
    ``benchmarks/ntk_contraction.py``)."""
    if device.type not in _TILED_ON or chunk >= n:
        return chunk
    if chunk >= _TILE:
        return chunk - chunk % _TILE
    return -(-n // -(-n // chunk))


def _computes_twice(n1: int, n2: int, same: bool, chunk: int) -> bool:
    """Whether :func:`_kernel_blocks` computes some chunk's factors more than once when none are
    kept between blocks: of one set in more than two chunks, else when the first set takes more
    than one."""
    return -(-n1 // chunk) > 2 if same else n1 > chunk


def _no_check() -> None:
    """The ``check`` of a measurement without a deadline."""


def _factored_examples(n1: int, n2: int, same: bool, chunk: int, keep: bool) -> int:
    """Examples whose factors :func:`_kernel_blocks` computes, counting each time (a chunk's at
    most ``chunk``): every example once with kept factors; else, of one set in C chunks,
    1 + C(C−1)/2 chunks, and of two sets the first once and the second again for each chunk
    of the first."""
    rows = -(-n1 // chunk)
    if same:
        return n1 if keep else min(n1, chunk) * (1 + rows * (rows - 1) // 2)
    return n1 + (n2 if keep else rows * n2)


def _computations(n1: int, n2: int, same: bool, chunk: int, keep: bool) -> int:
    """Factor computations (each a forward pass and O backward passes over a chunk) that
    :func:`_kernel_blocks` makes: of one set in C chunks, C with kept factors, else
    1 + C(C−1)/2; of two sets, the first set's chunks once and the second's once (kept) or
    again for each chunk of the first."""
    rows, columns = -(-n1 // chunk), -(-n2 // chunk)
    if same:
        return rows if keep else 1 + rows * (rows - 1) // 2
    return rows + (columns if keep else rows * columns)


def _passes_cost(n1: int, n2: int, same: bool, chunk: int, keep: bool, num_outputs: int, group: int) -> float:
    """The factor passes of a plan in the time of one plain backward pass, where the host issuing
    them is the bottleneck (a GPU's small chunks): per factor computation a forward pass and a
    backward pass batched over outputs cost 3 each, a backward pass of one output 1
    (:func:`_output_gradients` with ``group`` outputs a pass); each example factored 0.5 more, the
    device's work. On an H200 the NTK probe's call in 0.5 GiB, a ResNet-18's trace kernel of 32
    images: in one set, chunks of 3 (56 computations, batched passes) 1.94 s; in six groups of
    layers that keep their factors (20 computations, passes of 1–3 outputs) 0.62 s. A 124M
    decoder's of 8 sequences in 0.7 GiB: one set, chunks of one (29 computations, passes of 16)
    1.95 s; five groups (13 computations, 32 passes of one output each) 2.20 s
    (``benchmarks/ntk_probe_first.py``)."""
    if group <= 1 or num_outputs == 1:
        passes = float(num_outputs)
    else:
        full, rest = divmod(num_outputs, group)
        passes = 3.0 * full + (3.0 if rest > 1 else float(rest))
    return (_computations(n1, n2, same, chunk, keep) * (3.0 + passes)
            + 0.5 * _factored_examples(n1, n2, same, chunk, keep))


def _layer_groups(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
                  budget: int, itemsize: int, kept_examples: int, activation: int) -> list[dict[str, _Layer]] | None:
    """The structured layers cut, in their order, into as few groups as keep their factors of
    ``kept_examples`` examples for the whole kernel (:func:`_keeps_factors`) with room left for a
    chunk of one example (:func:`_chunk_terms`), each group measured by its own factor passes
    (its layers hooked, the backward passes stopping at its first layer); None where one layer
    alone does not. Where the factors of every layer do not fit at once, G groups compute every
    example's factors G times instead of the chunks' factors again and again (1 + C(C−1)/2
    computations of C chunks of one set)."""
    numbers = budget // itemsize
    groups: list[dict[str, _Layer]] = []
    current: dict[str, _Layer] = {}

    def fits(group: dict[str, _Layer]) -> bool:
        linear, kept, quadratic = _chunk_terms(group, routes, num_outputs, mode, itemsize, activation)
        return (_keeps_factors(group, routes, num_outputs, mode, budget, itemsize, kept_examples)
                and kept_examples * kept + linear + quadratic <= numbers)

    for name, layer in layers.items():
        if fits({**current, name: layer}):
            current[name] = layer
            continue
        if not current or not fits({name: layer}):
            return None
        groups.append(current)
        current = {name: layer}
    groups.append(current)
    return groups


def _plan_cost(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
               pairs: int, factored: int) -> int:
    """Multiply-adds of the structured products of the linear and convolutional layers by
    ``routes`` (the others cost the same by any route set compared here): for each of
    ``factored`` examples, the O backward passes through the layer (O·T·k·out) and, on the
    Jacobian route, its Jacobians (O·T·out·k); for each of ``pairs`` pairs, the route's products
    (:func:`_route_costs`). Compares route sets whose chunks differ: a set that keeps more per
    example takes smaller chunks and computes factors more often."""
    total = 0
    for name, layer in layers.items():
        if layer.kind not in ("linear", "conv"):
            continue
        by_positions, by_jacobians = _route_costs(layer, num_outputs, mode, factored, pairs)
        passes = factored * num_outputs * layer.positions * layer.inputs * layer.outputs
        total += passes + (by_jacobians if routes[name] == "jacobians" else by_positions)
    return total


def _mirrored(block: Tensor, mode: KernelMode) -> Tensor:
    """The block of the pair (second chunk, first chunk) from that of (first, second) of one set:
    K(x', x) = K(x, x')ᵀ, with the outputs' axes swapped for "full"."""
    return block.transpose(0, 1) if mode == "trace" else block.permute(1, 0, 3, 2)


def _kernel_blocks(n1: int, n2: int, chunk: int, same: bool, mode: KernelMode,
                   first: Callable[[int, int], Any], second: Callable[[int, int], Any],
                   block: Callable[[Any, Any], dict[str, Tensor]],
                   check: Callable[[], None] | None = None,
                   into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The kernels of two sets of examples assembled from blocks of two chunks: ``first(s, e)``
    and ``second(s, e)`` give a chunk's factors (Jacobians, or inputs and output gradients) of
    the first and of the second set, ``block(f1, f2)`` each layer's block from two chunks'
    factors. Of one set (``same``) only the blocks on and above the diagonal are computed, the
    others mirrored (:func:`_mirrored`), and a row's blocks run from the last chunk back to the
    one after the diagonal, whose factors are the next row's first ones: without factors kept
    between blocks, C chunks cost 1 + C(C−1)/2 factor computations (as many as kept factors for
    C ≤ 2) instead of C + C². "diagonal" pairs each chunk with itself. ``check`` is called
    before each chunk's factors and each block (it may raise to stop the measurement).

    Each block is added into its place in the kernel as it comes (one kernel and one block held,
    not every block and then the kernel they are put together into); ``into``: kernels by name
    to add to (the other parts of one kernel), returned with this one's added, the names it
    lacks created."""
    check = check or _no_check
    rows, columns = _chunks(n1, chunk), _chunks(n2, chunk)
    kernels = {} if into is None else into

    def put(found: dict[str, Tensor], r: slice, c: slice | None) -> None:
        for name, value in found.items():
            if name not in kernels:
                shape = (n1, *value.shape[1:]) if c is None else (n1, n2, *value.shape[2:])
                kernels[name] = value.new_zeros(shape)
            kernel = kernels[name]
            if c is None:
                kernel[r] += value
                continue
            kernel[r, c] += value
            if same and r != c:
                kernel[c, r] += _mirrored(value, mode)

    carried: Any = None
    for r, (s1, e1) in enumerate(rows):
        if carried is None:
            check()
            f1 = first(s1, e1)
        else:
            f1, carried = carried, None
        if mode == "diagonal":
            check()
            put(block(f1, f1), slice(s1, e1), None)
        elif same:
            check()
            put(block(f1, f1), slice(s1, e1), slice(s1, e1))
        if mode != "diagonal":
            for c in (range(len(columns) - 1, r, -1) if same else range(len(columns))):
                check()
                f2 = second(*columns[c])
                check()
                put(block(f1, f2), slice(s1, e1), slice(*columns[c]))
                if same and c == r + 1:
                    carried = f2
                del f2
        del f1
    return kernels


# ----------------------------------------------------------------------------- Jacobian contraction


def _jacobians(function: ModelFunction, inputs: Any, names: Sequence[str]) -> Params:
    """Per-example Jacobians of the flat outputs with respect to the parameters ``names``:
    ``{name: (n, O, numel)}`` (``vmap`` of ``jacrev``).

    Where ``vmap`` cannot run the model over examples (Python control flow on tensor values,
    such as a Hugging Face model's attention-mask checks, or an operation with no batching rule:
    ``unique_consecutive`` in T5), each example's Jacobian is taken alone, O backward passes
    each (same numbers, slower), with a ``RuntimeWarning`` naming the layer."""
    params = function.params
    chosen = {n: params[n] for n in names}

    def one(q: Params, x: Any) -> Tensor:
        return _flat_outputs(function, {**params, **q}, _unsqueeze(x))[0]

    try:
        jac = vmap(jacrev(one), in_dims=(None, _example_dims(inputs)))(chosen, inputs)
    except OutOfMemoryError:
        raise
    except RuntimeError as err:
        where = failing_module(function.model, err)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(
            f"dynlens: the NTK's per-example Jacobians by torch.func.vmap failed"
            f"{f' in layer {where}' if where else ''} ({type(err).__name__}: {first}); computed one "
            "example at a time instead (same kernel, slower)", RuntimeWarning, stacklevel=3)
        return _jacobians_one_by_one(function, inputs, chosen)
    return {name: j.flatten(2) for name, j in jac.items()}


def _jacobians_one_by_one(function: ModelFunction, inputs: Any, chosen: Params) -> Params:
    """:func:`_jacobians` by a loop: per example, one backward pass per output."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in chosen.items()}
    rows: dict[str, list[Tensor]] = {n: [] for n in chosen}
    for i in range(batch_size(inputs)):
        with torch.enable_grad():
            out = _flat_outputs(function, {**function.params, **leaves}, slice_examples(inputs, i, i + 1))[0]
            per_output = [torch.autograd.grad(out[a], list(leaves.values()), retain_graph=a + 1 < out.numel(),
                                              allow_unused=True) for a in range(out.numel())]
        for k, (name, leaf) in enumerate(leaves.items()):
            rows[name].append(torch.stack([torch.zeros_like(leaf) if g[k] is None else g[k]
                                           for g in per_output]).flatten(1))
    return {name: torch.stack(parts) for name, parts in rows.items()}


def _contract(j1: Params, j2: Params, names: Sequence[str], mode: KernelMode) -> Tensor:
    """Σ over the parameters ``names`` of the Jacobians' products, in the layout of ``mode``:
    one product per parameter tensor, summed (concatenating the Jacobians first copied all of
    them and made the contraction 2.6–6× slower than the torch.func tutorial's)."""
    total: Tensor | None = None
    for n in names:
        a = j1[n]
        if mode == "diagonal":
            part = (a * a).sum(2)
        elif mode == "trace":
            part = torch.einsum("iap,jap->ij", a, j2[n])
        else:
            part = torch.einsum("iap,jbp->ijab", a, j2[n])
        total = part if total is None else total + part
    assert total is not None
    return total


def _by_jacobians(function: ModelFunction, inputs1: Any, inputs2: Any, same: bool, mode: KernelMode,
                  groups: dict[str, list[str]], chunk: int, check: Callable[[], None] | None = None,
                  into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Each layer's kernel by Jacobian contraction, chunk by chunk of examples (added to
    ``into``'s kernels: :func:`_kernel_blocks`).

    With two sets larger than one chunk, the second set's Jacobians are recomputed for every chunk
    of the first (n₁/chunk · n₂ Jacobians in all), so memory stays at two chunks' Jacobians; of
    one set, only the blocks on and above the diagonal (:func:`_kernel_blocks`)."""
    n1, n2 = batch_size(inputs1), batch_size(inputs2)
    names = [n for group in groups.values() for n in group]
    return _kernel_blocks(
        n1, n2, chunk, same, mode,
        lambda s, e: _jacobians(function, slice_examples(inputs1, s, e), names),
        lambda s, e: _jacobians(function, slice_examples(inputs2, s, e), names),
        lambda j1, j2: {layer: _contract(j1, j2, members, mode) for layer, members in groups.items()}, check, into)


# ----------------------------------------------------------------------------- NTK-vector products


def _by_products(function: ModelFunction, inputs1: Any, inputs2: Any, mode: KernelMode,
                 groups: dict[str, list[str]], chunk: int, columns: int, num_outputs: int,
                 check: Callable[[], None] | None = None) -> dict[str, Tensor]:
    """Each layer's kernel by NTK-vector products (``jvp`` of ``vjp``, Novak et al. 2022).

    For a chunk X₁ of the first set, the vector-Jacobian product of its outputs with the basis
    cotangent e_(i,a) is J(x_i)_aᵀ (in eval mode the examples do not interact); the
    Jacobian-vector product of the second set's outputs with it, restricted to one layer's
    parameters, is the row Θ_layer(x_i, ·)_(a, ·). ``columns`` cotangents are pushed at a time
    (``vmap``'s chunk_size); ``check`` is called before each block."""
    check = check or _no_check
    params = function.params
    n1, n2 = batch_size(inputs1), batch_size(inputs2)
    o = num_outputs
    rows: dict[str, list[Tensor]] = {layer: [] for layer in groups}
    for s1, e1 in _chunks(n1, chunk):
        x1 = slice_examples(inputs1, s1, e1)
        c1 = e1 - s1
        _, pullback = vjp(lambda p, x1=x1: _flat_outputs(function, p, x1), params)
        basis = torch.eye(c1 * o, dtype=next(iter(params.values())).dtype,
                          device=function.device).view(c1 * o, c1, o)
        targets = [(s1, e1)] if mode == "diagonal" else _chunks(n2, chunk)
        blocks: dict[str, list[Tensor]] = {layer: [] for layer in groups}
        for s2, e2 in targets:
            check()
            x2 = x1 if mode == "diagonal" else slice_examples(inputs2, s2, e2)

            def row(cotangent: Tensor, x2: Any = x2, pullback: Any = pullback) -> dict[str, Tensor]:
                vector = pullback(cotangent)[0]
                out = {}
                for layer, names in groups.items():
                    primals = {n: params[n] for n in names}

                    def restricted(q: Params) -> Tensor:
                        return _flat_outputs(function, {**params, **q}, x2)

                    out[layer] = jvp(restricted, (primals,), ({n: vector[n] for n in names},))[1]
                return out

            products = vmap(row, chunk_size=columns)(basis)
            for layer in groups:
                # (c1·O, c2, O) -> (c1, c2, O, O)
                full = products[layer].reshape(c1, o, e2 - s2, o).permute(0, 2, 1, 3)
                if mode == "full":
                    blocks[layer].append(full)
                elif mode == "trace":
                    blocks[layer].append(torch.einsum("ijaa->ij", full))
                else:
                    blocks[layer].append(torch.einsum("iiaa->ia", full))
        for layer in groups:
            rows[layer].append(blocks[layer][0] if mode == "diagonal" else torch.cat(blocks[layer], dim=1))
    return {layer: torch.cat(parts, dim=0) for layer, parts in rows.items()}


# ----------------------------------------------------------------------------- structured layers

# the products of a layer's inputs a (n, T, k), with themselves and with its output gradients
# g (O, n, T, out), for each mode: (a·a')_(ts), (g·g')_(ts) by output pair, then their product
# summed over the positions t, s (T counts the positions a layer is applied at: 1 for a vector,
# the output pixels of a convolution, whose a is its unfolded input patches). Two steps, because
# torch.einsum without opt_einsum contracts four operands left to right through an
# n₁·n₂·T·O·out intermediate.
_INPUTS = {"full": "itk,jsk->ijts", "trace": "itk,jsk->ijts", "diagonal": "itk,isk->its"}
_GRADIENTS = {"full": "aitl,bjsl->ijabts", "trace": "aitl,ajsl->ijts", "diagonal": "aitl,aisl->iats"}
_PRODUCT = {"full": "ijts,ijabts->ijab", "trace": "ijts,ijts->ij", "diagonal": "its,iats->ia"}
_BIAS = {"full": "ail,bjl->ijab", "trace": "ail,ajl->ij", "diagonal": "ail,ail->ia"}

# a linear or convolutional layer takes the Jacobian route when its multiply-add estimate is
# below this fraction of the positions route's (:func:`_route`; tests set 0 or inf to force one)
_JACOBIAN_ROUTE_BELOW = 1.0
# the devices on which the full kernel's products over positions take several examples of the
# second set at once (_full_by_positions): on an H200 a ResNet-18's full kernel of 64 images took
# 0.141 s so and 0.292 s one at a time; on a 2-core CPU VM the same kernel took 38-49 s so and
# 28-33 s one at a time (the products 18-25 against 7-9 s, two alternating runs each: their
# intermediates leave the caches). Tests add "cpu" to check the batched path's memory.
_COLUMNS_AT_ONCE_ON: tuple[str, ...] = ("cuda",)
# the devices on which chunks that split the examples are whole tiles of _TILE examples (_tiled)
_TILED_ON: tuple[str, ...] = ("cuda",)
_TILE = 128
# the devices on which the factor passes take several outputs at once, in the room the chunk
# rule leaves (_output_gradients, _pass_group)
_BATCHED_PASSES_ON: tuple[str, ...] = ("cuda",)
# the most examples a chunk may have for its factor passes to be batched over the outputs when
# its structured layers include convolutions: on an H200 a ResNet-18's ten passes took 0.026 s
# batched against 0.053 s one at a time for 32 images, 0.045 against 0.058 for 64, but 0.098
# against 0.088 for 128 and 0.191 against 0.154 for 256 (cuDNN's backward on ten times the
# batch); the decoder's and the MLP's passes were as fast or faster batched at every size
# measured, up to 256 (benchmarks/ntk_floor.py --groups, RESULTS.md)
_BATCHED_CONVOLUTION_EXAMPLES = 64
# the devices on which a convolution's patches are one copy of a strided view of its padded
# input (_unfolded), not F.unfold: on a GPU F.unfold launches one im2col kernel per example (1,280
# for a ResNet-18's 20 convolutions on 64 images), which took 9 ms of the host while the device
# waited, of a full kernel of 0.12 s on an H200 (ntk_profile.py --host)
_STRIDED_PATCHES_ON: tuple[str, ...] = ("cuda",)
# the devices on which the structured layers may be split into groups that each keep their
# factors for the whole kernel (_layer_groups), where one set of factors kept for all the layers
# does not fit and the chunks' factors would be computed again block after block: a GPU, where
# small chunks' factor passes cost what the host takes to issue them (_passes_cost)
_LAYER_GROUPS_ON: tuple[str, ...] = ("cuda",)
# "auto" takes the structured products when the structured layers leave at most this fraction
# of the parameters to Jacobian contraction (and chunks of two of their Jacobians fit memory)
_REST_FRACTION = 0.1


@dataclass(frozen=True)
class _Layer:
    """A layer the structured products compute: ``kind`` "linear" (nn.Linear), "conv"
    (nn.Conv1d/nn.Conv2d as a linear map of its unfolded input patches), "embedding"
    (nn.Embedding, a linear map of one-hot tokens) or "norm" (the affine parameters of BatchNorm
    in eval mode, LayerNorm, GroupNorm); ``names`` its parameters (weight, then bias if it has
    one); per example: ``positions`` T (the rows of a linear layer's input, a convolution's
    output positions, an embedding's tokens, a normalisation's entries per weight entry),
    ``inputs`` k (in; C_in·kernel size; the vocabulary; 1 for a normalisation) and ``outputs``
    (out; C_out; the embedding's width; the weight's entries); ``size`` the parameters' entries.

    Kind "tied": a weight W (V×d) shared by one ``nn.Embedding`` and one ``nn.Linear`` (GPT-2's
    token embedding and output layer), keyed by the layer of W's name; ``names`` (W,),
    ``positions`` T the embedding's tokens, ``inputs`` V, ``outputs`` d, ``modules`` the two
    modules' names (embedding, linear), ``tied_positions`` S the rows of the linear layer's
    input, and ``active`` the rows of those whose output gradient was not zero on the check's
    examples (a language model measured at its last position: 1), which the route's estimate
    takes (0: unknown, S).

    ``shared``: an ``nn.Embedding`` called on indices without the examples' dimension (GPT-2's
    position embedding, ``embedding(arange(T))``), its output broadcast to every example by
    the model: the factor passes hand the model that output expanded to each example
    (:func:`_shared_output`), so that each example's output gradient is its own."""

    kind: str
    names: tuple[str, ...]
    positions: int
    inputs: int
    outputs: int
    size: int
    modules: tuple[str, ...] = ()
    tied_positions: int = 0
    active: int = 0
    shared: bool = False

    def factor_numbers(self, num_outputs: int) -> int:
        """Numbers of one example's factors while they are computed: inputs and O output
        gradients (a normalisation's normalised input, output gradients and O·size Jacobian
        entries; a tied weight's tokens, embedding output gradients, linear inputs and linear
        output gradients at the active positions, and one output's at all positions)."""
        t, k, out = self.positions, self.inputs, self.outputs
        if self.kind == "norm":
            return t * out * (1 + num_outputs) + num_outputs * self.size
        if self.kind == "embedding":  # the tokens, not their one-hot rows
            return t + num_outputs * t * out
        if self.kind == "tied":
            # the linear layer's output gradients kept at its active positions as the passes
            # come, beside one output's at all S of them (:func:`_output_gradients`'s
            # ``trimmed``; a batched pass's further outputs are :meth:`pass_numbers`), and its
            # inputs at all S until :func:`_tied_factors` takes the active ones
            s, active = self.tied_positions, self.linear_positions()
            return self._tied_numbers(num_outputs, active) + (s - active) * out + self.pass_numbers()
        return t * k + num_outputs * t * out

    def pass_numbers(self) -> int:
        """Numbers a pass holds an example for each output beyond its factors: a tied weight's
        linear-layer output gradient at all S positions (S·V; the factors keep the active ones);
        0 for the other kinds, whose factors are the pass's gradients."""
        return self.tied_positions * self.inputs if self.kind == "tied" else 0

    def _tied_numbers(self, num_outputs: int, s: int) -> int:
        """A tied weight's factors with S = ``s`` linear-layer positions: T tokens, O·T·d
        embedding output gradients, S·d linear inputs, O·S·V linear output gradients."""
        t, v, d = self.positions, self.inputs, self.outputs
        return t + num_outputs * t * d + s * d + num_outputs * s * v

    def kept_numbers(self, num_outputs: int) -> int:
        """Numbers of one example's factors once computed, as a block reads them: those of
        :meth:`factor_numbers`, a tied weight's linear layer at its active positions only
        (:meth:`linear_positions`; the passes and :func:`_tied_factors` drop the others). A 124M decoder
        measured at its last position keeps O·V numbers of the output layer an example, not
        O·S·V: 1.6M, not 25.7M, for 32 outputs and 16 tokens."""
        if self.kind != "tied":
            return self.factor_numbers(num_outputs)
        return self._tied_numbers(num_outputs, self.linear_positions())

    def linear_positions(self) -> int:
        """A tied weight's linear-layer positions the route's estimate takes: ``active`` where
        the check saw it, else S."""
        return self.active or self.tied_positions


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """(kernel, dilation, padding, stride) of a convolution as ``F.unfold`` takes them (a Conv1d
    as a Conv2d of height 1), or None where the structured products do not apply: groups > 1,
    a padding mode other than zeros, asymmetric ``padding="same"``, or another kind of layer."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups != 1 or module.padding_mode != "zeros":
        return None
    dims = len(module.kernel_size)
    if module.padding == "valid":
        padding: tuple[int, ...] = (0,) * dims
    elif module.padding == "same":
        pads = module._reversed_padding_repeated_twice  # (left, right) per dimension, last first
        if list(pads[0::2]) != list(pads[1::2]):
            return None
        padding = tuple(reversed(pads[0::2]))
    else:
        padding = tuple(module.padding)  # type: ignore[arg-type]
    geometry = (tuple(module.kernel_size), tuple(module.dilation), padding, tuple(module.stride))
    if dims == 1:
        return tuple((1 if i != 2 else 0, v[0]) for i, v in enumerate(geometry))  # type: ignore[misc]
    return geometry  # type: ignore[return-value]


# the layer types whose structured factors are known; a subclass must keep its forward
_OWN_FORWARD = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                nn.GroupNorm)


def _kind(module: nn.Module) -> str | None:
    """The structured kind of a layer ("linear", "embedding", "conv", "norm"), or None. A
    subclass that overrides ``forward`` is none of them: torchvision's ``LayerNorm2d`` (ConvNeXt)
    permutes its input to channels-last inside its forward, timm's ``Conv2dSame`` pads it, so
    its input is not what the layer's own operation takes."""
    base = next((cls for cls in _OWN_FORWARD if isinstance(module, cls)), None)
    if base is None or type(module).forward is not base.forward:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        # max_norm renormalises the weight in place; scale_grad_by_freq changes the gradient
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None
    if _conv_geometry(module) is not None:
        return "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # eval mode with running statistics: a function of each example alone
        return "norm" if module.affine and module.track_running_stats else None
    if isinstance(module, nn.LayerNorm):
        return "norm" if module.elementwise_affine else None
    if isinstance(module, nn.GroupNorm):
        return "norm" if module.affine else None
    return None


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """A convolution's input as (n, T, C_in·kernel size): its patches, in the order of the
    weight's flattened entries, at the T output positions."""
    kernel, dilation, padding, stride = _conv_geometry(module)  # type: ignore[misc]
    if x.dim() == 3:
        x = x.unsqueeze(2)
    if x.device.type in _STRIDED_PATCHES_ON:
        return _unfolded(x, kernel, dilation, padding, stride).transpose(1, 2)
    return F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)


def _unfolded(x: Tensor, kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
              stride: tuple[int, int]) -> Tensor:
    """``F.unfold(x, kernel, dilation, padding, stride)``, (n, C·kh·kw, T), as one copy of a
    strided view of the zero-padded input (n, C, kh, kw, H_out, W_out), in one kernel launch
    however many examples (:data:`_STRIDED_PATCHES_ON`); F.unfold where a window does not fit
    (its error)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    rows, columns = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if rows < 1 or columns < 1:
        return F.unfold(x, kernel, dilation, 0, stride)
    sn, sc, sy, sx = x.stride()
    view = x.as_strided((n, c, kh, kw, rows, columns), (sn, sc, dh * sy, dw * sx, sh * sy, sw * sx),
                        x.storage_offset())
    return view.reshape(n, c * kh * kw, rows * columns)


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    """A normalisation layer's input normalised with its own statistics, without its affine
    parameters: BatchNorm's running mean and variance, LayerNorm's and GroupNorm's per example."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    assert isinstance(module, nn.GroupNorm)
    return F.group_norm(x, module.num_groups, None, None, module.eps)


def _norm_jacobians(module: nn.Module, names: Sequence[str], xhat: Tensor, g: Tensor) -> dict[str, Tensor]:
    """A normalisation's per-example Jacobians (n, O, size) from its normalised input x̂ and
    output gradients g (O, n, ...): the weight's Σ over positions of g·x̂ per entry, the bias's
    Σ of g."""
    o, n = g.shape[:2]
    size = module.weight.numel()
    if isinstance(module, nn.LayerNorm):
        # entries (..., *normalized_shape): the positions lead
        rows = (g * xhat).reshape(o, n, -1, size).sum(2), g.reshape(o, n, -1, size).sum(2)
    else:
        # (n, C, ...): the channels lead
        rows = (g * xhat).reshape(o, n, size, -1).sum(3), g.reshape(o, n, size, -1).sum(3)
    return {name: row.transpose(0, 1) for name, row in zip(names, rows, strict=False)}


def _factors(function: ModelFunction, layers: dict[str, _Layer], inputs: Any, num_outputs: int,
             routes: dict[str, str] | None = None, group: int = 1) -> dict[str, Any]:
    """Each layer's factors on ``inputs``, from one forward pass with hooks and O backward passes
    (in eval mode the examples do not interact, so the gradient of Σ_i f_o(x_i) with respect to
    the layer's output on x_i is that of f_o(x_i)): a linear or convolutional layer's inputs
    a (n, T, k) and output gradients g (O, n, T, out) as ``(a, g)``, or, on the Jacobian route
    (``routes[name] == "jacobians"``) and for a normalisation, its per-example Jacobians
    ``{parameter: (n, O, size)}``. A tied weight (kind "tied"): ``(tokens (n, T), g_emb
    (O, n, T, d), h (n, S, d), g_lin (O, n, S, V))`` from its two modules, g_emb zero at the
    padding token and the linear layer's positions whose output gradient is zero for every
    output and example dropped (they add nothing); on the Jacobian route its per-example
    Jacobians J_emb + J_lin (:func:`_tied_jacobians`).

    The hooks read a layer's input when it runs (unfolded, or normalised). A layer whose output
    an in-place operation changed afterwards (``ReLU(inplace=True)``) hands the later layers a
    copy on a second forward pass, so that its output's gradient is its own."""
    # the modules hooked, by name, and the kind of input each reads: a tied weight's two modules
    hooked: dict[str, str] = {}
    for name, layer in layers.items():
        if layer.kind == "tied":
            hooked[layer.modules[0]], hooked[layer.modules[1]] = "embedding", "linear"
        else:
            hooked[name] = layer.kind
    modules = {name: function.model.get_submodule(name) for name in hooked}
    shared = {name for name, layer in layers.items() if layer.shared}
    n = batch_size(inputs)
    captured: dict[str, tuple[Tensor, Tensor, int]] = {}
    copied: set[str] = set()

    def hook(name: str) -> Any:
        kind = hooked[name]

        def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0].detach()
            if name in shared:
                x, output = x.reshape(1, -1).expand(n, -1), _shared_output(output, n)
            if kind == "conv":
                x = _patches(module, x)
            elif kind == "norm":
                x = _normalised(module, x)
            captured[name] = (x, output, output._version)
            # the later layers read a copy, which an in-place operation may change
            return output.clone() if name in copied else output
        return record

    leaves = {n: t.detach().requires_grad_(True) for n, t in function.params.items()}
    while True:  # at most once more than the layers changed in place: ``copied`` only grows
        handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
        try:
            with torch.enable_grad():
                out = _flat_outputs(function, leaves, inputs)
        finally:
            for handle in handles:
                handle.remove()
        # an output changed in place after its layer (ReLU(inplace=True)) has the later
        # operation's gradient: run again, handing on a copy of it
        changed = {name for name, (_, z, version) in captured.items() if z._version != version}
        if not changed - copied:
            break
        copied |= changed
    layer_outputs = [captured[name][1] for name in hooked]
    # a tied weight's linear layer on (n, S, V): its output's positions without a gradient
    # dropped as the passes come (a language model measured at its last position keeps one)
    names = list(hooked)
    tied_linears = {layer.modules[1] for layer in layers.values() if layer.kind == "tied"}
    trimmed: dict[int, Tensor | None] = {i: None for i, name in enumerate(names)
                                         if name in tied_linears and captured[name][1].dim() == 3}
    with torch.enable_grad():
        per_output = dict(zip(hooked, _output_gradients(out, layer_outputs, num_outputs, group, trimmed), strict=True))
    live = {names[i]: positions for i, positions in trimmed.items()}
    del out, layer_outputs
    factors: dict[str, Any] = {}
    for name, layer in layers.items():
        if layer.kind == "tied":
            factors[name] = _tied_factors(modules, layer, captured, per_output, live.get(layer.modules[1]), n,
                                          num_outputs, routes is not None and routes.get(name) == "jacobians")
            continue
        x = captured.pop(name)[0]
        g = per_output.pop(name)
        if layer.kind == "norm":
            factors[name] = _norm_jacobians(modules[name], layer.names, x, g)
            continue
        if layer.kind == "conv":
            a = x
            g = g.reshape(num_outputs, n, layer.outputs, -1).transpose(2, 3)
        elif layer.kind == "embedding":
            a = x.reshape(n, -1)  # the tokens (n, T)
            g = g.reshape(num_outputs, n, -1, layer.outputs)
        else:
            a = x.reshape(n, -1, layer.inputs)
            g = g.reshape(num_outputs, n, -1, layer.outputs)
        if routes is not None and routes.get(name) == "jacobians":
            # J_(i,a) = Σ_t g_(a,i,t) ⊗ a_(i,t): (n, O, out·k), the weight's entries in order
            jac = {layer.names[0]: torch.einsum("aitl,itk->ialk", g, a).reshape(n, num_outputs, -1)}
            if len(layer.names) > 1:
                jac[layer.names[1]] = g.sum(2).transpose(0, 1)
            factors[name] = jac
        else:
            factors[name] = (a, g)
    return factors


def _shared_output(output: Tensor, n: int) -> Tensor:
    """A shared layer's output (no examples' dimension) expanded to ``n`` examples, (n, *shape):
    what the model broadcasts it to, as a tensor of its own whose gradient is per example."""
    return output.unsqueeze(0).expand(n, *output.shape)


def _tied_factors(modules: dict[str, nn.Module], layer: _Layer, captured: dict[str, tuple[Tensor, Tensor, int]],
                  per_output: dict[str, Tensor], positions: Tensor | None, n: int, num_outputs: int,
                  jacobians: bool) -> tuple[Tensor, Tensor, Tensor, Tensor] | dict[str, Tensor]:
    """A tied weight's factors from its two modules' captured inputs and output gradients
    (:func:`_factors`): ``(tokens, g_emb, h, g_lin)``, or with ``jacobians`` its per-example
    Jacobians ``{W: (n, O, V·d)}``. The linear layer's output gradients come at ``positions``
    only, those with a gradient for some output and example (:func:`_output_gradients`'s
    ``trimmed``: the others add nothing), and its inputs are taken there; None: at every
    position (an output of more than three dimensions, not trimmed)."""
    embedding, linear = layer.modules
    tokens = captured.pop(embedding)[0].reshape(n, -1)
    g_emb = per_output.pop(embedding).reshape(num_outputs, n, -1, layer.outputs)
    # rows of the padding token get no gradient
    g_emb = g_emb * _kept(modules[embedding], tokens).to(g_emb.dtype)[None, :, :, None]
    h = captured.pop(linear)[0].reshape(n, -1, layer.outputs)
    g_lin = per_output.pop(linear).reshape(num_outputs, n, -1, layer.inputs)
    if positions is not None and len(positions) < h.shape[1]:
        h = h[:, positions]
    if jacobians:
        return {layer.names[0]: _tied_jacobians(tokens, g_emb, h, g_lin)}
    return tokens, g_emb, h, g_lin


def _tied_jacobians(tokens: Tensor, g_emb: Tensor, h: Tensor, g_lin: Tensor) -> Tensor:
    """A tied weight's per-example Jacobians (n, O, V·d), J = J_lin + J_emb: Σ_s g_lin_s ⊗ h_s,
    and g_emb_t added to row token_t (g_emb zero at the padding token)."""
    o, n, _, v = g_lin.shape
    d = h.shape[2]
    # (n, O, V, S) @ (n, 1, S, d): a batched product written in the Jacobian's layout
    jac = torch.matmul(g_lin.permute(1, 0, 3, 2), h.unsqueeze(1))
    for i in range(n):
        jac[i].index_add_(1, tokens[i], g_emb[:, i])
    return jac.reshape(n, o, v * d)


def _batched_pass(out: Tensor, layer_outputs: list[Tensor], basis: Tensor) -> tuple[Tensor, ...] | None:
    """The gradients of ``out`` with respect to each layer's output for each row of ``basis``
    (B, *out's shape), stacked (B, *its shape), in one backward pass vectorised over the rows by
    ``torch.func.vmap``; None where that fails (an operation without a batching rule). Its rules
    fold the rows into the examples' dimension of a convolution's or normalisation's backward:
    one call a layer. ``is_grads_batched`` (the older vmap) loops over the rows there and stacks
    the results: 11 calls a layer for 10 outputs, and on an H200 the decoder's factor passes took
    0.82, a ResNet-18's of 64 images 0.95–0.96 of its time (``benchmarks/ntk_factor_passes.py``)."""
    def pull(v: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(out, layer_outputs, grad_outputs=v, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(z) if g is None else g for g, z in zip(grads, layer_outputs, strict=True))

    try:
        with warnings.catch_warnings():
            # vmap's note that an operation is looped rather than batched
            warnings.filterwarnings("ignore", message="There is a performance drop")
            # the graph is kept: a pass that fails part-way is taken again, one output at a time
            return vmap(pull)(basis)
    except RuntimeError:
        return None


class _Trimmed:
    """A layer output's gradients, by pass group, kept at the positions (dimension 1 of the
    output, 2 of the gradients) where some output and example of the group has a gradient
    (:func:`_output_gradients`'s ``trimmed``); :meth:`whole` puts them together at the
    positions any group kept."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, Tensor, Tensor]] = []  # (first output, positions, gradients)
        self.live: Tensor | None = None

    def add(self, start: int, g: Tensor) -> None:
        """The gradients (B, n, S, ...) of outputs start, start + 1, …, start + B − 1."""
        live = g.ne(0).transpose(0, 2).reshape(g.shape[2], -1).any(1)
        positions = live.nonzero().squeeze(1)
        self.pieces.append((start, positions, g.index_select(2, positions)))
        self.live = live if self.live is None else self.live | live

    def whole(self, num_outputs: int) -> tuple[Tensor, Tensor]:
        """(gradients (O, n, L, ...), positions (L,)): zero where a group had none."""
        assert self.live is not None
        positions = self.live.nonzero().squeeze(1)
        if len(self.pieces) == 1 and self.pieces[0][2].shape[0] == num_outputs:
            return self.pieces[0][2], positions
        first = self.pieces[0][2]
        stacked = first.new_zeros((num_outputs, first.shape[1], len(positions), *first.shape[3:]))
        for start, kept, g in self.pieces:
            stacked[start:start + g.shape[0]].index_copy_(2, torch.searchsorted(positions, kept), g)
        return stacked, positions


def _output_gradients(out: Tensor, layer_outputs: list[Tensor], num_outputs: int, group: int = 1,
                      trimmed: dict[int, Tensor | None] | None = None) -> list[Tensor]:
    """The gradients of each output o (summed over the examples) with respect to each layer's
    output, stacked: (O, *its shape), by backward passes of ``group`` outputs each: one output a
    pass, or several in one pass batched over them (:func:`_batched_pass`). Batched passes hold
    ``group`` times a pass's gradients; a group whose batched pass fails is taken one output at
    a time. One group of all O outputs hands on its pass's gradients as they are.

    ``trimmed``: indices of layer outputs (n, S, …) whose positions without a gradient for any
    output and example are dropped as each pass's gradients come (:class:`_Trimmed`), and on
    return each index's positions kept (L,); its gradients are (O, n, L, …). A language model's
    output layer, measured at the last position, then holds O·V numbers an example, not O·S·V
    (at 16 tokens, 105 of the 326 MB a GPT-2 sequence's factors took while computed).

    On a GPU, batching pays where the passes are many small launches: the 124M decoder's trace
    kernel of 64 sequences (O = 32) took 0.78 s batched against 2.03 s one at a time on an H200,
    its full kernel 4.96 against 8.78 s; a ResNet-18's, device-bound, 0.97–0.99 of the time. On
    the CPU one at a time was the faster (0.40 against 0.43 s, a width-8 ResNet-18 on 64 images):
    :data:`_BATCHED_PASSES_ON`."""
    size = max(1, group)
    trims = {index: _Trimmed() for index in (trimmed or {})}

    def basis(start: int, stop: int) -> Tensor:
        rows = torch.zeros((stop - start, *out.shape), dtype=out.dtype, device=out.device)
        rows[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
        return rows

    def finished(stacked: list[Tensor | None]) -> list[Tensor]:
        for index, trim in trims.items():
            stacked[index], trimmed[index] = trim.whole(num_outputs)  # type: ignore[index]
        return stacked  # type: ignore[return-value]

    if num_outputs > 1 and size >= num_outputs:
        whole = _batched_pass(out, layer_outputs, basis(0, num_outputs))
        if whole is not None:
            for index, trim in trims.items():
                trim.add(0, whole[index])
            return finished([None if i in trims else g for i, g in enumerate(whole)])
    stacked: list[Tensor | None] = [
        None if i in trims else torch.empty((num_outputs, *z.shape), dtype=z.dtype, device=z.device)
        for i, z in enumerate(layer_outputs)]
    for start in range(0, num_outputs, size):
        stop = min(start + size, num_outputs)
        batched = _batched_pass(out, layer_outputs, basis(start, stop)) if 1 < stop - start < num_outputs else None
        if batched is not None:
            for i, (rows, g) in enumerate(zip(stacked, batched, strict=True)):
                if i in trims:
                    trims[i].add(start, g)
                else:
                    rows[start:stop] = g  # type: ignore[index]
            continue
        for o in range(start, stop):
            grads = torch.autograd.grad(out[:, o].sum(), layer_outputs, retain_graph=o + 1 < num_outputs,
                                        allow_unused=True)
            for i, (rows, g, z) in enumerate(zip(stacked, grads, layer_outputs, strict=True)):
                if i in trims:
                    trims[i].add(o, (torch.zeros_like(z) if g is None else g).unsqueeze(0))
                elif g is None:
                    rows[o].zero_()  # type: ignore[index]
                else:
                    rows[o] = g  # type: ignore[index]
    return finished(stacked)


def _pass_group(room: int, itemsize: int, chunk: int, activation: int, num_outputs: int,
                device: torch.device, convolutions: bool = False) -> int:
    """How many outputs one factor pass takes (:func:`_output_gradients`): on the devices of
    :data:`_BATCHED_PASSES_ON`, 1 plus as many more as the allowance's ``room`` numbers left by
    the chunk rule hold, each a pass's activations (``activation`` bytes an example) for
    ``chunk`` examples; else 1. The room is the one the full kernel's batched products take
    (:func:`_structured_room`): a chunk's factors are computed before or after a block's
    products, never during them. With ``convolutions`` among the structured layers, 1 for
    chunks of more than :data:`_BATCHED_CONVOLUTION_EXAMPLES` examples."""
    if device.type not in _BATCHED_PASSES_ON or activation <= 0:
        return 1
    if convolutions and chunk > _BATCHED_CONVOLUTION_EXAMPLES:
        return 1
    extra = room * itemsize // max(1, chunk * activation)
    return int(max(1, min(num_outputs, 1 + extra)))


def _route(layer: _Layer, num_outputs: int, mode: KernelMode, examples: int, pairs: int) -> str:
    """How :func:`_by_structure` computes a linear or convolutional layer's kernel, by
    multiply-adds (O' = O², or O for "trace" and "diagonal"; ``pairs`` n₁·n₂, or n for
    "diagonal"; ``examples`` N, the examples whose factors are computed):

    * "positions": the products of inputs and of output gradients over pairs of positions,
      pairs·T²·(k + O'·out + O') multiply-adds, intermediates of pairs·T²·(1 + O') numbers;
    * "jacobians": the per-example Jacobians from the same factors, J = Σ_t g_t ⊗ a_t
      (N·O·T·out·k), then contracted as Jacobians (pairs·O'·out·k), chunk·O·out·k numbers.

    A layer applied at one position (T = 1) always takes the positions route (its kernel is
    (a·a')(g·g'), cheaper than any Jacobian), as does an embedding (a_t·a'_s is whether the
    tokens match; its Jacobian has vocabulary·width entries); normalisations the Jacobian one."""
    if layer.kind == "norm":
        return "jacobians"
    if layer.kind == "tied":
        return _tied_route(layer, num_outputs, mode, examples, pairs)
    if layer.positions == 1 or layer.kind == "embedding":
        return "positions"
    by_positions, by_jacobians = _route_costs(layer, num_outputs, mode, examples, pairs)
    return "jacobians" if by_jacobians < _JACOBIAN_ROUTE_BELOW * by_positions else "positions"


def _route_costs(layer: _Layer, num_outputs: int, mode: KernelMode, examples: int, pairs: int) -> tuple[int, int]:
    """Multiply-adds of a linear or convolutional layer's two routes (:func:`_route`), as
    (positions, jacobians): pairs·T²·(k + O'·out + O') (for "full" at T > 1, the products of
    :func:`_full_by_positions`, pairs·(T²·(k + O·out) + T·O²·out)), and N·O·T·out·k to form the
    Jacobians of ``examples`` N plus pairs·O'·out·k to contract them."""
    t, k, out = layer.positions, layer.inputs, layer.outputs
    o = num_outputs * num_outputs if mode == "full" else num_outputs
    if mode == "full" and t > 1:
        by_positions = pairs * (t * t * (k + num_outputs * out) + t * o * out)
    else:
        by_positions = pairs * t * t * (k + o * out + o)
    return by_positions, examples * num_outputs * t * out * k + pairs * o * out * k


def _tied_route(layer: _Layer, num_outputs: int, mode: KernelMode, examples: int, pairs: int) -> str:
    """:func:`_route` of a tied weight (V×d; T tokens, S linear positions, the active ones if
    known), by multiply-adds:

    * "positions": the embedding's products over pairs of tokens (pairs·T²·O'·d), the linear
      layer's over pairs of positions (pairs·S²·(d + O'·V + O')) and the two cross terms
      (2·pairs·T·S·O·d, + 2·pairs·T·O²·d for "full"), no Jacobian formed;
    * "jacobians": J = Σ_s g_lin_s ⊗ h_s + the embedding's rows (N·O·S·V·d + N·O·T·d), then
      contracted (pairs·O'·V·d)."""
    t, v, d, s = layer.positions, layer.inputs, layer.outputs, layer.linear_positions()
    o = num_outputs * num_outputs if mode == "full" else num_outputs
    by_positions = pairs * (t * t * o * d + s * s * (d + o * v + o) + 2 * t * s * num_outputs * d)
    if mode == "full":
        by_positions += 2 * pairs * t * num_outputs * num_outputs * d
    by_jacobians = examples * num_outputs * (s * v * d + t * d) + pairs * o * v * d
    return "jacobians" if by_jacobians < _JACOBIAN_ROUTE_BELOW * by_positions else "positions"


def _tied_block_numbers(layer: _Layer, num_outputs: int, mode: KernelMode) -> int:
    """The most numbers a tied weight's positions-route products take at once for one pair of
    examples (one example for "diagonal"), O' = O² for "full", else O: the embedding's
    T²·(1 + O') (T² + O' for "full"), the linear layer's S²·(1 + O') (S² + O' and S·O·V of
    :func:`_full_by_positions` for "full"), or a cross term's gathered output gradients
    O·S·T and its product over positions, O·T·min(d, S) (:func:`_tied_cross`), each with the
    block's O'; S the linear layer's active positions, the ones its kept factors hold."""
    # the blocks read the kept factors, the linear layer's active positions only (_tied_factors)
    t, v, d, s = layer.positions, layer.inputs, layer.outputs, layer.linear_positions()
    o = num_outputs * num_outputs if mode == "full" else num_outputs
    if mode == "full":
        embedding, linear = t * t + o, s * s + o + s * num_outputs * v
    else:
        embedding, linear = t * t * (1 + o), s * s * (1 + o)
    cross = num_outputs * s * t + num_outputs * t * min(d, s)
    return max(embedding, linear, cross) + o


def _structured_numbers(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int,
                        mode: KernelMode) -> tuple[int, int, int]:
    """Numbers per example and per pair of examples that the structured products hold:
    (working, kept, quadratic). ``working``: a chunk's factors while they are computed, F per
    example and layer (T·k + O·T·out), plus, for "full" at several positions, the largest
    layer's one example's Σ_s (a_t·a'_s) g'_s (T·O·out), its inputs' products laid out for it
    (T²) and both chunks' output gradients laid out for the products (2·T·O·out): the layers'
    products are computed one after another (summed over the layers, a 124M decoder's full
    kernel of 64 sequences was cut into chunks of 5), and for "diagonal" the whole block (linear
    in the examples there). ``kept``: what a chunk keeps for its blocks, F on the positions
    route (a tied weight's active linear positions only: :meth:`_Layer.kept_numbers`), the
    O·size Jacobian entries on the Jacobian route. ``quadratic``: the largest positions-route block of
    one pair, O' = O² for "full", else O: "trace", the inputs' and the output gradients'
    products over positions and one copy of one of them that einsum makes to contract them,
    3·T² + O'; "full" at one position T²·(1 + O') + O', at several T² + O' (the rest is in
    ``working``); a tied weight's :func:`_tied_block_numbers`."""
    o = num_outputs * num_outputs if mode == "full" else num_outputs
    working, kept, quadratic, transient = 0, 0, 0, 0
    for name, layer in layers.items():
        factors = layer.factor_numbers(num_outputs)
        working += factors
        if routes[name] == "jacobians":
            kept += num_outputs * layer.size
            continue
        kept += layer.kept_numbers(num_outputs)
        if layer.kind == "tied":
            block = _tied_block_numbers(layer, num_outputs, mode)
        else:
            t = layer.positions
            if mode == "full" and t > 1:
                block = t * t + o
                # one layer's products at a time: the largest counts
                transient = max(transient, 3 * t * num_outputs * layer.outputs + t * t)
            elif mode == "trace":
                block = 3 * t * t + o
            else:
                block = t * t * (1 + o) + o
        if mode == "diagonal":
            working += block
        else:
            quadratic = max(quadratic, block)
    return working + transient, kept, quadratic


def _keeps_factors(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
                   budget: int, itemsize: int, kept_examples: int) -> bool:
    """Whether :func:`_by_structure` keeps every chunk's factors of the second set (and of the
    first when it is the same set) for the whole kernel: when they take at most half of
    ``budget``. Each chunk's factors (O backward passes over it) are then computed once; else
    the second set's are computed again for every chunk of the first, C² times for C chunks (on
    an H200, a ResNet-18's kernel of 64 images took 0.45 s in 8 GiB and 0.10 s in 110 GiB,
    where the chunks were larger). Never for "diagonal", which pairs each chunk with itself."""
    if mode == "diagonal":
        return False
    _, kept, _ = _structured_numbers(layers, routes, num_outputs, mode)
    return kept_examples * kept * itemsize <= budget // 2


def _chunk_terms(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
                 itemsize: int, activation: int) -> tuple[int, int, int]:
    """(linear, kept, quadratic) numbers of :func:`_structured_chunk`'s count: K per kept
    example, Q per pair, and per example of a chunk the larger of what its factors hold while
    computed and while a block reads them. Computed: its factors as the passes make them (W),
    their passes' activations (A), the other chunk's kept factors (K) and the Jacobians the
    Jacobian route forms while its factors are still held (J). Read: both chunks' kept factors
    and the copies of one layer's factors that the block's products make to contract them,
    2·K + 2·F (F the largest layer's kept factors). W + A + K + J or 2·K + 2·F + J.

    W holds the chunk's own factors as they are computed (the positions route keeps the inputs
    and output gradients it computed, as views), so counting two kept chunks beside W counted
    one twice: on a 2-core CPU a 124M decoder's trace kernel of 64 sequences in its default
    allowance took chunks of 9 sequences (W + A + 2·K = 626 MB a sequence), 30 factor
    computations and 325 s; now (437 MB) chunks of 11, 16 and 245 s
    (``benchmarks/ntk_chunk_count.py``). A ResNet-18's plans on a GPU's allowance are the same."""
    working, kept, quadratic = _structured_numbers(layers, routes, num_outputs, mode)
    formed = sum(num_outputs * layer.size for name, layer in layers.items() if routes[name] == "jacobians")
    largest = max((layer.kept_numbers(num_outputs) for name, layer in layers.items() if routes[name] != "jacobians"),
                  default=0)
    computed = working + -(-activation // itemsize) + kept
    return max(computed, 2 * kept + 2 * largest) + formed, kept, quadratic


def _structured_chunk(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
                      budget: int, itemsize: int, memory: int | None, kept_examples: int = 0,
                      activation: int = 0) -> int:
    """The most examples a chunk may hold so that what the structured products hold fits
    ``budget`` (:func:`_structured_numbers`): ``kept_examples`` examples' kept factors (those
    :func:`_keeps_factors` keeps; 0 when it keeps none), a chunk's factors while they are
    computed with the activations of their backward passes (``activation`` bytes an example),
    the other chunk's kept factors and a block's products: kept_examples·K + c·L + c²·Q numbers,
    L the larger of W + A + K + J and 2·K + 2·F + J (:func:`_chunk_terms`). MemoryBudgetTooSmall
    when one example does not fit a ``memory`` the caller set."""
    linear, kept, quadratic = _chunk_terms(layers, routes, num_outputs, mode, itemsize, activation)
    numbers = budget // itemsize - kept_examples * kept
    one = (linear + quadratic) * itemsize
    if memory is not None and one > memory:
        raise MemoryBudgetTooSmall(
            f"the structured layers' inputs, output gradients and products on one example need about "
            f"{one:,} bytes and memory={memory:,} is allowed; raise memory or measure fewer parameters (params=)")
    if quadratic == 0:
        return max(1, numbers // max(1, linear))
    chunk = int((math.sqrt(linear * linear + 4 * quadratic * max(0, numbers)) - linear) / (2 * quadratic))
    while chunk > 1 and chunk * linear + chunk * chunk * quadratic > numbers:
        chunk -= 1
    return max(1, chunk)


def _structured_room(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
                     budget: int, itemsize: int, chunk: int, kept_examples: int = 0, activation: int = 0) -> int:
    """The numbers of ``budget`` that :func:`_structured_chunk`'s count leaves free at ``chunk``
    examples a chunk (0 when none; ``chunk`` no more than the larger set): the room
    :func:`_full_by_positions` takes to handle several examples of the second set at once."""
    linear, kept, quadratic = _chunk_terms(layers, routes, num_outputs, mode, itemsize, activation)
    used = kept_examples * kept + chunk * linear + chunk * chunk * quadratic
    return max(0, budget // itemsize - used)


# _structured_layers's answers by model, keyed by what the check depends on (the parameters
# differentiated, O, the shapes of an example's inputs: _shapes_key); the weights' values do not
# change it (the layers found, and the bytes of the check's factors, which a later allowance must
# still hold)
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[tuple[tuple[str, _Layer], ...], int]]] = \
    weakref.WeakKeyDictionary()
# one example's activation bytes by model, _shapes_key and O (what ntk_of's memory plans read):
# the weights' values do not change them
_ACTIVATION_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[Any, int]] = weakref.WeakKeyDictionary()


def _shapes_key(function: ModelFunction, inputs: Any) -> tuple[Any, ...]:
    """What a plan read from one example depends on besides the weights' values: the parameters
    differentiated (names, shapes, dtypes), the device, and an example's input shapes and
    dtypes (a tensor's without its examples' dimension; another leaf by its type)."""
    chosen = function.params
    return (tuple((name, tuple(t.shape), t.dtype) for name, t in chosen.items()), function.device,
            tuple((tuple(t.shape[1:]), t.dtype) if isinstance(t, Tensor) else type(t)
                  for t in tree_flatten(inputs)[0]))


def _one_example(function: ModelFunction) -> tuple[int, int, int]:
    """(O, the outputs' item size, one example's activation bytes) from one example's forward
    pass. O is counted at every call (a model's outputs may depend on more than its parameters
    and input shapes: a flag that measures every position); the activation bytes, counted by a
    hook on every tensor the pass saves (:meth:`ModelFunction.outputs_and_activation_bytes`),
    are kept per model, :func:`_shapes_key` and O: the NTK probe measures the same model again
    and again, and on an H200 that counted pass was 3–5 ms of a ResNet-18's full kernel of 64
    images, before any of the kernel's work reached the device."""
    with torch.no_grad():
        probe = _flat_outputs(function, function.params, slice_examples(function.inputs, 0, 1))
    o, itemsize = probe.shape[1], probe.element_size()
    key = (_shapes_key(function, function.inputs), o)
    activation = _ACTIVATION_BYTES.get(function.model, {}).get(key)
    if activation is None:
        activation = function.outputs_and_activation_bytes(1)[1]
        _ACTIVATION_BYTES.setdefault(function.model, {})[key] = activation
    return o, itemsize, activation


def _structured_layers(function: ModelFunction, inputs: Any, num_outputs: int,
                       budget: int | None = None, covering: bool = False) -> dict[str, _Layer]:
    """The layers whose kernel the structured products compute exactly, by module name:
    ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (groups 1, zero padding given as numbers, "valid"
    or a symmetric "same"), ``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``), and
    the affine parameters of BatchNorm (with running statistics), LayerNorm and GroupNorm.

    A weight shared by exactly one ``nn.Embedding`` and one ``nn.Linear`` (both qualifying as
    above, as their ``weight``) is one layer of kind "tied", keyed by the layer of its name
    (:func:`_tied_candidates`): both modules run once per forward pass on inputs with the
    examples' dimension first, and the sum of both modules' factor gradients matches autograd's.

    A layer qualifies when its weight (and bias, if it has one) are plain parameters (not
    parametrised) among those differentiated, shared with no other module, the layer runs once
    per forward pass on inputs with the examples' dimension first (an embedding may run on
    indices shared by the examples, ``shared``, where the model's outputs are the same with its
    output expanded to them: :func:`_broadcasts`), and the gradient its factors give (Σ u_(i,o) g_(o,i,t) ⊗ a_(i,t) reshaped to
    the weight's shape; a normalisation's Σ u_(i,o) J_(i,o)) matches autograd's on a few examples
    for a random cotangent u (which catches a weight also read outside the layer's forward, or a
    BatchNorm in train mode).
    None where that check's factors (each layer's inputs and O output gradients on two
    examples) would take more than ``budget`` bytes: a language model's output layer alone holds
    O·T·vocabulary numbers (13 GB for 32 outputs, 512 positions and 50,257 words). With
    ``covering``, none unless the candidate layers leave at most ``_REST_FRACTION`` of the
    differentiated parameters (the automatic choice takes the structured products only then), so
    that a model they barely cover pays no check whose answer could not change the method.

    The check's answer is kept per model, parameter set, O and example shape: the NTK probe
    measures the same model again and again, and on an H200 the check (5–7 ms) was a third of
    an MLP's kernel of 64 examples."""
    key = (_shapes_key(function, inputs), num_outputs, covering)
    known = _CHECKED.get(function.model, {}).get(key)
    if known is not None:
        layers, factors_bytes = known
        if budget is not None and factors_bytes > budget:
            return {}
        return dict(layers)
    found, factors_bytes = _checked_layers(function, inputs, num_outputs, budget, covering)
    if found is not None:
        _CHECKED.setdefault(function.model, {})[key] = (tuple(found.items()), factors_bytes)
    return found or {}


def _checked_layers(function: ModelFunction, inputs: Any, num_outputs: int, budget: int | None,
                    covering: bool) -> tuple[dict[str, _Layer] | None, int]:
    """:func:`_structured_layers` without its cache, and the bytes of its factors: None where
    the check did not fit ``budget`` (an answer for this allowance only, not kept)."""
    chosen = function.params
    counts: dict[int, int] = {}
    for _, p in function.model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    candidates: dict[str, tuple[nn.Module, str, tuple[str, ...]]] = {}
    for name, module in function.model.named_modules():
        kind = _kind(module) if name else None
        if kind is None:
            continue
        # a parametrised weight (weight norm) or a bias held as a buffer is not the layer's own
        bias = getattr(module, "bias", None)
        if not isinstance(module.weight, nn.Parameter) or not (bias is None or isinstance(bias, nn.Parameter)):
            continue
        own = [(f"{name}.{k}", getattr(module, k)) for k in ("weight", "bias") if getattr(module, k, None) is not None]
        if all(n in chosen and counts[id(p)] == 1 for n, p in own):
            candidates[name] = (module, kind, tuple(n for n, _ in own))
    tied = _tied_candidates(function, counts)
    if not candidates and not tied:
        return {}, 0

    def rest_allowed(held: set[str]) -> bool:
        rest = sum(t.numel() for n, t in chosen.items() if n not in held)
        return rest <= _REST_FRACTION * sum(t.numel() for t in chosen.values())

    held = {n for _, _, names in candidates.values() for n in names} | {w for _, _, w in tied.values()}
    if covering and not rest_allowed(held):
        return {}, 0
    # the modules whose calls are counted: the candidates, and each tied weight's two modules
    counted = {name: module for name, (module, _, _) in candidates.items()}
    for embedding, linear, _ in tied.values():
        counted[embedding] = function.model.get_submodule(embedding)
        counted[linear] = function.model.get_submodule(linear)
    calls: dict[str, int] = dict.fromkeys(counted, 0)
    shapes: dict[str, tuple[int, int]] = {}  # the entries of an input and an output, all examples
    shared_shapes: dict[str, tuple[int, int]] = {}  # an embedding's on indices shared by the examples
    sample = slice_examples(inputs, 0, min(2, batch_size(inputs)))
    n = batch_size(sample)

    def counter(name: str) -> Any:
        def count(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            calls[name] += 1
            # the factors are read per example: a layer applied to a tensor without the examples'
            # dimension (a learned query, positions shared by all examples) is not structured
            # an embedding's tokens (n, ...), a linear layer's inputs (n, ..., in), a convolution's (n, C, ...)
            batched = (2 + len(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd)
                       else 1 if isinstance(module, nn.Embedding) else 2)
            if (args and isinstance(args[0], Tensor) and isinstance(output, Tensor) and args[0].dim() >= batched
                    and args[0].shape[0] == n and output.shape[0] == n):
                shapes[name] = (args[0].numel(), output.numel())
            elif isinstance(module, nn.Embedding) and args and isinstance(args[0], Tensor) and \
                    isinstance(output, Tensor):
                # indices shared by every example (positions): structured if the model's
                # outputs are the same with its output expanded to the examples (below)
                shared_shapes[name] = (args[0].numel(), output.numel())
        return count

    handles = [module.register_forward_hook(counter(name)) for name, module in counted.items()]
    try:
        with torch.no_grad():  # counting calls: no graph
            plain = _flat_outputs(function, function.params, sample)
    finally:
        for handle in handles:
            handle.remove()
    layers: dict[str, _Layer] = {}
    for name, (module, kind, names) in candidates.items():
        if calls[name] == 1 and name in shared_shapes and kind == "embedding" and name not in shapes:
            t, d = shared_shapes[name][0], module.weight.shape[1]
            layers[name] = _Layer(kind, names, t, module.weight.shape[0], d, chosen[names[0]].numel(), shared=True)
            continue
        if calls[name] != 1 or name not in shapes:
            continue
        size_in, size_out = (s // n for s in shapes[name])
        weight = module.weight
        if kind == "linear":
            t, k, out = size_in // max(1, weight.shape[1]), weight.shape[1], weight.shape[0]
        elif kind == "conv":
            t, k, out = size_out // weight.shape[0], weight[0].numel(), weight.shape[0]
        elif kind == "embedding":
            t, k, out = size_in, weight.shape[0], weight.shape[1]
        else:
            t, k, out = size_out // weight.numel(), 1, weight.numel()
        layers[name] = _Layer(kind, names, t, k, out, sum(chosen[p].numel() for p in names))
    for name, (embedding, linear, weight_name) in tied.items():
        # each module once a forward pass, on inputs with the examples' dimension first
        if calls[embedding] != 1 or calls[linear] != 1 or embedding not in shapes or linear not in shapes:
            continue
        vocabulary, width = chosen[weight_name].shape
        tokens, rows = shapes[embedding][0] // n, shapes[linear][0] // n // width
        layers[name] = _Layer("tied", (weight_name,), tokens, vocabulary, width, vocabulary * width,
                              modules=(embedding, linear), tied_positions=rows)
    if any(layer.shared for layer in layers.values()) and not _broadcasts(function, layers, sample, plain):
        layers = {name: layer for name, layer in layers.items() if not layer.shared}
    if not layers:
        return {}, 0
    itemsize = next(iter(chosen.values())).element_size()
    factors_bytes = n * sum(layer.factor_numbers(num_outputs) for layer in layers.values()) * itemsize
    if budget is not None and factors_bytes > budget:
        return None, factors_bytes
    try:
        factors = _factors(function, layers, sample, num_outputs)
    except (RuntimeError, ValueError):
        # a layer whose input is not what its kind's operation takes (a shape it cannot
        # unfold or normalise): nothing is structured, the kernel is contracted as Jacobians
        return {}, factors_bytes
    leaves = {name: t.detach().requires_grad_(True) for name, t in chosen.items()}
    with torch.enable_grad():
        out = _flat_outputs(function, leaves, sample)
        u = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=torch.Generator(out.device).manual_seed(0))
        names = [p for layer in layers.values() for p in layer.names]
        grads = dict(zip(names, torch.autograd.grad((out * u).sum(), [leaves[p] for p in names], allow_unused=True),
                         strict=True))
    exact = {}
    for name, layer in layers.items():
        found = factors[name]
        if layer.kind == "norm":
            ours = [torch.einsum("ia,iap->p", u, found[p]) for p in layer.names]
        elif layer.kind == "embedding":
            tokens, g = found
            ug = torch.einsum("ia,aitl->itl", u, g) * _kept(function.model.get_submodule(name), tokens).unsqueeze(-1)
            ours = [torch.zeros_like(chosen[layer.names[0]]).index_add_(0, tokens.reshape(-1), ug.reshape(-1, layer.outputs))]
        elif layer.kind == "tied":
            # the sum of both modules' gradients: the embedding's rows (g_emb zero at the padding
            # token) and the linear layer's Σ_s (u·g_lin_s) ⊗ h_s
            tokens, g_emb, h, g_lin = found
            ug = torch.einsum("ia,aitl->itl", u, g_emb)
            rows = torch.einsum("isv,isd->vd", torch.einsum("ia,aisv->isv", u, g_lin), h)
            ours = [rows.index_add_(0, tokens.reshape(-1), ug.reshape(-1, layer.outputs))]
            # the route's estimate takes the linear layer's positions with a gradient
            layer = replace(layer, active=max(1, h.shape[1]))
        else:
            a, g = found
            ug = torch.einsum("ia,aitl->itl", u, g)
            ours = [torch.einsum("itl,itk->lk", ug, a)]
            if len(layer.names) > 1:
                ours.append(ug.sum((0, 1)))
        pairs = [(grads[p], mine.reshape(chosen[p].shape)) for p, mine in zip(layer.names, ours, strict=True)]
        if all(auto is not None and (auto - mine).norm() <= 1e-4 * auto.norm() + 1e-30 for auto, mine in pairs):
            exact[name] = layer
    return exact, factors_bytes


def _broadcasts(function: ModelFunction, layers: dict[str, _Layer], sample: Any, plain: Tensor) -> bool:
    """Whether the model's outputs on ``sample`` (``plain``, from the pass that counted the
    layers' calls) are the same, in shape and value, with its shared layers' outputs expanded to
    the examples (:func:`_shared_output`), as the factor passes hand them on: the model
    broadcasts them to the examples (``tokens + positions``); one that reshapes them first
    (``positions.unsqueeze(0)``) would compute something else."""
    n = batch_size(sample)

    def expand(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return _shared_output(output, n)

    modules = [function.model.get_submodule(name) for name, layer in layers.items() if layer.shared]
    with torch.no_grad():
        handles = [module.register_forward_hook(expand) for module in modules]
        try:
            expanded = _flat_outputs(function, function.params, sample)
        except (RuntimeError, ValueError):
            return False
        finally:
            for handle in handles:
                handle.remove()
    return expanded.shape == plain.shape and torch.allclose(expanded, plain, rtol=1e-5, atol=1e-7)


def _tied_candidates(function: ModelFunction, counts: dict[int, int]) -> dict[str, tuple[str, str, str]]:
    """The weights shared by exactly one ``nn.Embedding`` and one ``nn.Linear`` as both their
    ``weight`` (GPT-2's token embedding tied to its output layer), both of a structured kind,
    among the parameters differentiated: ``{layer of the weight's name: (embedding's name,
    linear layer's name, the weight's name)}``. ``counts`` the registrations of each parameter
    (``named_parameters(remove_duplicate=False)``); any other sharing has none."""
    chosen = function.params
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for name, module in function.model.named_modules():
        for key, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((name, key, module))
    names = {id(p): name for name, p in function.model.named_parameters()}
    found: dict[str, tuple[str, str, str]] = {}
    for ident, users in owners.items():
        if len(users) != 2 or counts.get(ident) != 2 or ident not in names or names[ident] not in chosen:
            continue
        kinds = {_kind(module) if name else None: (name, key, module) for name, key, module in users}
        if set(kinds) != {"embedding", "linear"} or any(key != "weight" for _, key, _ in users):
            continue
        embedding, linear = kinds["embedding"][0], kinds["linear"][0]
        if not isinstance(kinds["embedding"][2].weight, nn.Parameter):
            continue
        found[layer_of(names[ident])] = (embedding, linear, names[ident])
    return found


def _kept(module: nn.Module, tokens: Tensor) -> Tensor:
    """Whether each token's row receives a gradient: all but ``padding_idx``."""
    padding = module.padding_idx
    return torch.ones_like(tokens, dtype=torch.bool) if padding is None else tokens != padding


def _matches(module: nn.Module, tokens1: Tensor, tokens2: Tensor, mode: KernelMode, dtype: torch.dtype) -> Tensor:
    """An embedding's inputs' products, its one-hot rows' a_t·a'_s: whether the tokens match (and
    are not its padding token), (n₁, n₂, T, S); (n, T, T) for "diagonal"."""
    kept1, kept2 = _kept(module, tokens1), _kept(module, tokens2)
    if mode == "diagonal":
        return ((tokens1[:, :, None] == tokens1[:, None, :]) & kept1[:, :, None]).to(dtype)
    same = tokens1[:, None, :, None] == tokens2[None, :, None, :]
    return (same & kept1[:, None, :, None] & kept2[None, :, None, :]).to(dtype)


def _full_by_positions(inputs: Tensor, g1: Tensor, g2: Tensor, room: int = 0) -> Tensor:
    """The "full" kernel (n₁, n₂, O, O) of a layer applied at T > 1 positions from its inputs'
    products (n₁, n₂, T, T) and output gradients g (O, n, T, out): for m examples j of the second
    set at once, H = Σ_s (a_t·a'_s) g'_(b,s) (m·n₁·T²·O·out multiply-adds, m·n₁·T·out·O numbers,
    held twice while laid out for the next product), then Σ_(t,l) g_(a,t,l) H_(t,l,(j,b)), one
    batched product over the examples i of the first set with m·O columns. ``room``: numbers
    the m examples' two copies of H and their inputs' products (laid out, n₁·T·S each) may take
    beyond one example's (m = 1 + room // (n₁·T·(S + 2·out·O))).

    One example j at a time (m = 1) is an (O × T·out)(T·out × O) product for each i, a shape
    cuBLAS runs at a few hundred GFLOP/s: on an H200 it was 63% of a ResNet-18's full kernel of
    64 images (177 of 279 ms, 576 products)."""
    o, n1, t, out = g1.shape
    n2, s = g2.shape[1], g2.shape[2]
    left = g1.permute(1, 0, 2, 3).reshape(n1, o, t * out)
    right = g2.permute(1, 2, 3, 0).reshape(n2, s, out * o)  # (j, s, (l, b))
    # each further example j: its inputs' products laid out (n₁·T·S) and H twice (2·n₁·T·out·O)
    step = max(1, min(n2, 1 + room // max(1, n1 * t * (s + 2 * out * o))))
    columns = []
    for j in range(0, n2, step):
        m = min(step, n2 - j)
        a = inputs[:, j:j + m].permute(1, 0, 2, 3).reshape(m, n1 * t, s)
        h = torch.bmm(a, right[j:j + m])  # (m, n₁·T, out·O)
        h = h.view(m, n1, t * out, o).permute(1, 2, 0, 3).reshape(n1, t * out, m * o)
        columns.append(torch.bmm(left, h).view(n1, o, m, o).transpose(1, 2))
    return torch.cat(columns, 1)


def _positions_block(inputs: Tensor, g1: Tensor, g2: Tensor, mode: KernelMode, room: int = 0) -> Tensor:
    """Σ_(t,s) (a_t·a'_s)(g_(a,t)·g'_(b,s)) in the layout of ``mode`` from the inputs' products
    (n₁, n₂, T, S) ((n, T, T) for "diagonal") and output gradients g (O, n, T, out). The "full"
    kernel of a layer at several positions sums Σ_s (a_t·a'_s) g'_(b,s) first
    (:func:`_full_by_positions`: T²·O·out + T·O²·out products a pair, not T²·O²·out, in
    ``room`` numbers beyond one example's)."""
    if mode == "full" and (g1.shape[2] > 1 or g2.shape[2] > 1):
        return _full_by_positions(inputs, g1, g2, room)
    return torch.einsum(_PRODUCT[mode], inputs, torch.einsum(_GRADIENTS[mode], g1, g2))


def _tied_cross(tokens: Tensor, g_emb: Tensor, h: Tensor, g_lin: Tensor, mode: KernelMode) -> Tensor:
    """⟨J_emb(x_i)_a, J_lin(x'_j)_b⟩ = Σ_(t,s) g_lin'_(b,s)[token_t] (g_emb_(a,t)·h'_s) of a tied
    weight, the embedding's factors (tokens (n₁, T), g_emb (O, n₁, T, d), zero at the padding
    token) from one set and the linear layer's (h (n₂, S, d), g_lin (O, n₂, S, V)) from the
    other: (n₁, n₂, O, O) for "full", (n₁, n₂) for "trace" (a = b); for "diagonal" (the same
    examples) (n, O). No V×d Jacobian is formed: the linear layer's output gradients are
    gathered at the embedding's tokens (O·n₂·S·n₁·T numbers), then contracted with h over the
    positions s first when d ≤ S (an intermediate of n₁·T·n₂·O·d numbers), else the embedding's
    gradients with h over d first (n₁·n₂·O·T·S)."""
    o, n1, t, d = g_emb.shape
    n2, s = h.shape[:2]
    if mode == "diagonal":
        # (O, n, S, T): g_lin_(o,i,s)[token_(i,t)]
        gathered = torch.gather(g_lin, 3, tokens[None, :, None, :].expand(o, n1, s, t))
        return torch.einsum("oits,oist->io", torch.einsum("oitd,isd->oits", g_emb, h), gathered)
    gathered = g_lin[..., tokens.reshape(-1)].view(o, n2, s, n1, t)  # (b, j, s, i, t)
    if mode == "full":
        if d <= s:
            return torch.einsum("aitd,itjbd->ijab", g_emb, torch.einsum("bjsit,jsd->itjbd", gathered, h))
        return torch.einsum("ijats,bjsit->ijab", torch.einsum("aitd,jsd->ijats", g_emb, h), gathered)
    if d <= s:
        return torch.einsum("oitd,oitjd->ij", g_emb, torch.einsum("ojsit,jsd->oitjd", gathered, h))
    return torch.einsum("oitjs,ojsit->ij", torch.einsum("oitd,jsd->oitjs", g_emb, h), gathered)


def _tied_block(embedding: nn.Module, f1: tuple[Tensor, Tensor, Tensor, Tensor],
                f2: tuple[Tensor, Tensor, Tensor, Tensor], mode: KernelMode, room: int = 0) -> Tensor:
    """A tied weight's kernel on a block of two chunks, J = J_emb + J_lin: the embedding's
    products (tokens matching), the linear layer's over pairs of positions, and the two cross
    terms ⟨J_emb, J'_lin⟩ + ⟨J_lin, J'_emb⟩ (:func:`_tied_cross`; for "diagonal" twice the
    first). ``f1``, ``f2``: the chunks' factors ``(tokens, g_emb, h, g_lin)`` (:func:`_factors`);
    ``room`` as in :func:`_full_by_positions`."""
    (tokens1, e1, h1, l1), (tokens2, e2, h2, l2) = f1, f2
    block = _positions_block(_matches(embedding, tokens1, tokens2, mode, e1.dtype), e1, e2, mode, room)
    block = block + _positions_block(torch.einsum(_INPUTS[mode], h1, h2), l1, l2, mode, room)
    if mode == "diagonal":
        return block + 2 * _tied_cross(tokens1, e1, h1, l1, mode)
    other = _tied_cross(tokens2, e2, h1, l1, mode)  # ⟨J_emb(x'_j), J_lin(x_i)⟩: (n₂, n₁, ...)
    other = other.permute(1, 0, 3, 2) if mode == "full" else other.T
    return block + _tied_cross(tokens1, e1, h2, l2, mode) + other


def _by_structure(function: ModelFunction, inputs1: Any, inputs2: Any, same: bool, mode: KernelMode,
                  layers: dict[str, _Layer], routes: dict[str, str], chunk: int,
                  num_outputs: int, keep: bool = False, room: int = 0, group: int = 1,
                  check: Callable[[], None] | None = None, per_layer: bool = True,
                  into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Each structured layer's kernel from its inputs and output gradients (Novak et al. 2022's
    structured derivatives; nngeometry's Gram matrix), by its route (:func:`_route`):
    "positions", ⟨J_W(x)_a, J_W(x')_b⟩ = Σ_(t,s) (a_t·a'_s)(g_(a,t)·g'_(b,s)), and
    Σ_(t,s) g_(a,t)·g'_(b,s) for the bias, no per-example Jacobian formed (a block of two chunks
    holds n₁·n₂·O²·T² products for "full", n₁·n₂·T² for "trace"); "jacobians", the per-example
    Jacobians Σ_t g_t ⊗ a_t (a normalisation's from its normalised input), contracted. A tied
    weight on the positions route: :func:`_tied_block`. With ``keep``, each chunk's factors of
    the second set (of the only set when ``same``) are computed once and kept for every block
    (:func:`_keeps_factors`), else again for the blocks that need them (:func:`_kernel_blocks`).
    ``group``: the outputs a factor pass takes (:func:`_pass_group`); ``check``: see
    :func:`_kernel_blocks`. Without ``per_layer``, one kernel keyed "", each block's layers
    summed as they come: the blocks of every layer held until the end were L kernels beside
    the one returned (a full kernel of 24 examples and 12 outputs through 7 layers held 3.9 MB
    at once, in 0.6 MB allowed; summed, 0.9 MB). ``into``: kernels to add this one's layers to
    (:func:`_kernel_blocks`)."""
    n1, n2 = batch_size(inputs1), batch_size(inputs2)
    kept: dict[tuple[int, int], dict[str, Any]] = {}

    def second_factors(s2: int, e2: int) -> dict[str, Any]:
        if (s2, e2) in kept:
            return kept[(s2, e2)]
        found = _factors(function, layers, slice_examples(inputs2, s2, e2), num_outputs, routes, group)
        if keep:
            kept[(s2, e2)] = found
        return found

    def first_factors(s1: int, e1: int) -> dict[str, Any]:
        if same and keep:
            return second_factors(s1, e1)
        return _factors(function, layers, slice_examples(inputs1, s1, e1), num_outputs, routes, group)

    def block(f1: dict[str, Any], f2: dict[str, Any]) -> dict[str, Tensor]:
        blocks: dict[str, Tensor] = {}

        def add(name: str, products: Tensor) -> None:
            if per_layer:
                blocks[name] = products
            elif "" in blocks:
                blocks[""] += products
            else:
                blocks[""] = products

        for name, layer in layers.items():
            if isinstance(f1[name], dict):
                add(name, _contract(f1[name], f2[name], layer.names, mode))
                continue
            if layer.kind == "tied":
                embedding = function.model.get_submodule(layer.modules[0])
                add(name, _tied_block(embedding, f1[name], f2[name], mode, room))
                continue
            (a1, g1), (a2, g2) = f1[name], f2[name]
            # in the diagonal mode f2 is f1: the einsums pair each example with itself
            if layer.kind == "embedding":
                inputs = _matches(function.model.get_submodule(name), a1, a2, mode, g1.dtype)
            else:
                inputs = torch.einsum(_INPUTS[mode], a1, a2)
            products = _positions_block(inputs, g1, g2, mode, room)
            # freed now: the next layer's products would be computed while these are held
            del inputs
            if len(layer.names) > 1:
                products = products + torch.einsum(_BIAS[mode], g1.sum(2), g2.sum(2))
            add(name, products)
            del products
        return blocks

    return _kernel_blocks(n1, n2, chunk, same, mode, first_factors, second_factors, block, check, into)


# ----------------------------------------------------------------------------- the measurement


def _check_mode(mode: str) -> None:
    if mode in ("eval", "train"):
        raise ValueError(
            f"mode={mode!r} names a model mode, but empirical_ntk's mode is the kernel's layout "
            "('trace', 'full' or 'diagonal'). The NTK is defined in eval mode only: BatchNorm in "
            "train mode normalises each example by the batch's statistics, which couples the "
            "examples, so Θ(x, x') would not be a function of the pair; empirical_ntk always "
            "computes in eval mode"
        )
    if mode not in ("trace", "full", "diagonal"):
        raise ValueError(f"mode must be 'trace', 'full' or 'diagonal', got {mode!r}")


def ntk_of(
    model: nn.Module,
    inputs: Any,
    inputs2: Any = None,
    mode: KernelMode = "trace",
    params: Sequence[str] | None = None,
    per_layer: bool = False,
    implementation: Implementation = "auto",
    chunk_size: int | None = None,
    memory: int | None = None,
    group: Any = None,
    vector_products: bool = True,
    check: Callable[[], None] | None = None,
) -> NTK:
    """The empirical NTK Θ(x, x') = J(x) J(x')ᵀ of ``model`` on ``inputs`` × ``inputs2``.

    J(x) is the Jacobian of one example's outputs, flattened to O entries (every output tensor's
    entries in order), with respect to the trainable parameters (or those named in ``params``);
    tied parameters count once. Computed in eval mode (see the module docstring), leaving the
    model as it was.

    Args:
        model: any ``nn.Module``; ``model(inputs)`` gives outputs whose first dimension indexes
            the examples (inputs as a Tensor, a tuple for ``model(*x)`` or a dict for ``model(**x)``).
        inputs: the first set, n₁ examples.
        inputs2: the second set, n₂ examples (default: ``inputs``). Not allowed with
            ``mode="diagonal"``, which is Θ(x_i, x_i).
        mode: "trace" (n₁, n₂) Σ_o Θ_oo; "full" (n₁, n₂, O, O); "diagonal" (n₁, O) Θ(x_i, x_i)_oo.
        params: parameter names to differentiate (default: all trainable ones).
        per_layer: also return each layer's kernel (the parameters of one module), which sum to
            the whole.
        implementation: "jacobian" (Jacobian contraction), "ntk_vector" (NTK-vector products),
            "structured" (linear, convolutional and embedding layers from their inputs and output
            gradients, BatchNorm/LayerNorm/GroupNorm from their normalised inputs, the other
            parameters by Jacobian contraction) or "auto": "structured" when the structured
            layers hold every parameter, or all but at most a tenth whose Jacobians for chunks
            of two examples (2·2·O·P_rest numbers) fit ``memory``; else "jacobian" when chunks
            of two examples' Jacobians (2·2·O·P numbers) fit ``memory``, else "ntk_vector"
            (module docstring).
        chunk_size: examples per chunk (default: as many as ``memory`` allows). Jacobian
            contraction holds two chunks' Jacobians (chunk·O·P numbers each); NTK-vector products
            a chunk of P-vectors and the activations of a chunk; structured products each
            layer's inputs and O output gradients (or its Jacobians) for two chunks, and the
            products of a block of two chunks (``_structured_chunk``). Where every layer's
            factors for the whole kernel do not fit ``memory`` at once, on a GPU the structured
            layers may be taken in groups that each keep theirs (``_layer_groups``), when their
            passes cost the host less than computing chunks' factors again (``_passes_cost``).
        memory: bytes a chunk's Jacobians, factors or product vectors may take (default 1 GiB,
            or a quarter of the device's free memory, the host's on the CPU, when that is more).
            The activations of the forward passes and the kernel itself (once: each block is
            added into it as it comes) come on top, except for NTK-vector products, which count
            a chunk's activations.
        group: a ``torch.distributed`` process group (None: not distributed). Each rank passes
            its shard of ``inputs`` (and of ``inputs2``), and every rank gets the kernel of the
            whole sets, the shards concatenated in rank order: the inputs are all-gathered,
            each rank computes the rows of its own examples against every example, and the rows
            are all-gathered (the work is split; the kernel, n₁·n₂ numbers, is held by every
            rank). ``mode="diagonal"``: each rank's rows, gathered. The parameters must be the
            same on every rank (data parallelism).
        vector_products: whether "auto" may fall back to NTK-vector products when the Jacobians
            do not fit ``memory`` at once. They fit almost any memory but are slow on a large
            model (one forward pass with tangents per example and output, per layer with
            ``per_layer``: a ResNet-18 on 8 CPU examples took 175 s). False: Jacobian
            contraction in chunks instead, raising MemoryBudgetTooSmall when one example's
            Jacobians do not fit (the NTK probe's choice: it waits rather than stall training).
        check: called between units of work (a chunk's Jacobians or factors, a block of two
            chunks, a chunk's products); it may raise to stop the measurement (the Lens's
            deadline on a first measurement, :meth:`dynlens.probes.Context.check_time`). With
            ``group`` it is called in each rank's own rows, whose units differ between ranks, so
            it must make no collective (:meth:`dynlens.probes.Context.check_time_locally`); a
            rank it stops makes every rank raise where they meet, at the rows' gather
            (:class:`dynlens.distributed.PeerFailed`, ``OVER_TIME``, on the others).

    Cost: "jacobian" ≈ N·O backward passes (N = n₁, + n₂ when ``inputs2`` is given; more when the
    sets span several chunks) plus n₁·n₂·O²·P multiply-adds; "ntk_vector" ≈ n₁·O backward passes
    and n₁·O forward passes with tangents over n₂ examples (times the number of layers with
    ``per_layer``); "structured" ≈ N·O backward passes plus, per
    linear or convolutional layer with inputs (patches) of k entries, out outputs and T positions,
    the cheaper of its two routes (O' = O² for "full", else O): positions,
    n₁·n₂·T²·(k + O'·out + O') multiply-adds ("full", T > 1: n₁·n₂·(T²·(k + O·out) + T·O²·out));
    Jacobians, N·O·T·out·k to form them and n₁·n₂·O'·out·k to contract them (a layer applied
    once always takes the positions); per normalisation layer N·O·(its output entries) to form
    its Jacobians and n₁·n₂·O'·(its parameters) to contract them; Jacobian contraction of the
    parameters no structured layer holds.

    Returns:
        :class:`NTK`.

    Raises:
        MemoryBudgetTooSmall: ``memory`` was given and not even one example's share fits.
        ValueError: an unknown mode or implementation, or ``mode="train"``/``"eval"`` (the kernel
            is defined in eval mode), or a second set of inputs with ``mode="diagonal"``.
    """
    _check_mode(mode)
    if implementation not in ("auto", "jacobian", "ntk_vector", "structured"):
        raise ValueError(
            f"implementation must be 'auto', 'jacobian', 'ntk_vector' or 'structured', got {implementation!r}"
        )
    if mode == "diagonal" and inputs2 is not None:
        raise ValueError("mode='diagonal' is Θ(x_i, x_i) on one set of inputs; pass inputs2=None")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of examples, got {chunk_size}")
    if group is not None:
        with lockstep(group):
            return _ntk_across_ranks(model, inputs, inputs2, mode, params, per_layer, implementation,
                                     chunk_size, memory, group, vector_products, check)
    start_time = time.perf_counter()
    # the loss is never differentiated; activation_bytes evaluates one, so it must be a scalar
    function = ModelFunction(model, _sum_of_outputs, (inputs, None), params=params)
    budget = _default_memory(function.device) if memory is None else memory
    with isolated(function.model, "eval"):
        first = function.inputs
        same = inputs2 is None
        second = first if same else _widened_tree(to_device(inputs2, function.device))
        # one example's outputs (their count O) and its activations' bytes (the memory plans of
        # the structured products and NTK-vector products), the bytes kept per model and shapes
        o, itemsize, activation = _one_example(function)
        p_count = function.num_params
        n1, n2 = batch_size(first), batch_size(second)
        automatic = implementation == "auto"
        structured = (_structured_layers(function, first, o, budget if automatic else None, covering=automatic)
                      if implementation in ("auto", "structured") else {})
        covered = {n for layer in structured.values() for n in layer.names}
        rest = [n for n in function.params if n not in covered]
        examples = n1 if same else n1 + n2
        if implementation == "auto":
            rest_count = _numel(function, rest)
            # the rest by Jacobian contraction in chunks of at least two (or all the examples)
            if structured and (not rest or (rest_count <= _REST_FRACTION * p_count and
                                            2 * min(2, examples) * o * rest_count * itemsize <= budget)):
                implementation = "structured"
            else:
                fits = 2 * min(2, examples) * o * p_count * itemsize <= budget
                implementation = "jacobian" if fits or not vector_products else "ntk_vector"
        layers = _layers(list(function.params))
        if implementation == "structured":
            groups = {layer: [n for n in names if n in rest] for layer, names in layers.items()}
            groups = {layer: names for layer, names in groups.items() if names}
            if not per_layer and groups:
                groups = {"": rest}
            # a structured layer's kernel is keyed by its module's name, which is its layer (and
            # without per_layer every part's by ""); the parts (the other parameters', each set
            # of layers') are added into one kernel block by block
            summed: dict[str, Tensor] = {}
            if groups:
                chunk = chunk_size or _tiled(_fitting(budget, 2 * o * _numel(function, rest) * itemsize, memory,
                                                      "the Jacobians of one example's other parameters"),
                                             max(n1, n2), function.device)
                _by_jacobians(function, first, second, same, mode, groups, chunk, check, summed)
            if structured:
                pairs = n1 if mode == "diagonal" else n1 * n2
                routes = {name: _route(layer, o, mode, examples, pairs) for name, layer in structured.items()}
                keep = _keeps_factors(structured, routes, o, mode, budget, itemsize, n2)

                def planned(candidate: dict[str, str], kept: bool) -> int:
                    return chunk_size or _tiled(_structured_chunk(structured, candidate, o, mode, budget, itemsize,
                                                                  None, n2 if kept else 0, activation),
                                                max(n1, n2), function.device)

                own = planned(routes, False) if not keep and mode == "trace" else 0
                if own and _computes_twice(n1, n2, same, own):
                    # the full kernel's routes send fewer layers to the Jacobian route (whose
                    # contraction costs O² multiply-adds a pair there, O here) and keep less an
                    # example: larger chunks, factors computed less often. Taken when they keep
                    # their factors (a ResNet-18's trace kernel of 64 images on a CPU took 59 s by
                    # its own routes, its full kernel 20 s, the Jacobians kept by the trace's
                    # routes past half of 6 GB; of 256 on an H200 0.46 s in chunks of 128), or,
                    # neither keeping, when cheaper counting the factors computed again
                    # (_plan_cost): of 32 images in 0.5 GiB (the NTK probe under the Lens) the
                    # trace's routes took chunks of one, the full kernel's of three
                    wider = {name: _route(layer, o, "full", examples, pairs) for name, layer in structured.items()}
                    wider_keep = _keeps_factors(structured, wider, o, mode, budget, itemsize, n2)
                    if wider_keep or (
                            _plan_cost(structured, wider, o, mode, pairs,
                                       _factored_examples(n1, n2, same, planned(wider, False), False))
                            < _plan_cost(structured, routes, o, mode, pairs, _factored_examples(n1, n2, same, own, False))):
                        routes, keep = wider, wider_keep
                def plan(group: dict[str, _Layer], kept: bool) -> tuple[int, int, int]:
                    """(chunk, room, outputs a pass) of ``group``'s products, keeping its factors or not."""
                    # on a GPU the full kernel of a layer at several positions takes several
                    # examples of the second set at once in a quarter of the allowance
                    # (_full_by_positions); larger chunks would leave it none where the examples
                    # do not fit one chunk
                    columns = (mode == "full" and function.device.type in _COLUMNS_AT_ONCE_ON and any(
                        routes[name] == "positions" and (layer.positions > 1 or layer.kind == "tied")
                        for name, layer in group.items()))
                    # refuses a memory that one example does not fit, also with chunk_size given
                    chunk = _structured_chunk(group, routes, o, mode, budget - budget // 4 if columns else budget,
                                              itemsize, memory, n2 if kept else 0, activation)
                    chunk = chunk_size or _tiled(chunk, max(n1, n2), function.device)
                    free = _structured_room(group, routes, o, mode, budget, itemsize, min(chunk, max(n1, n2)),
                                            n2 if kept else 0, activation)
                    # a further output of a batched pass: its activations' gradients, and a tied
                    # output layer's at every position before they are trimmed
                    per_output = activation + itemsize * sum(layer.pass_numbers() for layer in group.values())
                    passes = _pass_group(free, itemsize, min(chunk, max(n1, n2)), per_output, o, function.device,
                                         any(layer.kind == "conv" for layer in group.values()))
                    return chunk, free if columns else 0, passes

                chunk, room, passes = plan(structured, keep)
                sets = [(structured, (chunk, room, passes))]
                if (not keep and chunk_size is None and mode != "diagonal" and
                        function.device.type in _LAYER_GROUPS_ON and _computes_twice(n1, n2, same, chunk)):
                    # the factors of every layer do not fit at once: groups of layers that each
                    # keep theirs, where that computes fewer factor passes (_layer_groups)
                    split = _layer_groups(structured, routes, o, mode, budget, itemsize, n2, activation)
                    if split is not None:
                        # each group's largest chunk: on an H200 a ResNet-18's probe call in
                        # 0.5 GiB took 0.32 of one set's time so, 0.36 with the chunks whose passes
                        # _passes_cost counts cheapest (smaller, more outputs a pass)
                        grouped = [(group, plan(group, True)) for group in split]
                        together = _passes_cost(n1, n2, same, chunk, False, o, passes)
                        if sum(_passes_cost(n1, n2, same, c, True, o, g) for _, (c, _, g) in grouped) < together:
                            sets, keep = grouped, True
                for group, (chunk, room, passes) in sets:
                    _by_structure(function, first, second, same, mode, group, routes, chunk, o, keep, room,
                                  passes, check, per_layer, summed)
            kernels = {layer: summed[layer] for layer in (layers if per_layer else [""])}
        else:
            groups = layers if per_layer else {"": list(function.params)}
            if implementation == "jacobian":
                chunk = chunk_size or _tiled(_fitting(budget, 2 * o * p_count * itemsize, memory,
                                                      "the Jacobians of one example"), max(n1, n2), function.device)
                kernels = _by_jacobians(function, first, second, same, mode, groups, chunk, check)
            else:
                # a product holds a P-vector and a chunk's activations; the cotangent basis of a
                # chunk is (chunk·O)² numbers
                activation = max(1, activation)
                vector = p_count * itemsize
                chunk = chunk_size or max(1, min(math.isqrt(budget // itemsize) // o,
                                                 (budget - vector) // (2 * activation)))
                columns = _fitting(budget, vector + min(chunk, n2) * activation, memory,
                                   "one NTK-vector product (a P-vector and a chunk's activations)")
                kernels = _by_products(function, first, second, mode, groups, chunk, columns, o, check)
    kernels = {layer: k.detach() for layer, k in kernels.items()}
    total = torch.stack(list(kernels.values())).sum(0) if per_layer else kernels[""]
    return NTK(
        kernel=total,
        per_layer=kernels if per_layer else None,
        mode=mode,
        implementation=implementation,
        num_outputs=o,
        num_params=p_count,
        elapsed=time.perf_counter() - start_time,
    )


# ----------------------------------------------------------------------------- kernel statistics


def _ntk_across_ranks(model: nn.Module, inputs: Any, inputs2: Any, mode: KernelMode,
                      params: Sequence[str] | None, per_layer: bool, implementation: Implementation,
                      chunk_size: int | None, memory: int | None, group: Any,
                      vector_products: bool = True, check: Callable[[], None] | None = None) -> NTK:
    """:func:`ntk_of` of the sets split across ranks: this rank's rows against every example,
    gathered (see its ``group``); ``check`` is called in this rank's own part only (no
    collective runs there), and a rank it stops makes every rank stop at the gather."""
    start_time = time.perf_counter()
    refuse_sharded(unwrap_model(model), "the empirical NTK (per-example Jacobians)")
    device = model_device(unwrap_model(model))
    inputs = to_device(inputs, device)
    everyone = gather_examples(inputs, group)
    empty = batch_size(inputs) == 0  # a rank with no example of the set: a row computed and dropped
    mine = slice_examples(everyone, 0, 1) if empty else inputs
    if mode == "diagonal":
        local = ntk_of(model, mine, None, mode, params, per_layer, implementation, chunk_size, memory,
                       vector_products=vector_products, check=check)
    else:
        others = everyone if inputs2 is None else gather_examples(to_device(inputs2, device), group)
        local = ntk_of(model, mine, others, mode, params, per_layer, implementation, chunk_size, memory,
                       vector_products=vector_products, check=check)
    kernels = {"": local.kernel} if local.per_layer is None else {"": local.kernel, **local.per_layer}
    if empty:
        kernels = {n: k[:0] for n, k in kernels.items()}
    # one gather of every kernel's rows, stacked along the last dimension
    names = list(kernels)
    shape = local.kernel.shape[1:]
    stacked = torch.stack([kernels[n] for n in names], dim=-1)
    gathered = gather_rows(stacked, group)
    whole = {n: gathered[..., i] for i, n in enumerate(names)}
    assert tuple(gathered.shape[1:-1]) == tuple(shape)
    return NTK(
        kernel=whole[""],
        per_layer=None if local.per_layer is None else {n: whole[n] for n in local.per_layer},
        mode=local.mode, implementation=local.implementation, num_outputs=local.num_outputs,
        num_params=local.num_params, elapsed=time.perf_counter() - start_time,
    )


def empirical_ntk(model: nn.Module, inputs: Any, inputs2: Any = None, mode: KernelMode = "trace",
                  params: Sequence[str] | None = None, per_layer: bool = False,
                  implementation: Implementation = "auto", chunk_size: int | None = None,
                  memory: int | None = None, group: Any = None) -> Tensor | dict[str, Tensor]:
    """The empirical NTK as a Tensor (``dl.empirical_ntk``): (n₁, n₂) for ``mode="trace"``,
    (n₁, n₂, O, O) for "full", (n₁, O) for "diagonal"; with ``per_layer=True`` a dict of each
    layer's kernel, which sum to the whole. Arguments as :func:`ntk_of`, which also returns the
    implementation chosen and the sizes (:class:`NTK`). ``group``: a ``torch.distributed``
    process group; each rank passes its shard of the inputs and gets the whole sets' kernel,
    shards in rank order (:func:`ntk_of`)."""
    result = ntk_of(model, inputs, inputs2, mode, params, per_layer, implementation, chunk_size, memory,
                    group)
    if per_layer:
        assert result.per_layer is not None
        return result.per_layer
    return result.kernel


def _square(kernel: Tensor) -> Tensor:
    """A kernel as a square matrix: (n, n) as is; a full kernel (n, n, O, O) as (n·O, n·O) with
    rows and columns ordered (example, output)."""
    if kernel.dim() == 4:
        n, m, o, q = kernel.shape
        return kernel.permute(0, 2, 1, 3).reshape(n * o, m * q)
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"expected a square kernel (n, n) or a full kernel (n, n, O, O), got shape {tuple(kernel.shape)}"
        )
    return kernel


def kernel_eigenvalues(kernel: Tensor) -> Tensor:
    """Eigenvalues of a kernel on one set of inputs, descending, as float64.

    ``kernel`` is (n, n) (a "trace" kernel) or (n, n, O, O) (a "full" one, taken as the
    (n·O, n·O) matrix). It is symmetrised, (K + Kᵀ)/2, before ``eigvalsh``: an NTK is symmetric
    positive semi-definite, up to rounding. Cost: one dense eigendecomposition, O(n³)."""
    k = _square(kernel).detach().to(torch.float64)
    return torch.linalg.eigvalsh((k + k.T) / 2).flip(0)


def condition_number(kernel: Tensor) -> float:
    """λ_max/λ_min of the kernel (:func:`kernel_eigenvalues`); ``inf`` when λ_min ≤ 0 (a singular
    kernel, e.g. more examples than parameters, or rounding below zero)."""
    values = kernel_eigenvalues(kernel)
    smallest = float(values[-1])
    return math.inf if smallest <= 0 else float(values[0]) / smallest


def effective_rank(kernel: Tensor, kind: Literal["participation", "entropy"] = "participation") -> float:
    """The number of eigen-directions that carry the kernel, between 1 and n.

    ``"participation"``: the participation ratio (Σλ)²/Σλ² (e.g. Gao et al. 2017, "A theory of
    multineuronal dimensionality"): n for a multiple of the identity, 1 for rank one.
    ``"entropy"``: exp(−Σ pᵢ log pᵢ), pᵢ = λᵢ/Σλ (Roy & Vetterli 2007, "The effective rank").
    Eigenvalues below zero (rounding) are taken as zero."""
    values = kernel_eigenvalues(kernel).clamp_min(0)
    total = float(values.sum())
    if total == 0:
        return 0.0
    if kind == "participation":
        return total**2 / float((values**2).sum())
    if kind == "entropy":
        p = values[values > 0] / total
        return math.exp(float(-(p * p.log()).sum()))
    raise ValueError(f"kind must be 'participation' or 'entropy', got {kind!r}")


def kernel_distance(kernel1: Tensor, kernel2: Tensor) -> float:
    """d(K₁, K₂) = 1 − ⟨K₁, K₂⟩_F / (‖K₁‖_F ‖K₂‖_F) (Fort et al. 2020, "Deep learning versus kernel
    learning"): 0 for kernels equal up to a positive factor, 1 for orthogonal ones. Any two
    kernels of the same shape (every entry counts once). Per step it is the kernel velocity.
    NaN when either kernel is zero (the angle is undefined). Kept within [0, 2]: a kernel
    against itself gave −1.6e-15 by rounding (a negative distance on a log axis)."""
    if kernel1.shape != kernel2.shape:
        raise ValueError(f"kernels of different shapes: {tuple(kernel1.shape)} and {tuple(kernel2.shape)}")
    a = kernel1.detach().to(torch.float64).reshape(-1)
    b = kernel2.detach().to(torch.float64).reshape(-1)
    scale = float(a.norm() * b.norm())
    return min(2.0, max(0.0, 1.0 - float(a @ b) / scale)) if scale > 0 else math.nan


def _target_matrix(targets: Tensor, num_classes: int | None) -> Tensor:
    if not targets.is_floating_point():
        return torch.nn.functional.one_hot(targets.long().reshape(-1), num_classes or -1).to(torch.float64)
    y = targets.detach().to(torch.float64)
    return y.reshape(y.shape[0], -1)


def kernel_target_alignment(kernel: Tensor, targets: Tensor, num_classes: int | None = None,
                            centred: bool = True) -> float:
    """Centred kernel–target alignment A = ⟨K_c, (YYᵀ)_c⟩_F / (‖K_c‖_F ‖(YYᵀ)_c‖_F), with
    K_c = HKH, H = I − 11ᵀ/n (Cortes, Mohri & Rostamizadeh 2012, "Algorithms for learning kernels
    based on centered alignment"; Baratin et al. 2021 report it per layer).

    ``kernel`` is a "trace" kernel (n, n). ``targets``: integer class labels (n,), taken as one-hot
    rows of Y (``num_classes`` columns, default the largest label + 1), or real values (n,) or
    (n, k), taken as Y itself. ``centred=False`` gives the uncentred alignment (Cristianini et al.
    2002). Between −1 and 1 (0 to 1 for PSD kernels); 1 when K is a positive multiple of (YYᵀ)_c.
    NaN when the centred kernel or target is zero (e.g. a layer whose parameters start at zero
    and so contribute nothing to the kernel yet, or targets all of one class)."""
    k = kernel.detach().to(torch.float64)
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"expected a trace kernel (n, n), got shape {tuple(k.shape)}")
    y = _target_matrix(targets, num_classes).to(k.device)
    if y.shape[0] != k.shape[0]:
        raise ValueError(f"{y.shape[0]} targets for a kernel on {k.shape[0]} examples")
    target = y @ y.T
    if centred:
        n = k.shape[0]
        h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
        k, target = h @ k @ h, h @ target @ h
    scale = float(k.norm() * target.norm())
    return float((k * target).sum()) / scale if scale > 0 else math.nan
