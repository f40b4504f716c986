"""The Hessian probe: sharpness, the top-k and bottom eigenvalues, trace and density over training,
against the stability threshold of the optimizer in use (METRICS.md §1).

Thresholds, read from the optimizer's own hyperparameters (first parameter group) and state:

- SGD without momentum (gradient descent): λ_max against 2/η (Cohen et al. 2021);
- SGD with momentum β (heavy ball or Nesterov): λ_max against (2 + 2β)/η;
- Adam / AdamW: the preconditioned sharpness λ_max(P⁻¹H), P = (1 − β₁ᵗ)·diag(√v̂_t + ε) from
  the optimizer state, against (2 + 2β₁)/((1 − β₁)η) (Cohen et al. 2022);
- SGD, when the trace is measured: η·tr(H)/2, which must stay ≤ 1 at a minimum that is linearly
  stable for SGD (Wu & Su 2023).

Parameter groups with other learning rates than the first, and parameters the optimizer does
not hold, are accounted for by the step scales S of :func:`dynlens.measures.hessian.step_scales`
(η_g/η₀, times P⁻¹ for Adam; 0 where nothing moves): the compared sharpness is then λ_max(SH),
recorded as ``preconditioned_sharpness``, and SGD's trace ratio η₀·tr(SH)/2. Momentum and betas
are group 0's.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from dynlens.budget import MemoryBudgetTooSmall
from dynlens.functional import _attributes_set, flatten
from dynlens.linalg import LinearOperator, hutch_plus_plus, lanczos_eigsh, slq
from dynlens.measures.hessian import (
    curvature_operator,
    start_vector,
    step_scales,
    warm_start_vector,
)
from dynlens.probes.base import Context, Occasional, Probe, Values

__all__ = ["Hessian", "stability_threshold", "hvp_chunk_size"]

MIN_ITERS_CAP = 50
# products of a warm-started λ_max run at the tracking tolerance (4–6 measured): the cost a
# measurement after a cold start is predicted at (Hessian.predicted_seconds)
WARM_PRODUCTS = 6


def stability_threshold(optimizer: torch.optim.Optimizer | None) -> tuple[str, float] | None:
    """``(kind, threshold)`` for the optimizer's first parameter group, or None if unknown.

    kind is "gd" (2/η), "momentum" ((2+2β)/η), or "adam" ((2+2β₁)/((1−β₁)η), for the
    preconditioned sharpness).
    """
    if optimizer is None:
        return None
    group = optimizer.param_groups[0]
    lr = float(group.get("lr", float("nan")))
    if not lr > 0:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0) or 0.0)
        return ("momentum", (2 + 2 * beta) / lr) if beta > 0 else ("gd", 2 / lr)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        return "adam", (2 + 2 * beta1) / ((1 - beta1) * lr)
    return None


# The memory of a Hessian-vector product through a first-order graph built for it, measured on
# an H200 (benchmarks/results/explore_memory_h200.json): per example about 3.3 (ResNet-18) to
# 4.2 (GPT-2-sized decoder) times the activations a gradient saves, plus about 3 vectors of P.
# The probe also holds the running sum over sub-batches, the Lanczos vector and the gradient;
# a preconditioned operator (Adam) three more: S^{1/2}, and S^{1/2}v and H S^{1/2}v in flight
# (without them the decoder's measurement reached 6.96 GiB against an allowance of 5.4).
ACTIVATION_FACTOR = 4.5
FIXED_VECTORS = 6
PRECONDITIONED_VECTORS = 3


def hvp_chunk_size(num_params: int, itemsize: int, activation_bytes: int, examples: int,
                   memory: int | None, vectors: int = FIXED_VECTORS) -> tuple[int | None, int | None]:
    """``(chunk_size, basis_memory)``: the most examples per sub-batch whose Hessian-vector
    product fits ``memory`` bytes (None: the whole batch fits, or there is no limit), cut into
    sub-batches of equal size, and the bytes left for the Lanczos basis on the device.

    The model: a product over b examples takes ``vectors`` vectors of P entries plus
    ``ACTIVATION_FACTOR`` × b × ``activation_bytes`` (the activations a gradient of one example
    saves, :meth:`dynlens.functional.ModelFunction.activation_bytes`).

    Raises:
        MemoryBudgetTooSmall: not even one example's product fits.
    """
    if memory is None:
        return None, None
    fixed = vectors * num_params * itemsize
    per_example = ACTIVATION_FACTOR * max(activation_bytes, 1)
    fits = int((memory - fixed) // per_example)
    if fits < 1:
        raise MemoryBudgetTooSmall(
            f"a Hessian-vector product on one example needs about {_gib(fixed + per_example)} and "
            f"{_gib(max(memory, 0))} is allowed"
        )
    if fits >= examples:
        return None, int(memory - fixed - per_example * examples)
    pieces = -(-examples // fits)
    chunk = -(-examples // pieces)
    return chunk, int(memory - fixed - per_example * chunk)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


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
        self._extras = {name: Occasional(extras_every)
                        for name in ("sharpness", "lambda_min", "trace", "density")}
        self._previous: dict[str, Tensor] = {}  # top eigenvectors by operator, on the host
        self._activation_bytes: int | None = None
        # the last measurement's products, its compared run's, and whether that one started cold
        self._last_products = 0
        self._base_products = 0
        self._cold_base = False

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k, "trace": self.trace, "density": self.density,
                "tol": self.tol, "extras_every": self.extras_every, "warm_start": self.warm_start,
                "hvp": self.hvp, "chunk_size": self.chunk_size, "precision": self.precision}

    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed + offset)

    def _sizes(self, fn: Any, memory: int | None, preconditioned: bool) -> tuple[int | None, int | None]:
        if self.chunk_size != "auto":
            return self.chunk_size, None
        if memory is None:
            return None, None
        if self._activation_bytes is None:
            self._activation_bytes = fn.activation_bytes(1)
        itemsize = next(iter(fn.params.values())).element_size()
        vectors = FIXED_VECTORS + (PRECONDITIONED_VECTORS if preconditioned else 0)
        return hvp_chunk_size(fn.num_params, itemsize, self._activation_bytes, fn.size, memory, vectors)

    def _top(self, key: str, op: LinearOperator, gradient: Tensor | None, k: int,
             basis_memory: int | None, offset: int, values: dict[str, Any], compared: bool = False) -> Any:
        """The top-k run on ``op``, warm-started from the eigenvectors of the last measurement
        (else from the gradient and a Gaussian vector, or a Gaussian vector alone). ``compared``:
        the run the threshold is compared with, whose cost :meth:`predicted_seconds` reads."""
        generator = self._generator(offset)
        previous = self._previous.get(key) if self.warm_start else None
        if previous is not None and previous.shape[0] == op.size:
            v0 = warm_start_vector(op, previous, generator)
        else:
            previous = None
            v0 = None if gradient is None else start_vector(op, gradient, generator)
        result = lanczos_eigsh(op, k=k, which="top", tol=self.tol, max_iters=self.max_iters, v0=v0,
                               generator=generator, return_vectors=self.warm_start, memory=basis_memory)
        if compared:
            self._base_products, self._cold_base = result.matvecs, previous is None
        if self.warm_start and result.vectors is not None:
            vectors = result.vectors.detach().to("cpu", copy=True)
            if key == "hessian":
                values["warm_start"] = float(previous is not None)
                if previous is not None:
                    values["eigenvector_overlap"] = float(
                        (previous[:, 0].double() @ vectors[:, 0].double()).abs())
            self._previous[key] = vectors
        return result

    def predicted_seconds(self, last: float) -> float:
        """The next measurement's seconds without its optional parts (they run only when the
        allowance left holds them): the last one's seconds per product times the products of its
        compared run (λ_max, or the preconditioned λ_max), plus one for the gradient and the
        sub-batches' set-up. When that run started cold and the next starts warm, it is taken
        as ``WARM_PRODUCTS`` (a cold run took 8–11 products on the reference jobs, a warm one
        4–6: ``benchmarks/RESULTS.md``)."""
        if self._last_products == 0:
            return last
        base = self._base_products
        if self.warm_start and self._cold_base:
            base = min(base, WARM_PRODUCTS)
        return last * min(1.0, (base + 1) / (self._last_products + 1))

    def measure(self, ctx: Context) -> Values:
        tf32 = self.precision == "tf32"
        with _attributes_set([(torch.backends.cudnn, "allow_tf32", tf32),
                              (torch.backends.cuda.matmul, "allow_tf32", tf32)]):
            return self._measure(ctx)

    def _measure(self, ctx: Context) -> Values:
        began = time.perf_counter()
        fn = ctx.fn
        rule = stability_threshold(ctx.optimizer)
        scales = step_scales(ctx.optimizer, ctx.model, list(fn.params)) if rule is not None else None
        chunk, basis_memory = self._sizes(fn, ctx.memory, scales is not None)
        # under a memory limit, one column a product: a batched product of c columns holds c
        # times the activations (the trace's 16 columns took 45 GiB on the decoder)
        columns = 16 if ctx.memory is None else 1
        op, gradient = curvature_operator(fn, "hessian", self.hvp, None, max_columns=columns, chunk_size=chunk)
        k = min(self.k, op.size)
        values: dict[str, Any] = {"chunk_size": float(chunk or fn.size)}
        lr = float(ctx.optimizer.param_groups[0]["lr"]) if ctx.optimizer is not None else math.nan
        scaled = None  # S^{1/2} H S^{1/2}, S the optimizer's steps relative to group 0's (step_scales)
        if rule is not None:
            kind, threshold = rule
            values["threshold"] = threshold
            if scales is not None:
                # on the same first-order graph: no second graph is built
                root = flatten([scales[n] for n in fn.params]).to(op.device, op.dtype).sqrt()
                del scales
                scaled = LinearOperator(matvec=lambda v: root * op.matvec(root * v), size=op.size,
                                        dtype=op.dtype, device=op.device)
                pre = self._top("preconditioned", scaled, None, 1, basis_memory, 2, values, compared=True)
                values["preconditioned_sharpness"] = float(pre.values[0])
                values["sharpness_ratio"] = float(pre.values[0]) / threshold
        allowance = ctx.allowance

        def products() -> int:
            # scaled's matvec calls op's function directly: its products are not in op.matvecs
            return op.matvecs + (scaled.matvecs if scaled is not None else 0)

        def per_product() -> float:
            return (time.perf_counter() - began) / max(products(), 1)

        def wanted(name: str, enabled: bool, products: int) -> bool:
            part = self._extras[name]
            part.tick()
            return enabled and part.wanted(time.perf_counter() - began, allowance, per_product() * products)

        # λ_max of H itself: where the compared sharpness is the preconditioned one (Adam, or
        # groups with other rates), it is an optional part like λ_min; otherwise it is the measurement
        if scaled is None or wanted("sharpness", True, 2 * k + 4):
            with self._extras["sharpness"].timed() if scaled is not None else contextlib.nullcontext():
                top = self._top("hessian", op, gradient, k, basis_memory, 0, values, compared=scaled is None)
            values["sharpness"] = float(top.values[0])
            for i in range(1, k):
                values[f"lambda_{i + 1}"] = float(top.values[i])
            relative = top.residuals / top.values.abs().clamp_min(1e-300)
            values["residual_max"] = float(relative.max())
            if scaled is None and rule is not None and rule[0] != "adam":
                values["sharpness_ratio"] = values["sharpness"] / rule[1]
        del gradient
        if wanted("lambda_min", self.lambda_min, self.max_iters or MIN_ITERS_CAP):
            # the bottom of the spectrum sits next to the dense bulk near 0 and converges slowly;
            # a capped run gives an upper bound on λ_min that is good enough to spot a saddle
            with self._extras["lambda_min"].timed():
                bottom = lanczos_eigsh(op, k=1, which="bottom", tol=self.tol_min,
                                       max_iters=self.max_iters or MIN_ITERS_CAP,
                                       generator=self._generator(1), memory=basis_memory)
            values["lambda_min"] = float(bottom.values[0])
        if wanted("trace", self.trace, self.trace_samples * (2 if scaled is not None else 1)):
            with self._extras["trace"].timed():
                estimate = hutch_plus_plus(op, samples=self.trace_samples, generator=self._generator(3))
                if isinstance(ctx.optimizer, torch.optim.SGD):
                    # η₀·tr(SH)/2: with one learning rate tr(H) itself, else a trace of its own
                    weighted = estimate if scaled is None else hutch_plus_plus(
                        scaled, samples=self.trace_samples, generator=self._generator(3))
                    values["sgd_trace_ratio"] = lr * weighted.value / 2
            values["trace"] = estimate.value
            values["trace_stderr"] = estimate.stderr
        if wanted("density", self.density, self.density_runs * self.density_iters):
            with self._extras["density"].timed():
                density = slq(op, runs=self.density_runs, iters=min(self.density_iters, op.size),
                              generator=self._generator(4))
            values["density_nodes"] = density.nodes.numpy().astype(np.float64)
            values["density_weights"] = density.weights.numpy().astype(np.float64)
        values["hvps"] = float(products())
        self._last_products = products()
        return values
