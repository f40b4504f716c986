"""The basic probes: cheap, always on, read straight from the parameters and their ``.grad``.

They measure every 50 steps by default (as Lightning logs; ``every=1`` for every step): each
measurement is a few passes over the parameters, which on a small, fast model is comparable to
the optimizer step.

Each records a total (over all trainable parameters) and an array ``per_layer`` (one entry per
layer, in the order of the run's ``layers`` metadata; a layer is the module owning a parameter).
Norms use ``torch._foreach_norm`` over all parameter tensors at once (one pass) and stay on the
device: the Lens copies the values of every basic probe measured at a step to the host together,
one transfer (and one wait for the device) per step.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from dynlens.probes.base import Context, Probe, Values

__all__ = ["GradNorm", "ParamNorm", "UpdateSize", "DistanceFromInit"]


def _trainable(ctx: Context) -> list[Tensor]:
    return [p.detach() for p in ctx.model.parameters() if p.requires_grad]


@functools.lru_cache(maxsize=8)
def _layer_index(layer_index: tuple[int, ...], device: torch.device) -> Tensor:
    """The layer index as a device tensor, made once (a copy from the host waits for the device)."""
    return torch.tensor(layer_index, device=device)


def _norms(tensors: list[Tensor], ctx: Context) -> tuple[Tensor, Tensor]:
    """(total 2-norm, per-layer 2-norms), float64 tensors on the parameters' device, of a list
    of tensors aligned with ``ctx.layer_index``. Nothing is read back here: the Lens brings
    every basic probe's values to the host in one transfer."""
    squares = torch.stack([n.double() for n in torch._foreach_norm(tensors)]) ** 2
    index = _layer_index(tuple(ctx.layer_index), squares.device)
    per_layer = torch.zeros(len(ctx.layers), dtype=torch.float64, device=squares.device)
    per_layer.index_add_(0, index, squares)
    return per_layer.sum().sqrt(), per_layer.sqrt()


class _Basic(Probe):
    # they read tensors and never run the model: no isolation, no timing rows
    pure: ClassVar[bool] = True
    isolate: ClassVar[bool] = False
    timed: ClassVar[bool] = False
    default_every: ClassVar[int] = 50


class GradNorm(_Basic):
    """‖∇L‖ of the training step, read from each parameter's ``.grad`` (never modified).

    At step n this is the gradient the optimizer used for step n (taken at θ_{n−1}, on the
    training batch). Records ``total`` and ``per_layer``; parameters without ``.grad`` count as 0,
    and nothing is recorded when no parameter has one (e.g. at step 0).
    """

    name = "grad_norm"

    def measure(self, ctx: Context) -> Values:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        if all(p.grad is None for p in params):
            return {}
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total, per_layer = _norms(grads, ctx)
        return {"total": total, "per_layer": per_layer}


class ParamNorm(_Basic):
    """‖θ_t‖: the norm of the trainable parameters, total and per layer."""

    name = "param_norm"

    def measure(self, ctx: Context) -> Values:
        total, per_layer = _norms(_trainable(ctx), ctx)
        return {"total": total, "per_layer": per_layer}


class UpdateSize(_Basic):
    """‖θ_t − θ_{t−1}‖: the size of the last optimizer step, total and per layer, and
    ``relative`` = ‖θ_t − θ_{t−1}‖/‖θ_{t−1}‖.

    Keeps one copy of the parameters, taken at the step before each step where it is due, and
    subtracts in place (no allocation per step). Nothing is recorded at step 0 or where no copy
    of the previous step exists.
    """

    name = "update_size"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - Probe's arguments
        super().__init__(*args, **kwargs)
        self._previous: list[Tensor] | None = None
        self._previous_step = -1
        self._previous_norm = float("nan")

    def prepare(self, ctx: Context) -> None:
        params = _trainable(ctx)
        if self._previous is None:
            self._previous = [p.clone() for p in params]
        else:
            torch._foreach_copy_(self._previous, params)
        self._previous_step = ctx.step

    def measure(self, ctx: Context) -> Values:
        if self._previous is None or self._previous_step != ctx.step - 1:
            return {}
        before, _ = _norms(self._previous, ctx)
        torch._foreach_sub_(self._previous, _trainable(ctx))  # θ_{t−1} − θ_t: the same norm
        self._previous_step = -1  # the copy is spent
        total, per_layer = _norms(self._previous, ctx)
        relative = torch.where(before > 0, total / before, torch.full_like(total, float("nan")))
        return {"total": total, "relative": relative, "per_layer": per_layer}


class DistanceFromInit(_Basic):
    """‖θ_t − θ_0‖/‖θ_0‖, the relative distance from initialisation (Chizat et al. 2019: small
    means the lazy/kernel regime), total and per layer (each layer relative to its own ‖θ_0‖),
    and ``absolute`` = ‖θ_t − θ_0‖. Keeps a copy of the initial parameters and one scratch copy
    (so that no memory is allocated per measurement)."""

    name = "distance_from_init"

    def setup(self, ctx: Context) -> None:
        self._initial = [p.clone() for p in _trainable(ctx)]
        self._scratch = [torch.empty_like(p) for p in self._initial]
        initial_total, self._initial_per_layer = _norms(self._initial, ctx)
        self._initial_total = float(initial_total)  # once, at setup

    def measure(self, ctx: Context) -> Values:
        torch._foreach_copy_(self._scratch, _trainable(ctx))
        torch._foreach_sub_(self._scratch, self._initial)
        total, per_layer = _norms(self._scratch, ctx)
        scale = self._initial_per_layer
        relative = torch.where(scale > 0, per_layer / scale, torch.full_like(scale, float("nan")))
        return {
            "relative": total / self._initial_total if self._initial_total > 0 else float("nan"),
            "absolute": total,
            "per_layer": relative,
        }
