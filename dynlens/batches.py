"""Batches and their losses: the conventions every measurement and the Lens follow.

A batch is ``(inputs, targets)``: ``inputs`` is a Tensor (``model(x)``), a tuple (``model(*x)``) or a
dict (``model(**x)``), and the leading dimension of its tensors indexes the examples.
``loss_fn(outputs, targets)`` returns the mean loss; the loss of one example is ``loss_fn`` applied
to a batch of one, vectorised with ``vmap`` (or read from the unreduced form of torch's own loss
modules, which gives it exactly). Half-precision tensors are measured in float32 (:func:`_widened`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "split_batch",
    "call_model",
    "batch_size",
    "to_device",
    "slice_examples",
    "check_loss",
    "example_losses",
]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a batch, with an error that says what a batch must be."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be a pair (inputs, targets); got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ". Pass probe_batch=(x, y) where model(x) gives the outputs and loss_fn(outputs, y) the loss."
    )


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` on ``inputs`` by the batch convention: a Tensor as ``model(x)``, a tuple as
    ``model(*x)``, a dict as ``model(**x)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any) -> int:
    """Number of examples in ``inputs``: the leading dimension of its first tensor."""
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError(
            "the batch inputs hold no tensor with a batch dimension; pass tensors whose first "
            "dimension indexes the examples"
        )
    return int(leaves[0].shape[0])


def to_device(tree: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; other leaves stay as they are."""
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, tree)


_HALF = (torch.float16, torch.bfloat16)


def _widened(t: Tensor) -> Tensor:
    """``t`` in float32 if it is a half-precision float tensor (a copy), else ``t`` itself."""
    return t.float() if t.dtype in _HALF else t


def _widened_tree(tree: Any) -> Any:
    return tree_map(lambda x: _widened(x) if isinstance(x, Tensor) else x, tree)


def logits_of(outputs: Any) -> Tensor | None:
    """The logits in a model's outputs: the outputs themselves when a tensor, their ``.logits``
    (Hugging Face's ``ModelOutput``), or their first element; None if none of these is a tensor."""
    if isinstance(outputs, Tensor):
        return outputs
    found = getattr(outputs, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    return None


def slice_examples(tree: Any, start: int, stop: int, step: int = 1) -> Any:
    """Examples ``start:stop:step`` of every tensor leaf with a leading batch dimension."""
    return tree_map(lambda x: x[start:stop:step] if isinstance(x, Tensor) and x.dim() > 0 else x, tree)


def _token_length(tree: Any) -> int | None:
    """The length T of the token sequences in a batch's inputs: the second dimension of its first
    integer tensor of shape (examples, T); None when it holds none (images, features)."""
    for x in tree_flatten(tree)[0]:
        if isinstance(x, Tensor) and x.dim() == 2 and not x.is_floating_point() and not x.is_complex() \
                and x.dtype != torch.bool:
            return int(x.shape[1])
    return None


def _last_tokens(tree: Any, length: int, keep: int) -> Any:
    """The last ``keep`` positions of every tensor leaf whose second dimension is the sequence
    ``length`` (the tokens, and an attention mask or position ids beside them)."""
    return tree_map(lambda x: x[:, length - keep:] if isinstance(x, Tensor) and x.dim() >= 2
                    and x.shape[1] == length else x, tree)


def _example_dims(tree: Any) -> Any:
    """``vmap`` in_dims for a batch: 0 for tensors with a batch dimension, None elsewhere."""
    return tree_map(lambda x: 0 if isinstance(x, Tensor) and x.dim() > 0 else None, tree)


def _unsqueeze(tree: Any) -> Any:
    return tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, tree)


# ----------------------------------------------------------------------------- losses


def check_loss(value: Any) -> Tensor:
    """Return ``value`` if it is a scalar tensor, else raise an error saying what loss_fn must return."""
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn returned shape {shape}; dynlens needs the mean loss (a scalar) — pass "
            "nn.CrossEntropyLoss() with its default reduction, or a function that returns .mean()"
        )
    return value


# Loss modules whose reduction="none" gives each example's loss elementwise: with the mean (sum)
# reduction, the loss of one example alone is the mean (sum) of its elements.
_ELEMENTWISE_LOSSES: dict[type, Callable[[Any, Tensor, Tensor], Tensor]] = {
    nn.MSELoss: lambda f, o, t: F.mse_loss(o, t, reduction="none"),
    nn.L1Loss: lambda f, o, t: F.l1_loss(o, t, reduction="none"),
    nn.SmoothL1Loss: lambda f, o, t: F.smooth_l1_loss(o, t, reduction="none", beta=f.beta),
    nn.HuberLoss: lambda f, o, t: F.huber_loss(o, t, reduction="none", delta=f.delta),
    nn.BCEWithLogitsLoss: lambda f, o, t: F.binary_cross_entropy_with_logits(o, t, reduction="none",
                                                                            pos_weight=f.pos_weight),
    nn.BCELoss: lambda f, o, t: F.binary_cross_entropy(o, t, reduction="none"),
}


def _unreduced(loss_fn: Callable[..., Any], outputs: Tensor, targets: Tensor) -> Tensor | None:
    """Each example's loss from one call of ``loss_fn``'s unreduced form, for the torch loss
    modules whose unreduced values give it exactly; None for anything else."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum") or getattr(loss_fn, "weight", None) is not None:
        return None
    kind = type(loss_fn)
    if kind in (nn.CrossEntropyLoss, nn.NLLLoss) and outputs.dim() == 2:
        if targets.dim() == 1 and not targets.is_floating_point():
            if kind is nn.CrossEntropyLoss:
                values = F.cross_entropy(outputs, targets, reduction="none", ignore_index=loss_fn.ignore_index,
                                         label_smoothing=loss_fn.label_smoothing)
            else:
                values = F.nll_loss(outputs, targets, reduction="none", ignore_index=loss_fn.ignore_index)
            if reduction == "mean":  # an example alone whose target is ignored: the mean of nothing
                values = values.masked_fill(targets == loss_fn.ignore_index, math.nan)
            return values
        if kind is nn.CrossEntropyLoss and targets.shape == outputs.shape:  # class probabilities
            return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=loss_fn.label_smoothing)
        return None
    if kind in _ELEMENTWISE_LOSSES and targets.shape == outputs.shape:
        values = _ELEMENTWISE_LOSSES[kind](loss_fn, outputs, targets).reshape(outputs.shape[0], -1)
        return values.mean(dim=1) if reduction == "mean" else values.sum(dim=1)
    return None


def example_losses(loss_fn: Callable[..., Any], outputs: Tensor, targets: Any) -> Tensor:
    """(ℓ_1, ..., ℓ_n): ``loss_fn`` of each example alone, from batched ``outputs`` (n, ...) and
    ``targets``. The torch loss modules with the mean or sum reduction and no class weights
    (cross-entropy, NLL, MSE, L1, smooth L1, Huber, binary cross-entropy) are evaluated once
    unreduced; any other ``loss_fn`` by ``vmap`` over the examples (each a batch of one)."""
    if isinstance(targets, Tensor) and targets.dim() > 0 and targets.shape[0] == outputs.shape[0]:
        values = _unreduced(loss_fn, outputs, targets)
        if values is not None:
            return values

    def one(o: Tensor, t: Any) -> Tensor:
        return check_loss(loss_fn(o.unsqueeze(0), _unsqueeze(t)))

    return vmap(one, in_dims=(0, _example_dims(targets)))(outputs, targets)
