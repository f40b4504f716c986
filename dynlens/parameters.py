"""A model's parameters by name: which are trained, where they live, which module owns each, and
the flat vectors the linear algebra works on.

Measurements differentiate the trainable parameters as a dict ``{name: tensor}`` in
``named_parameters`` order (:data:`Params`); Lanczos and the trace estimators see them as one
flat vector (:func:`flatten`, :func:`unflatten`). The names are those of the user's own module:
:func:`unwrap_model` strips the ``torch.compile`` and data-parallel wrappers first. Statistics
reported per layer group the parameters by the module that owns them (:func:`layer_of`).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]

__all__ = [
    "Params",
    "trainable_parameters",
    "model_device",
    "unwrap_model",
    "layer_of",
    "failing_module",
    "flatten",
    "unflatten",
]


def trainable_parameters(model: nn.Module) -> Params:
    """The model's trainable parameters by name (shared weights appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that run it differently from its own ``forward``.

    Strips ``torch.compile``'s ``OptimizedModule`` (compiled code has no double backward),
    ``nn.DataParallel`` (which scatters the inputs over replicas that do not see the parameters a
    measurement substitutes) and ``DistributedDataParallel`` (whose forward synchronises buffers
    across ranks), at any depth of nesting. The module returned holds the very same parameters and
    buffers, so measuring it measures the model; its parameter names are those of the user's own
    module, without the wrappers' ``_orig_mod.`` and ``module.`` prefixes.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def layer_of(name: str) -> str:
    """The module that owns a parameter, by its name: ``"encoder.0.weight"`` -> ``"encoder.0"``;
    a parameter of the model itself keeps its name (``"scale"`` -> ``"scale"``). Per-layer
    statistics (coherence's GSNR, the Hessian's layer blocks, the basic probes' norms through the
    Lens's layer index) group parameters by it."""
    return name.rsplit(".", 1)[0] if "." in name else name


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (a dict's values in order, or a sequence) into one flat vector."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a flat vector into a dict shaped like ``like`` (views into ``vector``)."""
    out: Params = {}
    offset = 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vector[offset : offset + n].view_as(t)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries; the parameters have {offset}")
    return out


def failing_module(model: nn.Module, err: BaseException) -> str | None:
    """The innermost module of ``model`` whose code was running when ``err`` was raised, as
    ``"'name' (Type)"`` for an error message; None if none of its modules was on the stack."""
    names = {id(m): (n or "<model>", type(m).__name__) for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    return None if found is None else f"{found[0]!r} ({found[1]})"
