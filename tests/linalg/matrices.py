"""Explicit test matrices shared by the linalg tests (import as ``from matrices import ...``)."""

import torch


def matrix_with_spectrum(eigenvalues, seed=0, dtype=torch.float64):
    """A = Q diag(λ) Qᵀ with Q a random orthogonal matrix (float64, then cast)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return ((a + a.T) / 2).to(dtype)
