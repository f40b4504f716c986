"""The Hessian probe: sharpness, the top-k and bottom eigenvalues, trace and density over training,
against the stability threshold of the optimizer in use (the edge of stability). The measurement and
its thresholds are :mod:`dynlens.measures.stability`'s; the probe keeps the eigenvectors between
measurements (the warm start), runs the optional parts on their sub-schedules within the time
budget, and records.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal

from torch import Tensor

from dynlens.distributed import decide
from dynlens.functional import _tf32
from dynlens.measures.stability import (
    ACTIVATION_FACTOR,
    FIXED_VECTORS,
    MIN_ITERS_CAP,
    OPTIONAL_PARTS,
    PRECONDITIONED_VECTORS,
    Stability,
    StabilityOptions,
    hvp_chunk_size,
    stability_measurement,
    stability_threshold,
)
from dynlens.probes.base import TOP_EIGENVECTOR, Context, Occasional, Probe, Values

__all__ = ["Hessian", "stability_threshold", "hvp_chunk_size"]

# re-exported: the memory model's constants are read where the probe is documented
__all__ += ["ACTIVATION_FACTOR", "FIXED_VECTORS", "PRECONDITIONED_VECTORS", "MIN_ITERS_CAP", "WARM_PRODUCTS"]

# products of a warm-started λ_max run at the tracking tolerance (4–6 measured): the cost a
# measurement after a cold start is predicted at (Hessian.predicted_seconds)
WARM_PRODUCTS = 6


class Hessian(Probe):
    """Sharpness λ_max and the top-k eigenvalues at every measurement; λ_min, tr(H) and the
    spectral density on a sparser sub-schedule; all on the probe batch, against the stability
    threshold of the optimizer in use.

    Tracking (what makes it cheap enough to leave on): Lanczos starts from the previous
    measurement's top eigenvectors (``warm_start``; they are kept in host memory between
    measurements) and stops at the tracking tolerance ``tol=1e-2`` (relative residual; the
    eigenvalue's error is then about tol²·λ²/gap, far below 1%: measured in
    ``benchmarks/RESULTS.md``). λ_min, the trace and the density are taken every
    ``extras_every``-th measurement, and only when the Lens's time budget can afford them
    (:class:`~dynlens.probes.base.Occasional`; their cost is predicted from the seconds a product
    took in this measurement). Memory: under a Lens memory budget (``ctx.memory``) the products
    are summed over sub-batches of the probe batch (exact, :func:`hvp_chunk_size` chooses the
    size) and a Lanczos basis that does not fit the device stays in host memory.

    Args:
        every / at / schedule / mode: the schedule and mode (see :class:`Probe`).
        k: how many top eigenvalues (Lanczos, tolerance ``tol`` on the relative residual).
        lambda_min: also the smallest eigenvalue (a second Lanczos run, tolerance ``tol_min``).
        trace: also tr(H) by Hutch++ with ``trace_samples`` HVPs.
        density: also the SLQ density (``density_runs`` runs of ``density_iters`` steps),
            stored as the arrays ``density_nodes`` and ``density_weights``.
        tol, tol_min, max_iters: Lanczos settings (λ_min's run stops after ``max_iters`` or 50
            steps, converged or not). ``tol=1e-4`` gives eigenvalues to about 1e-7.
        extras_every: λ_min, trace and density at every this many measurements (the first
            included), when the time budget allows; 1 for every measurement.
        warm_start: start Lanczos from the previous measurement's eigenvectors (else from the
            gradient plus a Gaussian vector).
        hvp: Hessian-vector products by "reuse" (the first-order graph, ~2 gradients a product;
            needs no forward-mode derivatives and imports no compiler), "forward_over_reverse"
            or "auto" (time both once; see :func:`dynlens.hessian_eigenvalues`).
        chunk_size: examples per product pass: "auto" (the whole batch, or what fits the Lens's
            memory budget), or a number.
        precision: "float32" (default: TF32 off, as in every measurement) or "tf32": matrix
            products and convolutions on a GPU's TF32 tensor cores, faster at about 1e-3
            relative error per product (measured on λ_max in ``benchmarks/RESULTS.md``); no
            effect on the CPU.
        seed: seeds the start vectors and the trace's probe vectors.

    Records: ``sharpness``, ``lambda_2``..``lambda_k``, ``lambda_min``, ``threshold`` (the
    optimizer's), ``sharpness_ratio`` (λ_max/threshold; for Adam, and for SGD whose groups'
    learning rates differ, the preconditioned sharpness over it), ``preconditioned_sharpness``
    (λ_max(SH), module docstring), ``trace``, ``trace_stderr``, ``sgd_trace_ratio`` (η·tr(H)/2,
    SGD; η₀·tr(SH)/2 across groups), ``density_nodes``/``density_weights`` (arrays), ``hvps``
    (all products this measurement took), ``residual_max`` (largest relative residual of the
    top-k pairs), ``warm_start`` (1 when Lanczos started from the previous eigenvectors),
    ``eigenvector_overlap`` (|⟨v_prev, v⟩| of the top eigenvector with the previous one: how far
    the top direction turned) and ``chunk_size`` (examples per product pass).

    Cost per measurement: the top-k run's products (4–6 at ``tol=1e-2`` for k=1) plus one
    gradient, each product about 2 gradients on the probe batch (more when the memory budget
    splits the batch: each sub-batch's pass then runs alone); with the extras, about
    50 + trace_samples + density_runs·density_iters more. Adam (and SGD whose groups' rates
    differ) needs a second Lanczos run for the preconditioned sharpness. Measured in training
    steps on the reference jobs in ``benchmarks/RESULTS.md``.
    """

    name = "hessian"
    default_every: ClassVar[int] = 100
    pure: ClassVar[bool] = True

    def __init__(
        self,
        every: int | None = None,
        at: Any = None,
        schedule: Any = None,
        mode: Any = None,
        *,
        k: int = 1,
        lambda_min: bool = True,
        trace: bool = True,
        density: bool = False,
        tol: float = 1e-2,
        tol_min: float = 1e-2,
        max_iters: int | None = None,
        trace_samples: int = 30,
        density_runs: int = 4,
        density_iters: int = 60,
        extras_every: int = 10,
        warm_start: bool = True,
        hvp: Literal["reuse", "forward_over_reverse", "auto"] = "reuse",
        chunk_size: int | Literal["auto"] = "auto",
        precision: Literal["float32", "tf32"] = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(every=every, at=at, schedule=schedule, mode=mode)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if hvp not in ("reuse", "forward_over_reverse", "auto"):
            raise ValueError(f"hvp must be 'reuse', 'forward_over_reverse' or 'auto', got {hvp!r}")
        if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                     or chunk_size < 1):
            raise ValueError(f"chunk_size must be 'auto' or a positive number of examples, got {chunk_size!r}")
        if precision not in ("float32", "tf32"):
            raise ValueError(f"precision must be 'float32' or 'tf32', got {precision!r}")
        self.precision = precision
        self.k = k
        self.lambda_min = lambda_min
        self.trace = trace
        self.density = density
        self.tol = tol
        self.tol_min = tol_min
        self.max_iters = max_iters
        self.trace_samples = trace_samples
        self.density_runs = density_runs
        self.density_iters = density_iters
        self.extras_every = extras_every
        self.warm_start = warm_start
        self.hvp = hvp
        self.chunk_size = chunk_size
        self.seed = seed
        self._extras = {name: Occasional(extras_every) for name in OPTIONAL_PARTS}
        self._previous: dict[str, Tensor] = {}  # top eigenvectors by operator, on the host
        self._activation_bytes: int | None = None
        self._last: Stability | None = None  # the last measurement (its costs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k, "trace": self.trace, "density": self.density,
                "tol": self.tol, "extras_every": self.extras_every, "warm_start": self.warm_start,
                "hvp": self.hvp, "chunk_size": self.chunk_size, "precision": self.precision}

    def _options(self) -> StabilityOptions:
        return StabilityOptions(
            k=self.k, lambda_min=self.lambda_min, trace=self.trace, density=self.density, tol=self.tol,
            tol_min=self.tol_min, max_iters=self.max_iters, trace_samples=self.trace_samples,
            density_runs=self.density_runs, density_iters=self.density_iters, warm_start=self.warm_start,
            hvp=self.hvp, chunk_size=self.chunk_size, seed=self.seed)

    def predicted_seconds(self, last: float) -> float:
        """The next measurement's seconds without its optional parts (they run only when the
        allowance left holds them): the last one's seconds per product times the products of its
        compared run (λ_max, or the preconditioned λ_max), plus one for the gradient and the
        sub-batches' set-up. When that run started cold and the next starts warm, it is taken
        as ``WARM_PRODUCTS`` (a cold run took 8–11 products on the reference jobs, a warm one
        4–6: ``benchmarks/RESULTS.md``)."""
        if self._last is None or self._last.products == 0:
            return last
        base = self._last.compared_products
        if self.warm_start and self._last.compared_cold:
            base = min(base, WARM_PRODUCTS)
        return last * min(1.0, (base + 1) / (self._last.products + 1))

    def measure(self, ctx: Context) -> Values:
        tf32 = self.precision == "tf32"
        for part in self._extras.values():
            part.tick()
        allowance = ctx.allowance

        def gate(name: str, enabled: bool, predicted: float, spent: float) -> AbstractContextManager[Any] | None:
            part = self._extras[name]
            # under torch.distributed every rank takes rank 0's choice, so all run the same products
            wanted = decide(ctx.group, enabled and part.wanted(spent, allowance, predicted))
            return part.timed() if wanted else None

        with _tf32(tf32):
            if self._activation_bytes is None and self.chunk_size == "auto" and ctx.memory is not None:
                self._activation_bytes = ctx.fn.activation_bytes(1)
            result = stability_measurement(ctx.fn, ctx.optimizer, ctx.model, self._options(),
                                           self._previous, gate, ctx.memory, self._activation_bytes,
                                           check=None if ctx.deadline == math.inf else ctx.check_time)
        self._previous.update(result.vectors)
        if "hessian" in result.vectors:
            ctx.shared[TOP_EIGENVECTOR] = (ctx.step, result.vectors["hessian"][:, 0])
        self._last = result
        return result.values
