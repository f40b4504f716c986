"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric A ∈ R^{n×n} is φ(t) = (1/n) Σ_i δ(t − λ_i). For a unit
vector v, vᵀ f(A) v = Σ_i (vᵀu_i)² f(λ_i) is an integral against a spectral measure, and m
Lanczos steps from v give its m-point Gauss quadrature: nodes θ_j = eigenvalues of T_m,
weights τ_j² = squared first components of T_m's eigenvectors (Golub & Meurant 1994). With
v = z/√n for a Rademacher z, E[vᵀ f(A) v] = tr f(A)/n, so averaging the quadratures of
independent runs estimates φ (Lin, Saad & Yang 2016, "Approximating spectral densities of
large matrices", SIAM Review; Ghorbani, Krishnan & Xiao 2019, "An investigation into neural
net optimization via Hessian eigenvalue density"; Papyan 2018).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dynlens.linalg.lanczos import Tridiagonal, lanczos_tridiagonal
from dynlens.linalg.operator import LinearOperator, default_generator, rademacher_vectors


@dataclass(frozen=True)
class SpectralDensity:
    """A spectral density estimate as a weighted sum of point masses.

    Fields:
        nodes: float64 CPU tensor, the Ritz values θ_{l,j} of every run, run after run
            (``runs * iters`` of them unless a run broke down early, then fewer).
        weights: float64 CPU tensor of the same shape, τ_{l,j}² / runs; they sum to 1.
        runs: the number of independent Lanczos runs.
        iters: the Lanczos steps asked of each run.
        matvecs: matrix-vector products used (≤ runs · iters).
        elapsed: wall-clock seconds.

    Σ_j w_j f(θ_j) estimates tr f(A) / n; :meth:`density` smooths it into φ(t).
    """

    nodes: Tensor
    weights: Tensor
    runs: int
    iters: int
    matvecs: int
    elapsed: float

    def density(self, grid: np.ndarray | Tensor, sigma: float) -> np.ndarray:
        """The smoothed density on ``grid``; see :func:`smooth_density`."""
        return smooth_density(self.nodes, self.weights, grid, sigma)

    def moments(self, order: int) -> np.ndarray:
        """Σ_j w_j θ_j^p for p = 0..order; see :func:`density_moments`."""
        return density_moments(self.nodes, self.weights, order)


def gauss_quadrature(tridiagonal: Tridiagonal) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gauss quadrature that a Lanczos tridiagonal T defines.

    Nodes θ_j are the eigenvalues of T (ascending), weights τ_j² the squared first
    components of its unit eigenvectors (they sum to 1). For the run started at unit v,
    Σ_j τ_j² θ_j^p = vᵀ A^p v exactly for p ≤ 2m − 1 (all p if the run broke down).
    """
    theta, vectors = tridiagonal.eigh()
    return theta, vectors[0] ** 2


def slq(
    op: LinearOperator,
    runs: int = 8,
    iters: int = 80,
    generator: torch.Generator | None = None,
    batch: bool = True,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``runs`` independent Lanczos runs of ``iters`` steps (full reorthogonalisation, no
    early stopping except on breakdown) start from v_l = z_l/√n, z_l the columns of
    ``rademacher_vectors(n, runs, generator, ...)``. Nodes are the Ritz values θ_{l,j},
    weights τ_{l,j}²/runs (:func:`gauss_quadrature`), so φ(t) ≈ Σ w δ(t − θ).

    With ``batch=True`` and an operator that has ``matmat``, the runs go in lockstep, one
    ``matmat`` of ``runs`` columns per step (far faster for Hessian operators), at the cost
    of ``runs * iters`` stored vectors; otherwise runs go one after another (``iters``
    stored vectors). Both give the same result.

    Args:
        op: the symmetric operator.
        runs: number of independent start vectors (≥ 1).
        iters: Lanczos steps per run (≥ 1); the quadrature of each run is exact for
            polynomials of degree ≤ 2·iters − 1.
        generator: CPU generator for the start vectors; default seeded with 0. The global
            RNG is never used.
        batch: run the runs in lockstep when ``op.matmat`` exists.

    Cost: at most ``runs * iters`` matrix-vector products.

    Returns:
        :class:`SpectralDensity`.
    """
    start_time = time.perf_counter()
    if runs < 1:
        raise ValueError(f"runs must be at least 1; got {runs}.")
    if iters < 1:
        raise ValueError(f"iters must be at least 1; got {iters}.")
    matvecs_before = op.matvecs
    generator = default_generator(generator)
    starts = rademacher_vectors(op.size, runs, generator, op.dtype, op.device)
    if batch and op.matmat is not None:
        tridiagonals = lanczos_tridiagonal(op, starts, iters)
    else:
        tridiagonals = [lanczos_tridiagonal(op, starts[:, run], iters)[0] for run in range(runs)]
    quadratures = [gauss_quadrature(t) for t in tridiagonals]
    nodes = np.concatenate([theta for theta, _ in quadratures])
    weights = np.concatenate([tau for _, tau in quadratures]) / runs
    return SpectralDensity(
        nodes=torch.from_numpy(nodes),
        weights=torch.from_numpy(weights),
        runs=runs,
        iters=iters,
        matvecs=op.matvecs - matvecs_before,
        elapsed=time.perf_counter() - start_time,
    )


def smooth_density(
    nodes: np.ndarray | Tensor,
    weights: np.ndarray | Tensor,
    grid: np.ndarray | Tensor,
    sigma: float,
) -> np.ndarray:
    """The Gaussian-smoothed density φ(t) = Σ_j w_j 𝒩(t; θ_j, σ²) on ``grid`` (float64 array).

    With SLQ weights (summing to 1) it integrates to 1 over the real line. σ > 0 should be
    wider than the spacing of the nodes in the bulk (Ghorbani et al. 2019 use σ ≈ 1e-5 of
    the spectral range on a log scale; a few grid steps is a good start).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive; got {sigma}.")
    theta = np.asarray(nodes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    t = np.asarray(grid, dtype=np.float64)
    z = (t[:, None] - theta[None, :]) / sigma
    return (np.exp(-0.5 * z**2) @ w) / (sigma * np.sqrt(2 * np.pi))


def density_moments(
    nodes: np.ndarray | Tensor, weights: np.ndarray | Tensor, order: int
) -> np.ndarray:
    """Moments Σ_j w_j θ_j^p for p = 0..order, a float64 array of length order + 1.

    With SLQ nodes and weights, moment p estimates tr(A^p)/n (moment 0 is the total weight,
    1 for SLQ).
    """
    if order < 0:
        raise ValueError(f"order must be nonnegative; got {order}.")
    theta = np.asarray(nodes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    return np.array([np.sum(w * theta**p) for p in range(order + 1)])
