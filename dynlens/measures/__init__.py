"""Measurements: pure functions ``(model, loss_fn, batch, ...) -> result dataclass``, one module
per phenomenon. No state, no I/O."""

from dynlens.measures.coherence import Coherence, gradient_coherence
from dynlens.measures.hessian import (
    Eigen,
    Estimate,
    SpectralDensity,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)

__all__ = [
    "Coherence",
    "gradient_coherence",
    "Eigen",
    "Estimate",
    "SpectralDensity",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
]
