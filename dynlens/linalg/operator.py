"""Symmetric linear operators given by their matrix-vector product.

Every algorithm in :mod:`dynlens.linalg` takes a :class:`LinearOperator`: a symmetric map
R^n -> R^n known only through ``v -> A v`` (for instance a Hessian-vector product), acting
on flat 1-D tensors of one dtype on one device. The operator counts the products it
performs, so each algorithm can report its cost in matrix-vector products (for a Hessian:
Hessian-vector products).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(eq=False)
class LinearOperator:
    """A symmetric operator R^n -> R^n given by its matrix-vector product.

    Fields:
        matvec: ``v -> A v`` for ``v`` of shape ``(size,)``; returns shape ``(size,)``.
        size: the dimension n.
        dtype: the floating dtype of the vectors ``matvec`` takes and returns.
        device: the device those vectors live on.
        matmat: optional batched product ``V -> A V`` for ``V`` of shape ``(size, b)``,
            returning ``(size, b)``. When it is ``None``, :meth:`mm` loops over columns.
        matvecs: how many matrix-vector products this operator has performed so far
            (a call of ``matmat`` on ``b`` columns counts ``b``). Algorithms report the
            difference of this counter before and after they run.

    Call the operator through :meth:`mv` and :meth:`mm` (or ``op @ v``), never through the
    raw callables, so that the count stays right.
    """

    matvec: Callable[[Tensor], Tensor]
    size: int
    dtype: torch.dtype
    device: torch.device
    matmat: Callable[[Tensor], Tensor] | None = None
    matvecs: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.size < 1:
            raise ValueError(f"LinearOperator size must be a positive integer; got {self.size}.")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"LinearOperator dtype must be float32 or float64; got {self.dtype}. Half precision "
                "cannot keep a Krylov basis orthogonal (and has no QR on most devices): cast the "
                "vectors to float32 in matvec and back to the matrix's dtype inside it."
            )

    def mv(self, v: Tensor) -> Tensor:
        """Return ``A v`` for ``v`` of shape ``(size,)``; costs one matrix-vector product."""
        out = self.matvec(v)
        self.matvecs += 1
        if out.shape != (self.size,):
            raise ValueError(
                f"matvec returned shape {tuple(out.shape)}; a LinearOperator of size "
                f"{self.size} needs matvec to return a flat vector of shape ({self.size},)."
            )
        return out

    def mm(self, vectors: Tensor) -> Tensor:
        """Return ``A V`` for ``V`` of shape ``(size, b)``; costs ``b`` matrix-vector products.

        Uses ``matmat`` when given, otherwise ``b`` calls of ``matvec``.
        """
        count = vectors.shape[1]
        if self.matmat is None:
            return torch.stack([self.mv(vectors[:, i]) for i in range(count)], dim=1)
        out = self.matmat(vectors)
        self.matvecs += count
        if out.shape != (self.size, count):
            raise ValueError(
                f"matmat returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(vectors.shape)}; it must return ({self.size}, {count})."
            )
        return out

    def __matmul__(self, other: Tensor) -> Tensor:
        """``op @ v`` (1-D) is :meth:`mv`; ``op @ V`` (2-D) is :meth:`mm`."""
        return self.mv(other) if other.dim() == 1 else self.mm(other)


def dense_operator(matrix: Tensor) -> LinearOperator:
    """Wrap an explicit symmetric ``(n, n)`` matrix as a :class:`LinearOperator`.

    The operator has the matrix's dtype and device and a batched ``matmat``. Raises
    ``ValueError`` if the matrix is not square or not symmetric (to a relative tolerance of
    the square root of the dtype's machine epsilon).
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"dense_operator needs a square matrix; got shape {tuple(matrix.shape)}.")
    if not matrix.dtype.is_floating_point:
        raise ValueError(f"dense_operator needs a floating matrix; got dtype {matrix.dtype}.")
    asymmetry = (matrix - matrix.T).abs().max()
    scale = matrix.abs().max()
    if asymmetry > torch.finfo(matrix.dtype).eps ** 0.5 * scale:
        raise ValueError(
            f"dense_operator needs a symmetric matrix; max |A - A^T| = {float(asymmetry):.3g} "
            f"against max |A| = {float(scale):.3g}. Symmetrise it with (A + A.T) / 2."
        )
    return LinearOperator(
        matvec=lambda v: matrix @ v,
        size=matrix.shape[0],
        dtype=matrix.dtype,
        device=matrix.device,
        matmat=lambda v: matrix @ v,
    )


def rademacher_vectors(
    size: int,
    count: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """Return ``count`` independent Rademacher vectors (entries ±1) as a ``(size, count)`` matrix.

    Drawn from ``generator`` (never the global RNG) as int8, on the CPU for a CPU ``device``;
    for another device on that device, from a generator seeded by one draw of ``generator``
    (:func:`device_generator`: drawing 64 vectors of 11M entries on the host took seconds).
    Used by the trace estimators and by stochastic Lanczos quadrature; the same generator state
    gives the same vectors on every device of one type.
    """
    device = torch.device(device)
    draw = device_generator(generator, device)
    signs = torch.randint(0, 2, (size, count), generator=draw, dtype=torch.int8, device=draw.device)
    return (signs.to(device=device, dtype=dtype) * 2) - 1


def gaussian_vector(size: int, generator: torch.Generator, dtype: torch.dtype,
                    device: torch.device | str) -> Tensor:
    """A standard Gaussian vector of ``size`` entries in ``dtype`` on ``device``: drawn in float64
    on the CPU from ``generator`` for a CPU device, else on the device (see
    :func:`rademacher_vectors`; 11M float64 draws on the host took 0.28 s, a whole top-1 run's
    overhead on an H100)."""
    device = torch.device(device)
    draw = device_generator(generator, device)
    if draw.device.type == "cpu":
        return torch.randn(size, generator=draw, dtype=torch.float64).to(device=device, dtype=dtype)
    return torch.randn(size, generator=draw, dtype=dtype, device=device)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself for a CPU ``device``; otherwise a generator on ``device`` seeded with
    one 63-bit draw from ``generator`` (so the CPU generator's state still decides everything)."""
    if device.type == "cpu" or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def default_generator(generator: torch.Generator | None, seed: int = 0) -> torch.Generator:
    """Return ``generator``, or a fresh CPU generator seeded with ``seed`` when it is ``None``.

    The library never draws from the global RNG, so that measuring changes no RNG state.
    """
    if generator is not None:
        return generator
    return torch.Generator(device="cpu").manual_seed(seed)


def available_device_memory(device: torch.device) -> int:
    """Bytes of a CUDA device's memory a new allocation can take: the driver's free memory and
    what PyTorch's caching allocator holds unused (after a large computation it keeps tens of
    GB reserved; the driver counts them as used)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def available_host_memory() -> int:
    """Bytes of host memory a new allocation can take without pushing anything out: Linux's
    ``MemAvailable`` (free pages and the page cache the kernel can drop), else the free pages
    (``os.sysconf``); 0 where the system says neither."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
