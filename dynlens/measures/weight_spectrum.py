"""The spectrum of each weight matrix: its largest singular value and its stable rank.

For a weight matrix W (m × n; a convolution's kernel read as out_channels × in_channels·k…,
an embedding as vocabulary × width):

- the top singular value σ_max(W) = ‖W‖₂, the spectral norm: the most the layer can stretch an
  input (the quantity spectral normalisation divides by, Miyato et al. 2018);
- the stable rank ‖W‖_F² / σ_max(W)², a continuous lower bound on the rank that small singular
  values do not move: 1 when W is rank one, min(m, n) when every singular value is equal
  (Rudelson & Vershynin 2007; tracked over training by Martin & Mahoney 2021).

σ_max² is the top eigenvalue of the Gram matrix of W's shorter side (W Wᵀ or Wᵀ W), found by
Lanczos (:func:`dynlens.linalg.lanczos_eigsh`) from products with W and Wᵀ, never forming
either Gram matrix nor an SVD. Data-free: only the parameters are read. Cost per matrix: a few
tens of products with W and Wᵀ (each 2·m·n multiply-adds), far below one training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dynlens.linalg import LinearOperator, lanczos_eigsh

__all__ = ["WeightSpectrum", "weight_spectrum", "weight_matrices"]


@dataclass(frozen=True)
class WeightSpectrum:
    """The spectrum of each weight matrix of a model (:func:`weight_spectrum`).

    Attributes:
        names: the parameter name of each matrix, in ``model.named_parameters()`` order.
        shapes: each matrix's (rows, columns) as measured (a kernel flattened after its first
            dimension).
        top_singular_value: σ_max per matrix, float64.
        stable_rank: ‖W‖_F² / σ_max² per matrix, float64 (in [1, min(rows, columns)]).
        products: the Gram-matrix products each matrix took.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    top_singular_value: np.ndarray
    stable_rank: np.ndarray
    products: np.ndarray


def weight_matrices(model: nn.Module, trainable_only: bool = True) -> list[tuple[str, Tensor]]:
    """``(name, W)`` for every parameter with at least two dimensions, read as a matrix of its
    first dimension by the rest (a convolution's output channels by its inputs times the
    kernel), in ``model.named_parameters()`` order; biases, norms' scales and other vectors are
    left out. ``trainable_only``: only parameters with ``requires_grad``."""
    return [(name, p.detach().reshape(p.shape[0], -1)) for name, p in model.named_parameters()
            if p.dim() >= 2 and p.numel() > 0 and (p.requires_grad or not trainable_only)]


def weight_spectrum(model: nn.Module, *, tol: float = 1e-4, max_iters: int | None = None,
                    trainable_only: bool = True, seed: int = 0) -> WeightSpectrum:
    """The top singular value and the stable rank of each weight matrix of ``model``.

    Args:
        model: any module; its parameters are read, never changed.
        tol: Lanczos's tolerance on the relative residual of σ_max²; the eigenvalue's error is
            then about tol² relative (1e-8 at the default), so σ_max is good to ~1e-8.
        max_iters: cap on the Lanczos steps per matrix (default: the Gram matrix's size).
        trainable_only: leave out parameters without ``requires_grad``.
        seed: seeds each matrix's Lanczos start vector.

    Returns:
        A :class:`WeightSpectrum`. Matrices are measured in float32, or float64 where the
        parameter is float64 (a bfloat16 or float16 parameter is widened to float32).

    Raises:
        ValueError: the model has no weight matrix (no parameter with two or more dimensions).
    """
    matrices = weight_matrices(model, trainable_only)
    if not matrices:
        raise ValueError(
            f"{type(model).__name__} has no weight matrix to measure (no {'trainable ' if trainable_only else ''}"
            "parameter with two or more dimensions)"
        )
    tops, ranks, products = [], [], []
    for index, (_, matrix) in enumerate(matrices):
        top, frobenius_sq, count = _top_singular_value(matrix, tol, max_iters, seed + index)
        tops.append(top)
        ranks.append(frobenius_sq / top**2 if top > 0 else float("nan"))
        products.append(count)
    return WeightSpectrum(
        names=tuple(name for name, _ in matrices),
        shapes=tuple((int(m.shape[0]), int(m.shape[1])) for _, m in matrices),
        top_singular_value=np.asarray(tops, dtype=np.float64),
        stable_rank=np.asarray(ranks, dtype=np.float64),
        products=np.asarray(products, dtype=np.int64),
    )


def _top_singular_value(matrix: Tensor, tol: float, max_iters: int | None, seed: int) -> tuple[float, float, int]:
    """``(σ_max, ‖W‖_F², products)`` of one matrix: Lanczos on the Gram matrix of its shorter
    side."""
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    w = matrix.to(dtype)
    frobenius_sq = float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2)
    if frobenius_sq == 0:
        return 0.0, 0.0, 0
    rows, cols = w.shape
    if rows <= cols:
        size, matvec = rows, (lambda v: w @ (w.T @ v))
    else:
        size, matvec = cols, (lambda v: w.T @ (w @ v))
    op = LinearOperator(matvec=matvec, size=size, dtype=dtype, device=w.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = lanczos_eigsh(op, k=1, which="top", tol=tol, max_iters=max_iters, generator=generator)
    # the Gram matrix is positive semi-definite: a tiny negative Ritz value is rounding
    return float(result.values[0].clamp_min(0.0).sqrt()), frobenius_sq, int(result.matvecs)
