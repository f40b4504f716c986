"""Stability of training: the Hessian's extreme eigenvalues, trace and density on a batch, tracked
between measurements, against the stability threshold of the optimizer in use (the edge of stability: Cohen et
al. 2021 and 2022).

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

:func:`stability_measurement` is the measurement of :class:`dynlens.probes.Hessian`: stateless,
it takes the previous measurement's eigenvectors (for a warm start) and a gate that decides
which optional parts run, and returns the values with the new eigenvectors.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from dynlens.budget import MemoryBudgetTooSmall
from dynlens.functional import ModelFunction, flatten
from dynlens.linalg import LinearOperator, hutch_plus_plus, lanczos_eigsh, slq
from dynlens.measures.hessian import (
    curvature_operator,
    start_vector,
    step_scales,
    warm_start_vector,
)

__all__ = ["stability_threshold", "hvp_chunk_size", "StabilityOptions", "Stability",
           "stability_measurement", "ACTIVATION_FACTOR", "FIXED_VECTORS", "PRECONDITIONED_VECTORS",
           "MIN_ITERS_CAP", "OPTIONAL_PARTS"]

MIN_ITERS_CAP = 50
# the optional parts of a measurement, in the order they are considered
OPTIONAL_PARTS = ("sharpness", "lambda_min", "trace", "density")


def unwrapped(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer a wrapper steps (its ``.optimizer``, repeatedly), or ``optimizer`` itself."""
    seen = 0
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) \
            and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def stability_threshold(optimizer: torch.optim.Optimizer | None) -> tuple[str, float] | None:
    """``(kind, threshold)`` for the optimizer's first parameter group, or None if unknown.

    kind is "gd" (2/η), "momentum" ((2+2β)/η), or "adam" ((2+2β₁)/((1−β₁)η), for the
    preconditioned sharpness). A wrapper that keeps the optimizer it steps as ``.optimizer``
    (``dl.remedies.OrthoGrad``) is read through: the threshold is the wrapped optimizer's.
    """
    optimizer = unwrapped(optimizer)
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


@dataclass(frozen=True)
class StabilityOptions:
    """The settings of :func:`stability_measurement` (see :class:`dynlens.probes.Hessian`'s
    arguments of the same names)."""

    k: int = 1
    lambda_min: bool = True
    trace: bool = True
    density: bool = False
    tol: float = 1e-2
    tol_min: float = 1e-2
    max_iters: int | None = None
    trace_samples: int = 30
    density_runs: int = 4
    density_iters: int = 60
    warm_start: bool = True
    hvp: Literal["reuse", "forward_over_reverse", "auto"] = "reuse"
    chunk_size: int | Literal["auto"] = "auto"
    seed: int = 0


@dataclass
class Stability:
    """One :func:`stability_measurement`.

    Attributes:
        values: the records (see :class:`dynlens.probes.Hessian`): floats, and the density's
            arrays.
        vectors: the top eigenvectors of each operator measured ("hessian", "preconditioned"),
            on the host: the next measurement's warm start.
        products: every operator product this measurement took.
        compared_products: the products of the run the threshold is compared with (λ_max, or
            the preconditioned λ_max).
        compared_cold: whether that run started cold (not from earlier eigenvectors).
    """

    values: dict[str, Any]
    vectors: dict[str, Tensor] = field(default_factory=dict)
    products: int = 0
    compared_products: int = 0
    compared_cold: bool = False


# gate(part, enabled, predicted_seconds, spent_seconds): a context manager to take the optional
# part inside (it may time it), or None to leave it out of this measurement
Gate = Callable[[str, bool, float, float], "AbstractContextManager[Any] | None"]


def take_every_part(part: str, enabled: bool, predicted: float, spent: float) -> AbstractContextManager[Any] | None:
    """The gate that takes every enabled optional part."""
    return contextlib.nullcontext() if enabled else None


def chunking(fn: ModelFunction, options: StabilityOptions, memory: int | None, preconditioned: bool,
             activation_bytes: int | None) -> tuple[int | None, int | None]:
    """``(chunk_size, basis_memory)`` for ``options.chunk_size`` under ``memory`` bytes
    (:func:`hvp_chunk_size`); ``activation_bytes``: one example's, measured if None."""
    if options.chunk_size != "auto":
        return options.chunk_size, None
    if memory is None:
        return None, None
    if activation_bytes is None:
        activation_bytes = fn.activation_bytes(1)
    itemsize = next(iter(fn.params.values())).element_size()
    vectors = FIXED_VECTORS + (PRECONDITIONED_VECTORS if preconditioned else 0)
    return hvp_chunk_size(fn.num_params, itemsize, activation_bytes, fn.size, memory, vectors)


def _checked(product: Callable[[Tensor], Tensor], check: Callable[[], None]) -> Callable[[Tensor], Tensor]:
    """``product`` that calls ``check`` first."""

    def checked(v: Tensor) -> Tensor:
        check()
        return product(v)

    return checked


def stability_measurement(
    fn: ModelFunction,
    optimizer: torch.optim.Optimizer | None,
    model: torch.nn.Module,
    options: StabilityOptions = StabilityOptions(),  # noqa: B008 - frozen
    previous: Mapping[str, Tensor] | None = None,
    gate: Gate = take_every_part,
    memory: int | None = None,
    activation_bytes: int | None = None,
    check: Callable[[], None] | None = None,
) -> Stability:
    """The Hessian's top-k eigenvalues on ``fn``'s batch against ``optimizer``'s stability
    threshold, with λ_min, the trace and the density as optional parts.

    Args:
        fn: the model as a function on its batch (:class:`dynlens.functional.ModelFunction`);
            with ``fn.group`` (a batch split across ranks) every value is the whole batch's
            (:func:`dynlens.measures.hessian.curvature_operator` all-reduces the products), and
            every rank must call it with the same ``gate`` decisions (the Hessian probe takes
            rank 0's: :func:`dynlens.distributed.decide`).
        optimizer: the training optimizer (its threshold and step scales), or None.
        model: the module ``fn`` evaluates (the optimizer's parameters are matched to it).
        options: the settings (:class:`StabilityOptions`).
        previous: the last measurement's :attr:`Stability.vectors`, for a warm start.
        gate: decides which optional parts run (:data:`Gate`); by default every enabled one.
            Under Adam (or groups with other rates) the raw λ_max is one of them.
        memory: bytes the measurement may allocate (None: no limit): products are summed over
            sub-batches that fit (:func:`hvp_chunk_size`).
        activation_bytes: one example's activations (:meth:`ModelFunction.activation_bytes`),
            when the caller keeps it between measurements.
        check: called before every product; it may raise to stop the measurement (the
            Lens's deadline on a first measurement: :meth:`dynlens.probes.Context.check_time`).

    Raises:
        MemoryBudgetTooSmall: not even one example's product fits ``memory``.
        Whatever ``check`` raises.
    """
    began = time.perf_counter()
    previous = previous or {}
    result = Stability(values={})
    values = result.values
    optimizer = unwrapped(optimizer)
    rule = stability_threshold(optimizer)
    scales = step_scales(optimizer, model, list(fn.params)) if rule is not None else None
    chunk, basis_memory = chunking(fn, options, memory, scales is not None, activation_bytes)
    # under a memory limit, one column a product: a batched product of c columns holds c
    # times the activations (the trace's 16 columns took 45 GiB on the decoder)
    columns = 16 if memory is None else 1
    op, gradient = curvature_operator(fn, "hessian", options.hvp, None, max_columns=columns, chunk_size=chunk)
    if check is not None:
        op.matvec = _checked(op.matvec, check)
        if op.matmat is not None:
            op.matmat = _checked(op.matmat, check)
    k = min(options.k, op.size)
    values["chunk_size"] = float(chunk or fn.size)
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else math.nan

    def generator(offset: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(options.seed + offset)

    def top(key: str, operator: LinearOperator, start: Tensor | None, count: int, offset: int,
            compared: bool) -> Any:
        """The top-k run on ``operator``, warm-started from the last measurement's eigenvectors
        (else from the gradient and a Gaussian vector, or a Gaussian vector alone)."""
        rng = generator(offset)
        before = previous.get(key) if options.warm_start else None
        if before is not None and before.shape[0] == operator.size:
            v0 = warm_start_vector(operator, before, rng)
        else:
            before = None
            v0 = None if start is None else start_vector(operator, start, rng)
        run = lanczos_eigsh(operator, k=count, which="top", tol=options.tol, max_iters=options.max_iters,
                            v0=v0, generator=rng, return_vectors=options.warm_start, memory=basis_memory)
        if compared:
            result.compared_products, result.compared_cold = run.matvecs, before is None
        if options.warm_start and run.vectors is not None:
            vectors = run.vectors.detach().to("cpu", copy=True)
            if key == "hessian":
                values["warm_start"] = float(before is not None)
                if before is not None:
                    values["eigenvector_overlap"] = float(
                        (before[:, 0].double() @ vectors[:, 0].double()).abs())
            result.vectors[key] = vectors
        return run

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
            pre = top("preconditioned", scaled, None, 1, 2, compared=True)
            values["preconditioned_sharpness"] = float(pre.values[0])
            values["sharpness_ratio"] = float(pre.values[0]) / threshold

    def products() -> int:
        # scaled's matvec calls op's function directly: its products are not in op.matvecs
        return op.matvecs + (scaled.matvecs if scaled is not None else 0)

    def part(name: str, enabled: bool, count: int) -> AbstractContextManager[Any] | None:
        spent = time.perf_counter() - began
        return gate(name, enabled, spent / max(products(), 1) * count, spent)

    # λ_max of H itself: where the compared sharpness is the preconditioned one (Adam, or
    # groups with other rates), it is an optional part like λ_min; otherwise it is the measurement
    taken = contextlib.nullcontext() if scaled is None else part("sharpness", True, 2 * k + 4)
    if taken is not None:
        with taken:
            eigen = top("hessian", op, gradient, k, 0, compared=scaled is None)
        values["sharpness"] = float(eigen.values[0])
        for i in range(1, k):
            values[f"lambda_{i + 1}"] = float(eigen.values[i])
        relative = eigen.residuals / eigen.values.abs().clamp_min(1e-300)
        values["residual_max"] = float(relative.max())
        if scaled is None and rule is not None and rule[0] != "adam":
            values["sharpness_ratio"] = values["sharpness"] / rule[1]
    del gradient
    taken = part("lambda_min", options.lambda_min, options.max_iters or MIN_ITERS_CAP)
    if taken is not None:
        # the bottom of the spectrum sits next to the dense bulk near 0 and converges slowly;
        # a capped run gives an upper bound on λ_min that is good enough to spot a saddle
        with taken:
            bottom = lanczos_eigsh(op, k=1, which="bottom", tol=options.tol_min,
                                   max_iters=options.max_iters or MIN_ITERS_CAP,
                                   generator=generator(1), memory=basis_memory)
        values["lambda_min"] = float(bottom.values[0])
    taken = part("trace", options.trace, options.trace_samples * (2 if scaled is not None else 1))
    if taken is not None:
        with taken:
            estimate = hutch_plus_plus(op, samples=options.trace_samples, generator=generator(3))
            if isinstance(optimizer, torch.optim.SGD):
                # η₀·tr(SH)/2: with one learning rate tr(H) itself, else a trace of its own
                weighted = estimate if scaled is None else hutch_plus_plus(
                    scaled, samples=options.trace_samples, generator=generator(3))
                values["sgd_trace_ratio"] = lr * weighted.value / 2
        values["trace"] = estimate.value
        values["trace_stderr"] = estimate.stderr
    taken = part("density", options.density, options.density_runs * options.density_iters)
    if taken is not None:
        with taken:
            density = slq(op, runs=options.density_runs, iters=min(options.density_iters, op.size),
                          generator=generator(4))
        values["density_nodes"] = density.nodes.numpy().astype(np.float64)
        values["density_weights"] = density.weights.numpy().astype(np.float64)
    result.products = products()
    values["hvps"] = float(result.products)
    return result
