"""Linear algebra on symmetric operators given by a matrix-vector product.

Knows nothing about networks: every algorithm takes a :class:`LinearOperator` (a matvec over
flat vectors on some device and dtype) and is tested against explicit matrices.

- :func:`lanczos_eigsh`: extreme eigenpairs, Lanczos with full reorthogonalisation.
- :func:`slq`: spectral density by stochastic Lanczos quadrature.
- :func:`hutchinson`, :func:`hutch_plus_plus`: trace estimates.
"""

from dynlens.linalg.lanczos import LanczosResult, Tridiagonal, lanczos_eigsh, lanczos_tridiagonal
from dynlens.linalg.operator import (
    LinearOperator,
    default_generator,
    dense_operator,
    device_generator,
    gaussian_vector,
    rademacher_vectors,
)
from dynlens.linalg.slq import (
    SpectralDensity,
    density_moments,
    gauss_quadrature,
    slq,
    smooth_density,
)
from dynlens.linalg.trace import TraceEstimate, hutch_plus_plus, hutchinson

__all__ = [
    "LanczosResult",
    "LinearOperator",
    "SpectralDensity",
    "TraceEstimate",
    "Tridiagonal",
    "default_generator",
    "device_generator",
    "dense_operator",
    "density_moments",
    "gauss_quadrature",
    "gaussian_vector",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos_eigsh",
    "lanczos_tridiagonal",
    "rademacher_vectors",
    "slq",
    "smooth_density",
]
