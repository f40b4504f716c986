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

import math
from typing import Any, ClassVar

import numpy as np
import torch

from dynlens.functional import flatten
from dynlens.linalg import LinearOperator, hutch_plus_plus, lanczos_eigsh, slq
from dynlens.measures.hessian import curvature_operator, start_vector, step_scales
from dynlens.probes.base import Context, Probe, Values

__all__ = ["Hessian", "stability_threshold"]

MIN_ITERS_CAP = 50


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


class Hessian(Probe):
    """λ_max (``sharpness``), λ_2..λ_k, λ_min, tr(H) and the spectral density on the probe batch.

    Args:
        every / at / schedule / mode: the schedule and mode (see :class:`Probe`).
        k: how many top eigenvalues (Lanczos, tolerance ``tol`` on the relative residual).
        lambda_min: also the smallest eigenvalue (a second Lanczos run, tolerance ``tol_min``).
        trace: also tr(H) by Hutch++ with ``trace_samples`` HVPs.
        density: also the SLQ density (``density_runs`` runs of ``density_iters`` steps),
            stored as the arrays ``density_nodes`` and ``density_weights``.
        tol, tol_min, max_iters: Lanczos settings (λ_min's run stops after ``max_iters`` or 50
            steps, converged or not).

    Records: ``sharpness``, ``lambda_2``..``lambda_k``, ``lambda_min``, ``threshold`` (the
    optimizer's), ``sharpness_ratio`` (λ_max/threshold; for Adam, and for SGD whose groups'
    learning rates differ, the preconditioned sharpness over it), ``preconditioned_sharpness``
    (λ_max(SH), module docstring), ``trace``, ``trace_stderr``, ``sgd_trace_ratio`` (η·tr(H)/2,
    SGD; η₀·tr(SH)/2 across groups), ``density_nodes``/``density_weights`` (arrays), ``hvps``
    (all products this measurement took) and ``residual_max`` (largest relative residual of the
    top-k pairs).

    Cost per measurement: about (iterations of each Lanczos run + trace_samples +
    density_runs·density_iters) HVPs, each about two gradients on the probe batch.
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
        tol: float = 1e-4,
        tol_min: float = 1e-2,
        max_iters: int | None = None,
        trace_samples: int = 30,
        density_runs: int = 4,
        density_iters: int = 60,
        seed: int = 0,
    ) -> None:
        super().__init__(every=every, at=at, schedule=schedule, mode=mode)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
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
        self.seed = seed

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k, "trace": self.trace, "density": self.density,
                "tol": self.tol}

    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed + offset)

    def measure(self, ctx: Context) -> Values:
        fn = ctx.fn
        op, gradient = curvature_operator(fn, "hessian", "auto", None, max_columns=16)
        k = min(self.k, op.size)
        generator = self._generator(0)
        top = lanczos_eigsh(op, k=k, which="top", tol=self.tol, max_iters=self.max_iters,
                            v0=start_vector(op, gradient, generator), generator=generator)
        values: dict[str, Any] = {"sharpness": float(top.values[0])}
        for i in range(1, k):
            values[f"lambda_{i + 1}"] = float(top.values[i])
        relative = top.residuals / top.values.abs().clamp_min(1e-300)
        values["residual_max"] = float(relative.max())
        if self.lambda_min:
            # the bottom of the spectrum sits next to the dense bulk near 0 and converges slowly;
            # a capped run gives an upper bound on λ_min that is good enough to spot a saddle
            bottom = lanczos_eigsh(op, k=1, which="bottom", tol=self.tol_min,
                                   max_iters=self.max_iters or MIN_ITERS_CAP, generator=self._generator(1))
            values["lambda_min"] = float(bottom.values[0])
        extra_hvps = 0
        rule = stability_threshold(ctx.optimizer)
        lr = float(ctx.optimizer.param_groups[0]["lr"]) if ctx.optimizer is not None else math.nan
        scaled = None  # S^{1/2} H S^{1/2}, S the optimizer's steps relative to group 0's (step_scales)
        if rule is not None:
            kind, threshold = rule
            values["threshold"] = threshold
            scales = step_scales(ctx.optimizer, ctx.model, list(fn.params))
            if scales is not None:
                # on the same first-order graph: no second graph is built
                root = flatten([scales[n] for n in fn.params]).to(op.device, op.dtype).sqrt()
                scaled = LinearOperator(matvec=lambda v: root * op.matvec(root * v), size=op.size,
                                        dtype=op.dtype, device=op.device)
                pre = lanczos_eigsh(scaled, k=1, which="top", tol=self.tol, max_iters=self.max_iters,
                                    generator=self._generator(2))
                values["preconditioned_sharpness"] = float(pre.values[0])
                values["sharpness_ratio"] = float(pre.values[0]) / threshold
            elif kind != "adam":
                values["sharpness_ratio"] = values["sharpness"] / threshold
        if self.trace:
            estimate = hutch_plus_plus(op, samples=self.trace_samples, generator=self._generator(3))
            values["trace"] = estimate.value
            values["trace_stderr"] = estimate.stderr
            if isinstance(ctx.optimizer, torch.optim.SGD):
                # η₀·tr(SH)/2: with one learning rate tr(H) itself, else a trace of its own
                weighted = estimate if scaled is None else hutch_plus_plus(
                    scaled, samples=self.trace_samples, generator=self._generator(3))
                values["sgd_trace_ratio"] = lr * weighted.value / 2
        if scaled is not None:
            extra_hvps = scaled.matvecs
        if self.density:
            density = slq(op, runs=self.density_runs, iters=min(self.density_iters, op.size),
                          generator=self._generator(4))
            values["density_nodes"] = density.nodes.numpy().astype(np.float64)
            values["density_weights"] = density.weights.numpy().astype(np.float64)
        values["hvps"] = float(op.matvecs + extra_hvps)
        return values
