"""Trace estimation from matrix-vector products: Hutchinson and Hutch++.

Hutchinson (1989): for Rademacher z (entries ±1), E[zᵀ A z] = tr(A) and
Var[zᵀ A z] = 2(‖A‖_F² − Σ_i A_ii²), so averaging s samples has error O(‖A‖_F/√s).
Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace
Estimation", SOSA) first captures the top of the spectrum exactly — Q = orth(A S) for a
Rademacher sketch S — and applies Hutchinson only to the deflated remainder
(I − QQᵀ) A (I − QQᵀ), whose Frobenius norm is small when A's spectrum decays; error
O(1/s) instead of O(1/√s) for PSD A.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from dynlens.linalg.operator import LinearOperator, default_generator, rademacher_vectors


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of tr(A).

    Fields:
        value: the estimate of tr(A) (float, units of A's eigenvalues).
        stderr: its standard error: the sample standard deviation of the Hutchinson terms
            divided by √(their number); for Hutch++ only the deflated part is random, the
            exact part adds no error.
        samples: the matrix-vector product budget that was asked for.
        matvecs: matrix-vector products used (= samples).
        elapsed: wall-clock seconds.
    """

    value: float
    stderr: float
    samples: int
    matvecs: int
    elapsed: float


def _quadratic_forms(op: LinearOperator, vectors: Tensor) -> Tensor:
    """zᵢᵀ A zᵢ for each column zᵢ of ``vectors``, float64 CPU (b,), accumulated in float64."""
    products = op.mm(vectors)
    return torch.sum(vectors * products, dim=0, dtype=torch.float64).cpu()


def _mean_and_stderr(terms: Tensor) -> tuple[float, float]:
    return float(terms.mean()), float(terms.std(correction=1)) / math.sqrt(len(terms))


def hutchinson(
    op: LinearOperator, samples: int = 64, generator: torch.Generator | None = None
) -> TraceEstimate:
    """Hutchinson's estimate tr(A) ≈ (1/s) Σ_i z_iᵀ A z_i with s Rademacher vectors z_i.

    Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines". Unbiased; stderr = sample std / √s.

    Args:
        op: the symmetric operator.
        samples: s ≥ 2, the number of probe vectors.
        generator: CPU generator for the probes; default seeded with 0 (never the global RNG).

    Cost: ``samples`` matrix-vector products (one ``matmat`` of s columns when available).

    Returns:
        :class:`TraceEstimate`.
    """
    start_time = time.perf_counter()
    if samples < 2:
        raise ValueError(
            f"hutchinson needs samples >= 2 to report a standard error; got {samples}."
        )
    matvecs_before = op.matvecs
    generator = default_generator(generator)
    probes = rademacher_vectors(op.size, samples, generator, op.dtype, op.device)
    value, stderr = _mean_and_stderr(_quadratic_forms(op, probes))
    return TraceEstimate(
        value=value,
        stderr=stderr,
        samples=samples,
        matvecs=op.matvecs - matvecs_before,
        elapsed=time.perf_counter() - start_time,
    )


def hutch_plus_plus(
    op: LinearOperator, samples: int = 64, generator: torch.Generator | None = None
) -> TraceEstimate:
    """Hutch++ estimate tr(A) ≈ tr(QᵀAQ) + Hutchinson on (I − QQᵀ) A (I − QQᵀ).

    Meyer, Musco, Musco & Woodruff 2021. The budget s is split in thirds: c = ⌊s/3⌋
    Rademacher columns S, Q = orth(A S) (c products), the exact part tr(QᵀAQ) (c products),
    and s − 2c Rademacher vectors g projected to g' = (I − QQᵀ) g for the Hutchinson part
    (1/(s − 2c)) Σ g'ᵀ A g' (s − 2c products). The estimate is exact when rank(A) ≤ c.
    stderr comes from the sample variance of the Hutchinson part.

    Args:
        op: the symmetric operator.
        samples: s ≥ 4, the total matrix-vector product budget (so that the Hutchinson
            part has at least 2 samples for a standard error).
        generator: CPU generator for the probes; default seeded with 0 (never the global RNG).

    Cost: exactly ``samples`` matrix-vector products (three ``matmat`` calls when available)
    and memory for about s vectors of size n on the operator's device.

    Returns:
        :class:`TraceEstimate`.
    """
    start_time = time.perf_counter()
    if samples < 4:
        raise ValueError(
            f"hutch_plus_plus needs samples >= 4 (a third for the sketch, a third for the "
            f"exact part, the rest for Hutchinson); got {samples}."
        )
    matvecs_before = op.matvecs
    generator = default_generator(generator)
    sketch_size = samples // 3
    sketch = rademacher_vectors(op.size, sketch_size, generator, op.dtype, op.device)
    basis, _ = torch.linalg.qr(op.mm(sketch))
    exact = float(torch.sum(basis * op.mm(basis), dtype=torch.float64))
    probes = rademacher_vectors(op.size, samples - 2 * sketch_size, generator, op.dtype, op.device)
    probes = probes - basis @ (basis.T @ probes)
    residual, stderr = _mean_and_stderr(_quadratic_forms(op, probes))
    return TraceEstimate(
        value=exact + residual,
        stderr=stderr,
        samples=samples,
        matvecs=op.matvecs - matvecs_before,
        elapsed=time.perf_counter() - start_time,
    )
