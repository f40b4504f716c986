"""Lanczos with full reorthogonalisation: extreme eigenpairs of a symmetric operator.

The Lanczos process (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, §10.1) builds an
orthonormal basis V_m = [q_1 .. q_m] of the Krylov space span{q_1, A q_1, .., A^{m-1} q_1} in
which A is tridiagonal, T_m = V_mᵀ A V_m (diagonal α, off-diagonal β). The eigenvalues θ of
T_m (Ritz values) approximate the extreme eigenvalues of A. Each step costs one
matrix-vector product. Every new vector is orthogonalised against *all* stored basis vectors
by classical Gram-Schmidt done twice (one matmul each way per pass), which keeps V_m
orthonormal to working precision and so avoids the spurious copies of converged eigenvalues
that plain Lanczos produces. The tridiagonal eigenproblem is solved on the CPU in float64
(``scipy.linalg.eigh_tridiagonal``). The basis has the operator's dtype and lives on the
operator's device, or, when :func:`lanczos_eigsh` is given a ``memory`` limit it would break, in
host memory: the products still run on the operator's device, one vector travelling each way a
step, and the reorthogonalisation too, the basis copied to the device block by block
(:func:`_streamed_gram_schmidt`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from dynlens.linalg.operator import (
    LinearOperator,
    available_host_memory,
    default_generator,
    gaussian_vector,
)

Which = Literal["top", "bottom", "both"]


@dataclass(frozen=True)
class Tridiagonal:
    """The Lanczos tridiagonal matrix T = Vᵀ A V of one run.

    Fields:
        alpha: float64 CPU tensor (m,), the diagonal α_j = q_jᵀ A q_j.
        beta: float64 CPU tensor (m-1,), the off-diagonal β_j = ‖w_j‖; an entry 0 marks a
            restart after breakdown (T is then block diagonal).
    """

    alpha: Tensor
    beta: Tensor

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending, float64) and the eigenvectors of T as columns."""
        return eigh_tridiagonal(self.alpha.numpy(), self.beta.numpy())


@dataclass(frozen=True)
class LanczosResult:
    """Extreme eigenpairs of a symmetric operator found by :func:`lanczos_eigsh`.

    Fields:
        values: float64 CPU tensor of Ritz values. ``which="top"``: the k largest,
            descending. ``which="bottom"``: the k smallest, ascending (most negative first).
            ``which="both"``: the 2k values ``[top k descending, bottom k ascending]``; use
            :attr:`top` and :attr:`bottom` for the two halves (they overlap when 2k > n).
        residuals: float64 CPU tensor, same layout as ``values``: the estimate of
            ‖A v − θ v‖₂ for each unit Ritz vector v, Σ_b |β_b s_b| over the ends b of the
            Krylov blocks (|β_m s_m| when there was no restart), s the eigenvector of T.
        vectors: ``(n, len(values))`` unit Ritz vectors on the operator's device and dtype,
            columns in the order of ``values``; ``None`` unless ``return_vectors=True``.
        which: the ``which`` that was asked for.
        matvecs: matrix-vector products used (equals ``iterations``: restarts cost none).
        iterations: Lanczos steps m taken, i.e. the Krylov dimension.
        restarts: how many times the process restarted after a breakdown (β ≈ 0).
        converged: every wanted pair passed the residual test (see :func:`lanczos_eigsh`),
            or the basis spans the whole space (m = n, the result is exact to rounding).
        ritz_values: all m Ritz values, ascending, float64 CPU tensor.
        tridiagonal: the tridiagonal matrix T_m (α, β).
        elapsed: wall-clock seconds.
        basis_device: where the Lanczos basis ended up, as ``str(torch.device)``: the
            operator's device, or ``"cpu"`` when it did not fit :func:`lanczos_eigsh`'s
            ``memory`` (always ``"cpu"`` for a CPU operator); ``""`` if not recorded.
    """

    values: Tensor
    residuals: Tensor
    vectors: Tensor | None
    which: str
    matvecs: int
    iterations: int
    restarts: int
    converged: bool
    ritz_values: Tensor
    tridiagonal: Tridiagonal
    elapsed: float
    basis_device: str = ""

    @property
    def top(self) -> Tensor:
        """The largest Ritz values, descending (empty for ``which="bottom"``)."""
        if self.which == "top":
            return self.values
        if self.which == "both":
            return self.values[: len(self.values) // 2]
        return self.values[:0]

    @property
    def bottom(self) -> Tensor:
        """The smallest Ritz values, ascending (empty for ``which="top"``)."""
        if self.which == "bottom":
            return self.values
        if self.which == "both":
            return self.values[len(self.values) // 2 :]
        return self.values[:0]


def _lanczos_step(
    op: LinearOperator, basis: Tensor, j: int, active: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One Lanczos step for b independent runs at once; the only Lanczos step in dynlens.

    ``basis`` is ``(b, capacity, n)``: rows ``0..j`` of run l hold its orthonormal basis and
    row ``j`` its current vector q_j. Computes w = A q_j (one ``mm`` on the active runs'
    columns), then orthogonalises w against all j+1 basis vectors of its own run by
    classical Gram-Schmidt twice, c = Q w, w ← w − Qᵀ c (this includes the α q_j and
    β q_{j−1} terms of the three-term recurrence). Returns α (b,) = q_jᵀ A q_j as the sum of
    the two passes' coefficients on q_j and β (b,) = ‖w‖ on the basis's device, and w (b, n) on
    the operator's (the same device, unless the basis is in host memory).
    Inactive runs (``active[l]`` false, ``active`` on the operator's device) must have a zero
    current vector; they cost no product.

    A basis in host memory for an operator on another device (:class:`_HostRows`, one run):
    q_j then travels to the operator's device for the product, and the reorthogonalisation
    runs there too, the basis copied over in pieces (:func:`_streamed_gram_schmidt`); w stays
    on the operator's device (the caller divides it there and copies the quotient into the
    pinned row: a copy to pageable memory and a division on one CPU thread cost more than the
    product), α and β come back on the host.
    """
    if isinstance(basis, _HostRows):
        product = op.mv(basis.rows[j].to(op.device, non_blocking=True)).unsqueeze(0)
        alpha, w = _streamed_gram_schmidt(basis.rows[: j + 1], product, j)
        return alpha.cpu(), torch.linalg.vector_norm(w, dim=1).cpu(), w
    current = basis[:, j].to(op.device, non_blocking=True)
    if active is None:
        product = op.mv(current[0]).unsqueeze(0) if current.shape[0] == 1 else op.mm(current.T).T
    else:
        product = torch.zeros_like(current)
        index = active.nonzero().squeeze(1)
        product[index] = op.mm(current[index].T).T
    krylov = basis[:, : j + 1]
    w = product
    alpha = torch.zeros(basis.shape[0], dtype=basis.dtype, device=basis.device)
    for _ in range(2):
        coefficients = torch.bmm(krylov, w.unsqueeze(-1))
        w = w - torch.bmm(krylov.transpose(1, 2), coefficients).squeeze(-1)
        alpha = alpha + coefficients[:, j, 0]
    return alpha, torch.linalg.vector_norm(w, dim=1), w


# bytes of a host basis's block copied to the operator's device at a time (_streamed_gram_schmidt)
STREAM_BLOCK_BYTES = 64 * 2**20


def _streamed_gram_schmidt(krylov: list[Tensor], w: Tensor, j: int,
                           block_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """The two classical Gram-Schmidt passes of :func:`_lanczos_step` for a basis ``krylov``
    (its j+1 rows, each a vector (n,) in host memory) and a product ``w`` (1, n) on the
    operator's device, reading the
    basis three times instead of four. The basis is copied to the device a piece of columns at a
    time, every row's part of the piece together (about ``block_bytes`` in all, by default
    ``STREAM_BLOCK_BYTES``, and never more than the basis itself; pinned memory:
    asynchronous copies), and the arithmetic runs there:

    1. c₁ = Q w, piece by piece;
    2. for each piece p, w₁ₚ = wₚ − Qₚᵀ c₁ and, with the same piece still on the device,
       c₂ += Qₚ w₁ₚ (the second pass's coefficients, Q w₁, need w₁ only piece by piece);
    3. w₂ = w₁ − Qᵀ c₂.

    Returns α (1,) = the two passes' coefficients on q_j, and w₂, on w's device.

    Reorthogonalising in host memory instead ran on one CPU thread under ``torchrun`` (which
    sets ``OMP_NUM_THREADS=1``): for the 124M decoder under DDP a Hessian measurement of 16
    products took 87 s. The copies bound its speed (the device's arithmetic on a piece is a
    hundredth of its copy): reading the basis three times is a quarter less than the plain
    passes' four. Only one piece is added to the device's memory."""
    rows, n = len(krylov), krylov[0].shape[0]
    block_bytes = STREAM_BLOCK_BYTES if block_bytes is None else block_bytes
    width = min(n, max(1, block_bytes // (krylov[0].element_size() * rows)))
    pieces = [(start, min(n, start + width)) for start in range(0, n, width)]
    buffer = torch.empty(rows, width, dtype=krylov[0].dtype, device=w.device)
    w = w.clone()

    def piece(start: int, stop: int) -> Tensor:
        part = buffer[:, : stop - start]
        for i in range(rows):
            part[i].copy_(krylov[i][start:stop], non_blocking=True)
        return part

    first = torch.zeros(rows, dtype=w.dtype, device=w.device)
    for start, stop in pieces:
        first += piece(start, stop) @ w[0, start:stop]
    second = torch.zeros_like(first)
    for start, stop in pieces:
        part = piece(start, stop)
        w[0, start:stop].sub_(first @ part)
        second += part @ w[0, start:stop]
    for start, stop in pieces:
        w[0, start:stop].sub_(second @ piece(start, stop))
    return (first[j] + second[j]).unsqueeze(0), w


def _breakdown_threshold(dtype: torch.dtype) -> float:
    """β below this times ‖T‖ means the Krylov space is invariant to working precision."""
    return torch.finfo(dtype).eps ** 0.75


def lanczos_tridiagonal(op: LinearOperator, v0: Tensor, iters: int) -> list[Tridiagonal]:
    """Run ``iters`` Lanczos steps (full reorthogonalisation, no restarts) from each start vector.

    ``v0`` is ``(n,)`` or ``(n, b)``: b independent runs, each started from its column
    (normalised here), carried in lockstep with one ``op.mm`` of the still-active columns per
    step, each orthogonalised only against its own basis. A run stops early when it breaks
    down (β ≈ 0: its Krylov space is invariant, and T is then exact for that start vector).
    Memory: b·iters vectors of size n on the operator's device.

    Cost: at most b·iters matrix-vector products. Returns one :class:`Tridiagonal` per run,
    of size m_l ≤ iters. This is the building block of stochastic Lanczos quadrature.
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1; got {iters}.")
    starts = v0.reshape(op.size, -1).T.to(device=op.device, dtype=op.dtype)
    runs = starts.shape[0]
    norms = torch.linalg.vector_norm(starts, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(
            "lanczos_tridiagonal got a zero start vector; start vectors must be nonzero."
        )
    basis = torch.zeros(runs, iters, op.size, dtype=op.dtype, device=op.device)
    basis[:, 0] = starts / norms
    active = torch.ones(runs, dtype=torch.bool)
    alphas: list[list[float]] = [[] for _ in range(runs)]
    betas: list[list[float]] = [[] for _ in range(runs)]
    scale = np.zeros(runs)
    threshold = _breakdown_threshold(op.dtype)
    for j in range(iters):
        alpha, beta, w = _lanczos_step(op, basis, j, active.to(op.device))
        alpha_cpu = alpha.double().cpu().numpy()
        beta_cpu = beta.double().cpu().numpy()
        for run in active.nonzero().squeeze(1).tolist():
            alphas[run].append(alpha_cpu[run])
            scale[run] = max(scale[run], abs(alpha_cpu[run]), beta_cpu[run])
        if j == iters - 1:
            break
        for run in active.nonzero().squeeze(1).tolist():
            if beta_cpu[run] <= threshold * scale[run]:
                active[run] = False
            else:
                betas[run].append(beta_cpu[run])
                basis[run, j + 1] = w[run] / beta[run]
        if not bool(active.any()):
            break
    return [
        Tridiagonal(
            alpha=torch.tensor(a, dtype=torch.float64),
            beta=torch.tensor(b, dtype=torch.float64),
        )
        for a, b in zip(alphas, betas, strict=True)
    ]


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending ``theta`` of the wanted Ritz values, in the result's layout."""
    count = min(k, len(theta))
    top = np.arange(len(theta) - 1, len(theta) - 1 - count, -1)
    bottom = np.arange(count)
    if which == "top":
        return top
    if which == "bottom":
        return bottom
    return np.concatenate([top, bottom])


def _restart_vector(
    basis: Tensor | _HostRows, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """A random unit vector orthogonal to ``basis[0, :m]``, or ``None`` if it spans the space.

    Drawn on ``device`` (the operator's), so that the draws do not depend on where the basis is.
    """
    for _ in range(3):
        if isinstance(basis, _HostRows):  # orthogonalised on ``device``, the basis streamed there
            v = gaussian_vector(basis.size, generator, dtype, device)
            start = torch.linalg.vector_norm(v)
            v = _streamed_gram_schmidt(basis.rows[:m], v.unsqueeze(0), 0)[1][0]
        else:
            krylov = basis[0, :m]
            v = gaussian_vector(basis.shape[2], generator, dtype, device).to(basis.device)
            start = torch.linalg.vector_norm(v)
            for _ in range(2):
                v = v - krylov.T @ (krylov @ v)
        norm = torch.linalg.vector_norm(v)
        if norm > math.sqrt(torch.finfo(dtype).eps) * start:
            return v / norm
    return None


# A basis of at most this many bytes is allocated at the old fixed capacity (32 vectors or
# 2·min_iters): growing it by doubling costs copies that are noticeable on small operators.
_SMALL_BASIS_BYTES = 64 * 2**20


class _HostRows:
    """A Lanczos basis in host memory for an operator on another device (a GPU): one vector a
    row, each allocated when the basis reaches it, in pinned memory (pinned copies to the GPU ran
    at 50 GB/s on an H200's host, pageable ones at 6-7). Pinning is slow (0.5-0.7 s a GB there;
    PyTorch's host allocator then keeps the blocks for later allocations of the same size), so a
    basis that grows pins only its new rows: one tensor for the whole basis pinned all of it
    again at each doubling and copied the old rows over (for the 124M decoder, 2 GB and then
    4 GB at the first measurement's third and fifth steps, 1.2 s and 2.5 s of pinning).

    ``capacity`` is how many rows it may hold now; ``limit`` the most it may ever hold (the
    host's room when it was made, :func:`_host_rows`, read by the caller, or None where the
    system does not say); ``shape`` and ``device`` read as those of the one-tensor basis it
    stands for."""

    def __init__(self, capacity: int, op: LinearOperator, limit: int | None) -> None:
        self.limit = limit
        self.capacity = capacity if limit is None else min(capacity, limit)
        self.size, self.dtype = op.size, op.dtype
        self.pin = op.device.type == "cuda" and torch.cuda.is_available()
        self.rows: list[Tensor] = []
        self.device = torch.device("cpu")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.capacity, self.size)

    def put(self, j: int, vector: Tensor) -> None:
        """Row ``j`` (the next one, or one already there) set to ``vector``."""
        if j == len(self.rows):
            self.rows.append(torch.empty(self.size, dtype=self.dtype, pin_memory=self.pin))
        self.rows[j].copy_(vector)


def _use_host_rows(op: LinearOperator) -> bool:
    """Whether a basis in host memory is :class:`_HostRows` (an operator on a GPU) rather than
    one tensor on the CPU, the operator's own device. A module-level function so that tests run
    the rows' path with a CPU operator too."""
    return op.device.type != "cpu"


def _empty_basis(capacity: int, op: LinearOperator, device: torch.device,
                 room: int | None = None) -> Tensor | _HostRows:
    """An empty basis of ``capacity`` vectors on ``device``: an uninitialised ``(1, capacity, n)``
    tensor, or :class:`_HostRows` when ``device`` is host memory standing in for the operator's
    (``room``: the rows the host has room for, :func:`_host_rows`, its limit)."""
    if device.type == "cpu" and _use_host_rows(op):
        return _HostRows(capacity, op, room)
    return torch.empty(1, capacity, op.size, dtype=op.dtype, device=device)


def _put(basis: Tensor | _HostRows, j: int, vector: Tensor) -> None:
    """Basis vector ``j`` set to ``vector``."""
    if isinstance(basis, _HostRows):
        basis.put(j, vector)
    else:
        basis[0, j] = vector


def _combination(basis: Tensor | _HostRows, m: int, coefficients: Tensor, device: torch.device) -> Tensor:
    """Σ_i basis_i coefficients_i (n × w) of the first ``m`` vectors, on ``device``; from host
    rows a row at a time on ``device`` (one row's copy there, never the basis in one piece)."""
    if not isinstance(basis, _HostRows):
        return (basis[0, :m].T @ coefficients.to(basis.device)).to(device)
    coefficients = coefficients.to(device)
    out = torch.zeros(basis.size, coefficients.shape[1], dtype=basis.dtype, device=device)
    for i in range(m):
        out.addr_(basis.rows[i].to(device, non_blocking=True), coefficients[i])
    return out


# The largest share of the host's available memory a basis in host memory may take (its growth
# counted while the old and the new basis are both alive): a 644M-parameter model's basis of 100
# vectors is 258 GB, and two such measurements on one host had the kernel kill both processes.
_HOST_SHARE = 0.5


def _host_rows(vector_bytes: int) -> int | None:
    """How many more basis vectors host memory can take now (``_HOST_SHARE`` of what is
    available), or None where the system does not say."""
    available = available_host_memory()
    return int(available * _HOST_SHARE) // vector_bytes if available else None


def _grown_basis(basis: Tensor | _HostRows, m: int, capacity: int, op: LinearOperator,
                 memory: int | None) -> Tensor | _HostRows | None:
    """``basis`` (full at m rows) copied into one of ``capacity`` rows: on the operator's device
    while the old and the new basis together (both alive during the copy) fit ``memory``,
    otherwise in host memory, where it then stays, with at most the rows that
    :func:`_host_rows` allows; None when that is no more than ``m`` (the basis cannot grow).
    Host rows (:class:`_HostRows`) grow in place: only their capacity changes."""
    if isinstance(basis, _HostRows):
        # its rows are counted against the host's room when it was made (its limit)
        capacity = capacity if basis.limit is None else min(capacity, basis.limit)
        if capacity <= m:
            return None
        basis.capacity = capacity
        return basis
    vector_bytes = op.size * op.dtype.itemsize
    fits = memory is None or (m + capacity) * vector_bytes <= memory
    device = op.device if basis.device.type == op.device.type and fits else torch.device("cpu")
    room = None
    if device.type == "cpu":
        room = _host_rows(vector_bytes)
        if room is not None:
            capacity = min(capacity, room)
            if capacity <= m:
                return None
    grown = _empty_basis(capacity, op, device, room)
    if isinstance(grown, _HostRows):
        for i in range(m):
            grown.put(i, basis[0, i])
    else:
        grown[:, :m] = basis
    return grown


def lanczos_eigsh(
    op: LinearOperator,
    k: int = 1,
    which: Which = "top",
    tol: float = 1e-4,
    max_iters: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_vectors: bool = False,
    memory: int | None = None,
) -> LanczosResult:
    """The k extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    ``which="top"``: the k largest (algebraic); ``"bottom"``: the k smallest (most
    negative); ``"both"``: both sets (layout in :class:`LanczosResult`).

    Stopping rule: after every step m (the tridiagonal solve is tiny), each wanted Ritz pair
    (θ_i, s_i) must satisfy the residual test Σ_b |β_b s_{b,i}| ≤ tol · max(|θ_i|, ε) (the
    left side estimates ‖A v_i − θ_i v_i‖; ε = √eps(dtype) · max|θ| keeps eigenvalues near
    zero from needing a residual below the rounding level). Safeguards against stopping on a
    Krylov space that is too small to hold every wanted eigenvalue: no stop before
    m ≥ min(n, w + max(w, 3)) steps (a Krylov space of at least 2w + 1 dimensions, as ARPACK
    asks for, and 4 for one eigenvalue), w = k (2k for ``"both"``), and the current Krylov
    block must have run that long too or have broken down. The floor was w + max(w, 5): for the
    top eigenvalue of a trained ResNet-18 from the gradient start, the residual test passes at
    step 5 at ``tol=1e-2`` with an error of 1e-5, and the floor of 6 held it one product longer
    (``benchmarks/RESULTS.md``).

    Breakdown: when β_m ≤ eps(dtype)^{3/4} · ‖T‖ the Krylov space is invariant. The process
    then restarts from a random vector orthogonal to the basis (T gets a zero off-diagonal
    and becomes block diagonal), and stops after a later block breaks down without changing
    the wanted values. A Krylov space from one start vector holds at most one direction of
    each eigenspace, so repeated eigenvalues are found with their multiplicity only through
    such restarts, i.e. when the Krylov spaces become invariant (few distinct eigenvalues,
    or k close to n); in large problems without breakdown, a repeated eigenvalue appears
    once. When m reaches n the basis spans the space and the whole spectrum is exact.

    Args:
        op: the symmetric operator.
        k: how many eigenvalues of each wanted end; 1 ≤ k ≤ n.
        which: ``"top"``, ``"bottom"`` or ``"both"``.
        tol: relative residual tolerance (0 runs to ``max_iters``).
        max_iters: most Lanczos steps (= matrix-vector products); default
            min(n, max(100, 4w + 20)). Must be at least k. If it is reached first, the
            result has ``converged=False`` (no exception).
        v0: start vector (n,); default a Gaussian vector from ``generator`` (drawn on the
            operator's device when that is not the CPU, see :func:`gaussian_vector`).
        generator: CPU ``torch.Generator`` for the start and restart vectors; default a fresh
            one seeded with 0. The global RNG is never used.
        return_vectors: also return the Ritz vectors (n × len(values), on the op's device:
            len(values) more vectors there, also when the basis was kept in host memory).
        memory: bytes the basis may take on the operator's device (None: no limit). With
            f = min(n, w + max(w, 3)) the fewest steps a run takes (above), the basis starts
            at max(2f, 32) vectors when those take at most 64 MiB, else at f + 2, fewer if
            ``memory`` holds fewer, and doubles when full (up to ``max_iters``). A basis that
            would not fit, counting the moment of growth when the old and the new one are both
            alive, is kept in host memory instead (``memory=0``: from the start). For an
            operator on a GPU it is then one pinned vector a row, each pinned when the basis
            reaches it (:class:`_HostRows`), and each step copies the current vector to the
            device and the next one back, and streams the basis to the device in pieces for the
            reorthogonalisation, reading it three times (:func:`_streamed_gram_schmidt`; bound
            by the copies, 50 GB/s on an H200's host). :attr:`LanczosResult.basis_device` says
            where the basis ended up. A basis in host memory (also a CPU operator's) takes at
            most half of the host's available memory (for host rows: of what was available
            when the basis moved there): when it cannot grow further the iteration stops there
            as at ``max_iters`` (``converged=False``); when not even k + 1 vectors fit,
            ``MemoryError``.

    Cost: ``iterations`` matrix-vector products (≤ max_iters); memory for the basis (at
    least ``iterations`` vectors of size n, at most twice that while it grows: on the
    operator's device within ``memory``, else in host memory) and a few more vectors of size
    n on the operator's device for the product and the current vector.

    Returns:
        :class:`LanczosResult`.
    """
    start_time = time.perf_counter()
    n = op.size
    if which not in ("top", "bottom", "both"):
        raise ValueError(f"which must be 'top', 'bottom' or 'both'; got {which!r}.")
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    if k > n:
        raise ValueError(
            f"k={k} eigenvalues were asked of an operator of size n={n}; "
            f"k must be at most n (k=n gives the whole spectrum)."
        )
    if tol < 0:
        raise ValueError(f"tol must be nonnegative; got {tol}.")
    if memory is not None and memory < 0:
        raise ValueError(f"memory must be a nonnegative number of bytes or None; got {memory}.")
    wanted_count = min(n, 2 * k) if which == "both" else k
    if max_iters is None:
        max_iters = max(100, 4 * wanted_count + 20)
    max_iters = min(max_iters, n)
    if max_iters < k:
        raise ValueError(
            f"max_iters={max_iters} is smaller than k={k}; Lanczos needs at least k steps "
            f"to produce k Ritz values."
        )
    min_iters = min(n, wanted_count + max(wanted_count, 3))
    generator = default_generator(generator)
    eps = torch.finfo(op.dtype).eps
    threshold = _breakdown_threshold(op.dtype)
    matvecs_before = op.matvecs

    if v0 is None:
        q = gaussian_vector(n, generator, op.dtype, op.device)
    else:
        if v0.shape != (n,):
            raise ValueError(f"v0 must have shape ({n},); got {tuple(v0.shape)}.")
        q = v0
    q = q.to(device=op.device, dtype=op.dtype)
    q_norm = torch.linalg.vector_norm(q)
    if q_norm == 0:
        raise ValueError("v0 is the zero vector; pass a nonzero start vector or none.")

    vector_bytes = n * op.dtype.itemsize
    capacity = min(max_iters, max(2 * min_iters, 32))
    if capacity * vector_bytes > _SMALL_BASIS_BYTES:
        capacity = min(max_iters, min_iters + 2)
    on_device = True
    if memory is not None and capacity * vector_bytes > memory:
        on_device = memory >= vector_bytes  # then start with as many vectors as fit
        capacity = memory // vector_bytes if on_device else capacity
    room = None
    if not on_device or op.device.type == "cpu":
        room = _host_rows(vector_bytes)
        if room is not None and room < capacity:
            if room < k + 1:
                raise MemoryError(
                    f"a Lanczos basis of {k + 1} vectors of {n:,} numbers ({(k + 1) * vector_bytes:,} bytes) "
                    f"does not fit in half of the host's available memory ({2 * room * vector_bytes:,} "
                    f"bytes available); ask for fewer eigenvalues, measure fewer parameters, or allow "
                    f"the basis more device memory (memory=)")
            capacity = room
    basis = _empty_basis(capacity, op, op.device if on_device else torch.device("cpu"), room)
    _put(basis, 0, q / q_norm)
    alphas: list[float] = []
    betas: list[float] = []
    block_ends: list[tuple[int, float]] = []
    block_start = 0
    values_at_block_start: np.ndarray | None = None
    scale = 0.0
    converged = False
    while True:
        j = len(alphas)
        alpha, beta, w = _lanczos_step(op, basis, j)
        alphas.append(float(alpha[0]))
        beta_j = float(beta[0])
        m = j + 1
        scale = max(scale, abs(alphas[-1]), beta_j)
        theta, vectors_t = eigh_tridiagonal(np.array(alphas), np.array(betas))
        index = _wanted(theta, k, which)
        residuals = np.zeros(len(index))
        for end, beta_end in [*block_ends, (m - 1, beta_j)]:
            residuals += np.abs(beta_end * vectors_t[end, index])
        floor = math.sqrt(eps) * np.abs(theta).max()
        small = bool(np.all(residuals <= tol * np.maximum(np.abs(theta[index]), floor)))
        broke = beta_j <= threshold * scale
        if m == n:
            converged = True
            break
        if broke:
            settled = (
                values_at_block_start is not None
                and len(values_at_block_start) == len(index)
                and bool(
                    np.all(
                        np.abs(theta[index] - values_at_block_start)
                        <= tol * np.maximum(np.abs(theta[index]), floor)
                    )
                )
            )
        else:
            settled = m - block_start >= min_iters
        if small and settled and m >= min_iters:
            converged = True
            break
        if m >= max_iters:
            break
        if broke:
            q = _restart_vector(basis, m, generator, op.dtype, op.device)
            if q is None:
                converged = small
                break
            block_ends.append((m - 1, beta_j))
            betas.append(0.0)
            block_start = m
            values_at_block_start = theta[index]
        else:
            betas.append(beta_j)
            q = w[0] / beta[0]
        if m == basis.shape[1]:
            grown = _grown_basis(basis, m, min(2 * m, max_iters), op, memory)
            if grown is None:
                break  # host memory holds no more vectors: stopped as at max_iters
            basis = grown
        _put(basis, m, q)

    ritz_vectors = None
    if return_vectors:
        selected = torch.from_numpy(np.ascontiguousarray(vectors_t[:, index])).to(dtype=op.dtype)
        ritz_vectors = _combination(basis, m, selected, op.device)
    return LanczosResult(
        values=torch.from_numpy(theta[index].copy()),
        residuals=torch.from_numpy(residuals),
        vectors=ritz_vectors,
        which=which,
        matvecs=op.matvecs - matvecs_before,
        iterations=m,
        restarts=len(block_ends),
        converged=converged,
        ritz_values=torch.from_numpy(theta),
        tridiagonal=Tridiagonal(
            alpha=torch.tensor(alphas, dtype=torch.float64),
            beta=torch.tensor(betas, dtype=torch.float64),
        ),
        elapsed=time.perf_counter() - start_time,
        basis_device=str(basis.device),
    )
