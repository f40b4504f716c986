"""Layers whose PyTorch kernels have no second derivative, computed inside a measurement as
composite operations of equal value.

A survey of the layer types of ``torch.nn`` (``benchmarks/second_derivatives.py``) found two
whose kernels have no double backward, so every Hessian-vector product through them failed:

- ``nn.Hardsigmoid`` / ``F.hardsigmoid``: ``derivative for aten::hardsigmoid_backward is not
  implemented`` (MobileNetV3's and EfficientNet-lite's squeeze-excitation blocks). Composite:
  relu6(x + 3)/6, PyTorch's definition of it.
- ``nn.EmbeddingBag`` / ``F.embedding_bag``: ``the derivative for '_embedding_bag_backward' is
  not implemented`` (recommendation models). Composite: an embedding lookup, each bag's rows
  gathered into a padded block, and the bag's reduction (sum, mean or max), with per-sample
  weights, offsets (``include_last_offset`` too) and ``padding_idx`` as the kernel takes them.

and one whose second derivative is NaN where its value and first derivative are finite:

- ``F.normalize`` (p = 2) of a zero vector: x / max(‖x‖, eps) is x/eps there, but the double
  backward of ‖x‖ at 0 is NaN, so every Hessian-vector product through it was NaN (torchvision's
  Swin V2: its keys' bias is zero, so the zero tokens that pad a window have zero keys, and the
  cosine attention normalises them). Composite: x / sqrt(max(Σx², eps²)), the same value and
  first derivative (‖x‖ ≥ eps: x/‖x‖; below: x/eps) and a finite second derivative.
- ``nn.CosineSimilarity`` / ``F.cosine_similarity`` with a zero vector: the same NaN (the
  double backward of the norms). Composite: the kernel's own form, x₁/max(‖x₁‖, eps) ·
  x₂/max(‖x₂‖, eps) with the clamp outside the gradient as the kernel does, and each norm as
  sqrt(max(Σx², tiny)) (tiny the dtype's smallest normal number), whose first derivative is the
  kernel's for every ‖x‖ ≥ sqrt(tiny) (and 0 at x = 0, as the kernel's) and whose second is finite.

:func:`composite_layers` swaps the functions in ``torch.nn.functional`` (where the modules look
them up at every call) for the composites and restores them on exit;
:func:`dynlens.functional.isolated` enters it for every measurement, so training keeps its own
kernels. Each composite equals the kernel's forward and first derivative (float64, to rounding:
``tests/test_composites.py``) away from the kernel's points of non-differentiability (x = ±3).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["composite_layers", "hardsigmoid", "embedding_bag", "normalize", "cosine_similarity"]

_ORIGINAL = {"hardsigmoid": F.hardsigmoid, "embedding_bag": F.embedding_bag, "normalize": F.normalize,
             "cosine_similarity": F.cosine_similarity}


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:  # noqa: A002 - F's signature
    """``F.hardsigmoid`` as relu6(x + 3)/6: the same values, derivatives of every order."""
    if inplace:
        return input.add_(3.0).clamp_(0.0, 6.0).div_(6.0)
    return F.relu6(input + 3.0) / 6.0


def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,  # noqa: A002
              out: Tensor | None = None) -> Tensor:
    """``F.normalize`` for p = 2 as x / sqrt(max(Σx², eps²)): the kernel's value and first
    derivative, and a second derivative that is finite at x = 0 (the kernel's is NaN there).
    Other p, and ``out=``, go to PyTorch's function unchanged."""
    if p != 2 or out is not None:
        return _ORIGINAL["normalize"](input, p, dim, eps, out)
    squares = (input * input).sum(dim, keepdim=True)
    return input / torch.sqrt(torch.clamp_min(squares, eps * eps))


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """``F.cosine_similarity`` with the kernel's value and first derivative and a second
    derivative that is finite where an input is a zero vector (the kernel's is NaN there)."""
    if not (x1.is_floating_point() and x2.is_floating_point()):
        return _ORIGINAL["cosine_similarity"](x1, x2, dim, eps)

    def clamped_norm(x: Tensor) -> Tensor:
        norm = torch.sqrt(torch.clamp_min((x * x).sum(dim, keepdim=True), torch.finfo(x.dtype).tiny))
        # max(‖x‖, eps) in value, ‖x‖'s gradient: the kernel clamps without autograd
        return norm + (torch.clamp_min(norm, eps) - norm).detach()

    return ((x1 / clamped_norm(x1)) * (x2 / clamped_norm(x2))).sum(dim)


def embedding_bag(
    input: Tensor,  # noqa: A002 - F's signature
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` from an embedding lookup and a reduction over a padded block of each
    bag's rows. Options that change the weight (``max_norm`` renormalises rows in place) or the
    gradient's layout (``sparse``, ``scale_grad_by_freq``) go to PyTorch's kernel unchanged."""
    if max_norm is not None or sparse or scale_grad_by_freq:
        return _ORIGINAL["embedding_bag"](input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
                                          mode, sparse, per_sample_weights, include_last_offset, padding_idx)
    if mode not in ("sum", "mean", "max"):
        raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(
            f"embedding_bag: per_sample_weights was not None. per_sample_weights is only supported "
            f"for mode='sum' (got mode='{mode}'). Please open a feature request on GitHub.")
    if input.dim() == 2:
        bags, length = input.shape
        flat = input.reshape(-1)
        bag = torch.arange(bags, device=input.device).repeat_interleave(length)
        position = torch.arange(length, device=input.device).repeat(bags)
        weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        flat, weights = input, per_sample_weights
        starts = offsets[:-1] if include_last_offset else offsets
        ends = torch.cat([starts[1:], offsets[-1:] if include_last_offset else flat.new_tensor([flat.numel()])])
        bags, length = starts.numel(), int((ends - starts).max()) if starts.numel() else 0
        bag = torch.repeat_interleave(torch.arange(bags, device=input.device), ends - starts)
        position = torch.arange(flat.numel(), device=input.device) - starts.repeat_interleave(ends - starts)
    else:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    rows = F.embedding(flat, weight)
    kept = torch.ones_like(flat, dtype=torch.bool) if padding_idx is None else flat != padding_idx
    if weights is not None:
        rows = rows * weights.to(rows.dtype).unsqueeze(-1)
    # padding_idx's rows keep their slots, zeroed and marked absent: no boolean indexing, so the
    # composite vectorises under torch.func.vmap (per-example gradients) for 2-D inputs
    block = rows.new_zeros((bags, max(length, 1), weight.shape[1]))
    present = torch.zeros((bags, max(length, 1)), dtype=torch.bool, device=input.device)
    block = block.index_put((bag, position), rows * kept.unsqueeze(-1).to(rows.dtype))
    present = present.index_put((bag, position), kept)
    counts = present.sum(dim=1, keepdim=True)
    if mode == "sum":
        return block.sum(dim=1)
    if mode == "mean":
        return block.sum(dim=1) / counts.clamp_min(1).to(block.dtype)
    lowest = torch.finfo(block.dtype).min
    largest = block.masked_fill(~present.unsqueeze(-1), lowest).amax(dim=1)
    return torch.where(counts > 0, largest, torch.zeros_like(largest))  # an empty bag gives zeros


def composite_layers() -> contextlib.AbstractContextManager[Any]:
    """Swap ``F.hardsigmoid``, ``F.embedding_bag``, ``F.normalize`` and ``F.cosine_similarity``
    for their composites; restore on exit."""
    from dynlens.isolation import _attributes_set

    return _attributes_set([(F, "hardsigmoid", hardsigmoid), (F, "embedding_bag", embedding_bag),
                            (F, "normalize", normalize), (F, "cosine_similarity", cosine_similarity)])
