"""Remedies the findings point to, ready to use: a one-line change each.

- :func:`stablemax_cross_entropy`: cross-entropy through StableMax instead of softmax (Prieto
  et al. 2025): s(x) = x + 1 for x ≥ 0 and 1/(1 − x) for x < 0, StableMax(z)_i = s(z_i)/Σ_j
  s(z_j), computed in float64; s grows linearly, so no class's term is absorbed (softmax
  collapse).
- :class:`OrthoGrad`: ⊥Grad (Prieto et al. 2025): per parameter tensor the gradient's component
  along θ is removed, g⊥ = g − (⟨θ, g⟩/⟨θ, θ⟩)θ, rescaled to ‖g‖, before the wrapped optimizer
  steps: the step can no longer just scale the weights (naive loss minimisation).
- :func:`z_loss`: weight · mean(log² Z), Z = Σ_j exp(z_j) (Wortsman et al. 2023; PaLM), which
  keeps the output logits' log-normaliser near 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["stablemax", "stablemax_cross_entropy", "OrthoGrad", "z_loss"]


def _s(x: Tensor) -> Tensor:
    """StableMax's s(x): x + 1 for x ≥ 0, 1/(1 − x) for x < 0."""
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.where(x < 0, x, torch.zeros_like(x))))


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax(z)_i = s(z_i) / Σ_j s(z_j) along ``dim``, in float64."""
    s = _s(logits.double())
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean",
                            ignore_index: int = -100) -> Tensor:
    """−log StableMax(z)_y, in float64 (the paper's choice), averaged (``reduction="mean"``),
    summed or per example; logits (batch, ..., classes), targets their class indices; rows whose
    target is ``ignore_index`` are left out. A drop-in for ``F.cross_entropy`` as ``loss_fn``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    rows = logits.reshape(-1, logits.shape[-1])
    labels = targets.reshape(-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    probabilities = stablemax(rows)
    losses = -torch.log(probabilities.gather(1, safe[:, None]).squeeze(1)) * keep
    if reduction == "none":
        return losses.reshape(targets.shape)
    total = losses.sum()
    return total if reduction == "sum" else total / keep.sum().clamp_min(1)


def z_loss(logits: Tensor, weight: float = 1e-4) -> Tensor:
    """``weight`` · mean over rows of (log Σ_j exp(z_j))²: add it to the loss to keep log Z near 0."""
    return weight * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class OrthoGrad(torch.optim.Optimizer):
    """⊥Grad around any optimizer: ``OrthoGrad(torch.optim.AdamW(model.parameters(), lr=1e-3))``.

    At each :meth:`step`, every parameter's gradient loses its component along the parameter,
    g⊥ = g − (⟨θ, g⟩/(⟨θ, θ⟩ + 1e-30))θ, and is rescaled to ‖g‖ (as in the authors' code), then
    the wrapped optimizer steps with every hyperparameter it was given (its betas, eps, weight
    decay...). The wrapper shares the wrapped optimizer's parameter groups and state, so a
    learning-rate scheduler, ``state_dict()`` and ``zero_grad()`` act on it. ``.grad`` holds
    g⊥ after a step.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"OrthoGrad wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrthoGrad({self.optimizer!r})"

    @torch.no_grad()
    def orthogonalise(self) -> None:
        """Replace every gradient by its part orthogonal to its parameter, at the same norm."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = p.reshape(-1), p.grad.reshape(-1)
                projection = torch.dot(w, g) / (torch.dot(w, w) + 1e-30)
                orthogonal = g - projection * w
                scaled = orthogonal * (torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(orthogonal) + 1e-30))
                p.grad.copy_(scaled.view_as(p.grad))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Orthogonalise the gradients, then step the wrapped optimizer (a closure's loss is
        evaluated first, its gradients orthogonalised with the rest)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.orthogonalise()
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state  # type: ignore[assignment]

