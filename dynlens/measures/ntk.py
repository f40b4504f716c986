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
  positions route; and the affine parameters of BatchNorm (eval mode, running statistics),
  LayerNorm and GroupNorm. A weight shared by two layers (GPT-2's embedding tied to its output
  layer) is not structured: it is contracted as Jacobians. With a layer's inputs a and the gradients g_o of output o with respect to its
  outputs (from forward hooks and O backward passes), a linear or
  convolutional layer takes one of two routes, chosen per layer by multiply-adds
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

  A normalisation's per-example Jacobians are formed directly: γ's is Σ over positions of g·x̂,
  β's Σ of g, with x̂ its input normalised by its own statistics. Every structured layer is
  checked exact (parameters not shared, called once a forward pass, gradient from its factors
  equal to autograd's); the other parameters are contracted as Jacobians. Chunks of examples
  keep two chunks' factors (or Jacobians) and a block's products within ``memory``
  (:func:`_structured_chunk`). Cost ≈ N·O backward passes + the routes' multiply-adds.

``implementation="auto"``: ``"structured"`` when the structured layers hold every parameter (an
MLP, a ResNet of convolutions, BatchNorm and a linear head), or leave at most a tenth of them
(``_REST_FRACTION``) whose per-example Jacobians for chunks of two (2·2·O·P_rest numbers) fit
``memory``; the check runs only when the candidate layers meet that, and is kept per model,
parameter set, O and example shape. Otherwise ``"jacobian"`` when chunks of at least two
examples fit ``memory`` (2·c·O·P numbers for chunks of c; default 1 GiB, on a GPU a quarter of
its free memory when that is more, up to 8 GiB): chunk by chunk it computes n₁/c·n₂ example
Jacobians (O backward passes each, batched), against the n₁·O passes with tangents over all n₂
examples of NTK-vector products, so it is the faster of the two from c = 2 up; otherwise
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
from collections.abc import Sequence
from dataclasses import dataclass
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

# memory=None: what the Jacobians or product vectors of one chunk may take (on a GPU at least
# this, or a quarter of the device's free memory)
_DEFAULT_MEMORY = 2**30
# and at most this: a ResNet-18's kernel with 35 GB allowed (a quarter of an H200) stopped on an
# illegal memory access, its per-chunk tensors near 2**31 elements
_MOST_DEFAULT_MEMORY = 8 * 2**30


def _default_memory(device: torch.device) -> int:
    """``memory=None``'s bytes: 1 GiB on the CPU; on a GPU the larger of that and a quarter of
    the memory free on the device, at most 8 GiB (a kernel of a ResNet-18 on 64 images takes 29 GB of
    Jacobians: chunked to 1 GiB on an 80 GB card it recomputed them thousands of times)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(max(_DEFAULT_MEMORY, free // 4), _MOST_DEFAULT_MEMORY)
    return _DEFAULT_MEMORY


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
    leaves = [t for t in tree_flatten(function.outputs(p, inputs))[0] if isinstance(t, Tensor)]
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
                  groups: dict[str, list[str]], chunk: int) -> dict[str, Tensor]:
    """Each layer's kernel by Jacobian contraction, chunk by chunk of examples.

    With two sets larger than one chunk, the second set's Jacobians are recomputed for every chunk
    of the first (n₁/chunk · n₂ Jacobians in all), so memory stays at two chunks' Jacobians."""
    n1, n2 = batch_size(inputs1), batch_size(inputs2)
    names = [n for group in groups.values() for n in group]
    rows: dict[str, list[Tensor]] = {layer: [] for layer in groups}
    for s1, e1 in _chunks(n1, chunk):
        j1 = _jacobians(function, slice_examples(inputs1, s1, e1), names)
        if mode == "diagonal":
            for layer, members in groups.items():
                rows[layer].append(_contract(j1, j1, members, mode))
            continue
        blocks: dict[str, list[Tensor]] = {layer: [] for layer in groups}
        for s2, e2 in _chunks(n2, chunk):
            j2 = j1 if same and (s2, e2) == (s1, e1) else _jacobians(function, slice_examples(inputs2, s2, e2), names)
            for layer, members in groups.items():
                blocks[layer].append(_contract(j1, j2, members, mode))
            del j2
        for layer in groups:
            rows[layer].append(torch.cat(blocks[layer], dim=1))
    return {layer: torch.cat(parts, dim=0) for layer, parts in rows.items()}


# ----------------------------------------------------------------------------- NTK-vector products


def _by_products(function: ModelFunction, inputs1: Any, inputs2: Any, mode: KernelMode,
                 groups: dict[str, list[str]], chunk: int, columns: int, num_outputs: int) -> dict[str, Tensor]:
    """Each layer's kernel by NTK-vector products (``jvp`` of ``vjp``, Novak et al. 2022).

    For a chunk X₁ of the first set, the vector-Jacobian product of its outputs with the basis
    cotangent e_(i,a) is J(x_i)_aᵀ (in eval mode the examples do not interact); the
    Jacobian-vector product of the second set's outputs with it, restricted to one layer's
    parameters, is the row Θ_layer(x_i, ·)_(a, ·). ``columns`` cotangents are pushed at a time
    (``vmap``'s chunk_size)."""
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
    (out; C_out; the embedding's width; the weight's entries); ``size`` the parameters' entries."""

    kind: str
    names: tuple[str, ...]
    positions: int
    inputs: int
    outputs: int
    size: int

    def factor_numbers(self, num_outputs: int) -> int:
        """Numbers of one example's factors: inputs and O output gradients (a normalisation's
        normalised input, output gradients and O·size Jacobian entries)."""
        t, k, out = self.positions, self.inputs, self.outputs
        if self.kind == "norm":
            return t * out * (1 + num_outputs) + num_outputs * self.size
        if self.kind == "embedding":  # the tokens, not their one-hot rows
            return t + num_outputs * t * out
        return t * k + num_outputs * t * out


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
    return F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)


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
             routes: dict[str, str] | None = None) -> dict[str, Any]:
    """Each layer's factors on ``inputs``, from one forward pass with hooks and O backward passes
    (in eval mode the examples do not interact, so the gradient of Σ_i f_o(x_i) with respect to
    the layer's output on x_i is that of f_o(x_i)): a linear or convolutional layer's inputs
    a (n, T, k) and output gradients g (O, n, T, out) as ``(a, g)``, or, on the Jacobian route
    (``routes[name] == "jacobians"``) and for a normalisation, its per-example Jacobians
    ``{parameter: (n, O, size)}``.

    The hooks read a layer's input when it runs (unfolded, or normalised). A layer whose output
    an in-place operation changed afterwards (``ReLU(inplace=True)``) hands the later layers a
    copy on a second forward pass, so that its output's gradient is its own."""
    modules = {name: function.model.get_submodule(name) for name in layers}
    captured: dict[str, tuple[Tensor, Tensor, int]] = {}
    copied: set[str] = set()

    def hook(name: str) -> Any:
        kind = layers[name].kind

        def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0].detach()
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
    n = out.shape[0]
    layer_outputs = [captured[name][1] for name in layers]
    with torch.enable_grad():
        per_output = _output_gradients(out, layer_outputs, num_outputs)
    del out, layer_outputs
    factors: dict[str, Any] = {}
    for k, (name, layer) in enumerate(layers.items()):
        x = captured.pop(name)[0]
        g = per_output[k]
        per_output[k] = None  # type: ignore[call-overload]
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


def _output_gradients(out: Tensor, layer_outputs: list[Tensor], num_outputs: int) -> list[Tensor]:
    """The gradients of each output o (summed over the examples) with respect to each layer's
    output, stacked: (O, *its shape), by O backward passes. (One pass batched over the outputs,
    ``is_grads_batched``, was no faster on the CPU: 0.43 against 0.40 s for a width-8 ResNet-18
    on 64 images, its convolutions' backward looped over the outputs by vmap.)"""
    stacked = [torch.zeros((num_outputs, *z.shape), dtype=z.dtype, device=z.device) for z in layer_outputs]
    for o in range(num_outputs):
        grads = torch.autograd.grad(out[:, o].sum(), layer_outputs, retain_graph=o + 1 < num_outputs, allow_unused=True)
        for rows, g in zip(stacked, grads, strict=True):
            if g is not None:
                rows[o] = g
    return stacked


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
    t, k, out = layer.positions, layer.inputs, layer.outputs
    if t == 1 or layer.kind == "embedding":
        return "positions"
    o = num_outputs * num_outputs if mode == "full" else num_outputs
    if mode == "full":
        by_positions = pairs * (t * t * (k + num_outputs * out) + t * o * out)
    else:
        by_positions = pairs * t * t * (k + o * out + o)
    by_jacobians = examples * num_outputs * t * out * k + pairs * o * out * k
    return "jacobians" if by_jacobians < _JACOBIAN_ROUTE_BELOW * by_positions else "positions"


def _structured_chunk(layers: dict[str, _Layer], routes: dict[str, str], num_outputs: int, mode: KernelMode,
                      budget: int, itemsize: int, memory: int | None) -> int:
    """The most examples a chunk may hold so that a chunk's factors while they are computed, two
    chunks' kept factors or Jacobians, and a block's products fit ``budget``: c·L + c²·Q numbers,
    L = Σ over layers of F + 2·(F on the positions route, O·size on the Jacobian route), F a
    layer's factor numbers per example (T·k + O·T·out), Q = the largest positions-route block,
    T²·(1 + O') + O' (O' = O² for "full", else O; linear in c for "diagonal"). MemoryBudgetTooSmall
    when one example does not fit a ``memory`` the caller set."""
    o = num_outputs * num_outputs if mode == "full" else num_outputs
    linear, quadratic = 0, 0
    for name, layer in layers.items():
        factors = layer.factor_numbers(num_outputs)
        linear += factors
        if routes[name] == "jacobians":
            linear += 2 * num_outputs * layer.size
        else:
            linear += 2 * factors
            t = layer.positions
            if mode == "full" and t > 1:
                # the inputs' products and the block; one example's H, n₁·T·out·O, per chunk
                block = t * t + o
                linear += t * num_outputs * layer.outputs
            else:
                block = t * t * (1 + o) + o
            if mode == "diagonal":
                linear += block
            else:
                quadratic = max(quadratic, block)
    numbers = budget // itemsize
    one = (linear + quadratic) * itemsize
    if memory is not None and one > memory:
        raise MemoryBudgetTooSmall(
            f"the structured layers' inputs, output gradients and products on one example need about "
            f"{one:,} bytes and memory={memory:,} is allowed; raise memory or measure fewer parameters (params=)")
    if quadratic == 0:
        return max(1, numbers // max(1, linear))
    chunk = int((math.sqrt(linear * linear + 4 * quadratic * numbers) - linear) / (2 * quadratic))
    while chunk > 1 and chunk * linear + chunk * chunk * quadratic > numbers:
        chunk -= 1
    return max(1, chunk)


# _structured_layers's answers by model, keyed by what the check depends on (the parameters
# differentiated, O, the shapes of an example's inputs); the weights' values do not change it
# (the layers found, and the bytes of the check's factors, which a later allowance must still hold)
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[tuple[tuple[str, _Layer], ...], int]]] = \
    weakref.WeakKeyDictionary()


def _structured_layers(function: ModelFunction, inputs: Any, num_outputs: int,
                       budget: int | None = None, covering: bool = False) -> dict[str, _Layer]:
    """The layers whose kernel the structured products compute exactly, by module name:
    ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (groups 1, zero padding given as numbers, "valid"
    or a symmetric "same"), ``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``), and
    the affine parameters of BatchNorm (with running statistics), LayerNorm and GroupNorm.

    A layer qualifies when its weight (and bias, if it has one) are plain parameters (not
    parametrised) among those differentiated, shared with no other module, the layer runs once
    per forward pass on inputs with the examples' dimension first, and the gradient its factors give (Σ u_(i,o) g_(o,i,t) ⊗ a_(i,t) reshaped to
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
    chosen = function.params
    key = (tuple(chosen), num_outputs, covering,
           tuple((tuple(t.shape[1:]), t.dtype) if isinstance(t, Tensor) else type(t)
                 for t in tree_flatten(inputs)[0]))
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
    if not candidates:
        return {}, 0

    def rest_allowed(held: set[str]) -> bool:
        rest = sum(t.numel() for n, t in chosen.items() if n not in held)
        return rest <= _REST_FRACTION * sum(t.numel() for t in chosen.values())

    if covering and not rest_allowed({n for _, _, names in candidates.values() for n in names}):
        return {}, 0
    calls: dict[str, int] = dict.fromkeys(candidates, 0)
    shapes: dict[str, tuple[int, int]] = {}  # the entries of an input and an output, all examples
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
        return count

    handles = [module.register_forward_hook(counter(name)) for name, (module, _, _) in candidates.items()]
    try:
        with torch.no_grad():  # counting calls: no graph
            _flat_outputs(function, function.params, sample)
    finally:
        for handle in handles:
            handle.remove()
    layers: dict[str, _Layer] = {}
    for name, (module, kind, names) in candidates.items():
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


def _full_by_positions(inputs: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
    """The "full" kernel (n₁, n₂, O, O) of a layer applied at T > 1 positions from its inputs'
    products (n₁, n₂, T, T) and output gradients g (O, n, T, out): for each example j of the
    second set, H = Σ_s (a_t·a'_s) g'_(b,s) (n₁·T²·O·out), then Σ_(t,l) g_(a,t,l) H_(t,l,b)
    (n₁·T·O²·out), two matrix products, no intermediate larger than n₁·T·out·O."""
    o, n1, t, out = g1.shape
    left = g1.permute(1, 0, 2, 3).reshape(n1, o, t * out)
    right = g2.permute(1, 2, 3, 0).contiguous()  # (n₂, s, l, b)
    columns = []
    for j in range(g2.shape[1]):
        h = (inputs[:, j].reshape(n1 * t, t) @ right[j].reshape(t, out * o)).view(n1, t * out, o)
        columns.append(torch.bmm(left, h))
    return torch.stack(columns, 1)


def _by_structure(function: ModelFunction, inputs1: Any, inputs2: Any, same: bool, mode: KernelMode,
                  layers: dict[str, _Layer], routes: dict[str, str], chunk: int,
                  num_outputs: int) -> dict[str, Tensor]:
    """Each structured layer's kernel from its inputs and output gradients (Novak et al. 2022's
    structured derivatives; nngeometry's Gram matrix), by its route (:func:`_route`):
    "positions", ⟨J_W(x)_a, J_W(x')_b⟩ = Σ_(t,s) (a_t·a'_s)(g_(a,t)·g'_(b,s)), and
    Σ_(t,s) g_(a,t)·g'_(b,s) for the bias, no per-example Jacobian formed (a block of two chunks
    holds n₁·n₂·O²·T² products for "full", n₁·n₂·T² for "trace"); "jacobians", the per-example
    Jacobians Σ_t g_t ⊗ a_t (a normalisation's from its normalised input), contracted."""
    n1, n2 = batch_size(inputs1), batch_size(inputs2)
    rows: dict[str, list[Tensor]] = {name: [] for name in layers}
    for s1, e1 in _chunks(n1, chunk):
        f1 = _factors(function, layers, slice_examples(inputs1, s1, e1), num_outputs, routes)
        targets = [(s1, e1)] if mode == "diagonal" else _chunks(n2, chunk)
        blocks: dict[str, list[Tensor]] = {name: [] for name in layers}
        for s2, e2 in targets:
            if mode == "diagonal" or (same and (s2, e2) == (s1, e1)):
                f2 = f1
            else:
                f2 = _factors(function, layers, slice_examples(inputs2, s2, e2), num_outputs, routes)
            for name, layer in layers.items():
                if isinstance(f1[name], dict):
                    blocks[name].append(_contract(f1[name], f2[name], layer.names, mode))
                    continue
                (a1, g1), (a2, g2) = f1[name], f2[name]
                # in the diagonal mode f2 is f1: the einsums pair each example with itself
                if layer.kind == "embedding":
                    inputs = _matches(function.model.get_submodule(name), a1, a2, mode, g1.dtype)
                else:
                    inputs = torch.einsum(_INPUTS[mode], a1, a2)
                if mode == "full" and layer.positions > 1:
                    # Σ_s (a_t·a'_s) g'_(b,s) first: T²·O·out + T·O²·out products a pair, not T²·O²·out
                    block = _full_by_positions(inputs, g1, g2)
                else:
                    block = torch.einsum(_PRODUCT[mode], inputs, torch.einsum(_GRADIENTS[mode], g1, g2))
                if len(layer.names) > 1:
                    block = block + torch.einsum(_BIAS[mode], g1.sum(2), g2.sum(2))
                blocks[name].append(block)
            del f2
        for name in layers:
            rows[name].append(torch.cat(blocks[name], dim=1) if mode != "diagonal" else blocks[name][0])
    return {name: torch.cat(parts, dim=0) for name, parts in rows.items()}


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
            products of a block of two chunks (``_structured_chunk``).
        memory: bytes a chunk's Jacobians, factors or product vectors may take (default 1 GiB;
            on a GPU a quarter of its free memory when that is more, up to 8 GiB).
            The activations of the forward passes and the kernel itself come on top, except for
            NTK-vector products, which count a chunk's activations.
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
                                     chunk_size, memory, group, vector_products)
    start_time = time.perf_counter()
    # the loss is never differentiated; activation_bytes evaluates one, so it must be a scalar
    function = ModelFunction(model, _sum_of_outputs, (inputs, None), params=params)
    budget = _default_memory(function.device) if memory is None else memory
    with isolated(function.model, "eval"):
        first = function.inputs
        same = inputs2 is None
        second = first if same else _widened_tree(to_device(inputs2, function.device))
        probe = _flat_outputs(function, function.params, slice_examples(first, 0, 1))
        o, p_count = probe.shape[1], function.num_params
        itemsize = probe.element_size()
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
            parts = []
            if groups:
                chunk = chunk_size or _fitting(budget, 2 * o * _numel(function, rest) * itemsize, memory,
                                               "the Jacobians of one example's other parameters")
                parts.append(_by_jacobians(function, first, second, same, mode, groups, chunk))
            if structured:
                pairs = n1 if mode == "diagonal" else n1 * n2
                routes = {name: _route(layer, o, mode, examples, pairs) for name, layer in structured.items()}
                chunk = _structured_chunk(structured, routes, o, mode, budget, itemsize, memory)
                parts.append(_by_structure(function, first, second, same, mode, structured, routes,
                                           chunk_size or chunk, o))
            # a structured layer's kernel is keyed by its module's name, which is its layer
            summed: dict[str, Tensor] = {}
            for part in parts:
                for name, k in part.items():
                    key = name if per_layer else ""
                    summed[key] = summed[key] + k if key in summed else k
            kernels = {layer: summed[layer] for layer in (layers if per_layer else [""])}
        else:
            groups = layers if per_layer else {"": list(function.params)}
            if implementation == "jacobian":
                chunk = chunk_size or _fitting(budget, 2 * o * p_count * itemsize, memory,
                                               "the Jacobians of one example")
                kernels = _by_jacobians(function, first, second, same, mode, groups, chunk)
            else:
                # a product holds a P-vector and a chunk's activations; the cotangent basis of a
                # chunk is (chunk·O)² numbers
                activation = max(1, function.activation_bytes(1))
                vector = p_count * itemsize
                chunk = chunk_size or max(1, min(math.isqrt(budget // itemsize) // o,
                                                 (budget - vector) // (2 * activation)))
                columns = _fitting(budget, vector + min(chunk, n2) * activation, memory,
                                   "one NTK-vector product (a P-vector and a chunk's activations)")
                kernels = _by_products(function, first, second, mode, groups, chunk, columns, o)
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
                      vector_products: bool = True) -> NTK:
    """:func:`ntk_of` of the sets split across ranks: this rank's rows against every example,
    gathered (see its ``group``)."""
    start_time = time.perf_counter()
    refuse_sharded(unwrap_model(model), "the empirical NTK (per-example Jacobians)")
    device = model_device(unwrap_model(model))
    inputs = to_device(inputs, device)
    everyone = gather_examples(inputs, group)
    empty = batch_size(inputs) == 0  # a rank with no example of the set: a row computed and dropped
    mine = slice_examples(everyone, 0, 1) if empty else inputs
    if mode == "diagonal":
        local = ntk_of(model, mine, None, mode, params, per_layer, implementation, chunk_size, memory,
                       vector_products=vector_products)
    else:
        others = everyone if inputs2 is None else gather_examples(to_device(inputs2, device), group)
        local = ntk_of(model, mine, others, mode, params, per_layer, implementation, chunk_size, memory,
                       vector_products=vector_products)
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
    NaN when either kernel is zero (the angle is undefined)."""
    if kernel1.shape != kernel2.shape:
        raise ValueError(f"kernels of different shapes: {tuple(kernel1.shape)} and {tuple(kernel2.shape)}")
    a = kernel1.detach().to(torch.float64).reshape(-1)
    b = kernel2.detach().to(torch.float64).reshape(-1)
    scale = float(a.norm() * b.norm())
    return 1.0 - float(a @ b) / scale if scale > 0 else math.nan


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
