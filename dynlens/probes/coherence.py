"""The gradient coherence probe: per-example gradient statistics of the probe batch over training."""

from __future__ import annotations

import contextlib
import math
import time
from typing import ClassVar

import numpy as np

from dynlens.functional import Mode, _synchronize
from dynlens.measures.coherence import ChunkSize, Fallback, check_mode, coherence_of, memory_model
from dynlens.probes.base import Context, Occasional, Probe, Values

__all__ = ["Coherence"]


class Coherence(Probe):
    """Records :func:`dynlens.gradient_coherence` of the probe batch (its definitions and papers are
    in :mod:`dynlens.measures.coherence`).

    Scalars: ``alpha``, ``alpha_orthogonal`` (1/m), ``m_coherence``, ``stiffness_within``,
    ``stiffness_between``, ``stiffness_mean``, ``gsnr``, ``gsnr_excluded``, ``noise_scale``
    (+inf: noise dominates what the batch can resolve), ``trace_sigma``, ``grad_sq_norm``,
    ``mean_grad_norm``, ``size`` (m) and ``vmap_fallback`` (1 when the per-example loop was used).

    Arrays: ``grad_norms`` (m,) ‖g_i‖ in probe-batch order; ``gsnr_per_layer`` aligned with the
    run's ``layers``; ``classes`` (C,) labels with ``per_class`` (C,) m-coherence and
    ``class_counts`` (C,) and ``labels`` (m,) each example's class; ``stiffness`` (m, m) cos(g_i, g_j) as float32 and ``class_stiffness``
    (C, C), stored when stiffness is on and m ≤ ``matrix_max`` (the matrix is m² numbers).

    Cost per measurement: one vectorised backward pass over the probe batch (31 training steps
    of a ResNet-18 at batch 256 on an H100, 8.6 of a GPT-2-sized decoder), plus for stiffness the
    m×m Gram matrix and n(n−1)/2 chunk passes when the batch spans n > 1 chunks (258 training
    steps on the ResNet-18): hence stiffness only every ``stiffness_every``-th measurement, when
    the time budget allows it.

    Args:
        every / at / schedule / mode: see :class:`dynlens.Probe` (mode="train" with BatchNorm
            is refused: per-example gradients are ill-defined with batch statistics).
        chunk_size: examples per pass, or "auto" (default): the largest chunk up to the probe
            batch whose per-example gradients fit a budget for speed (see
            :func:`dynlens.gradient_coherence`). Either way at most the chunk whose predicted
            peak fits the measurement's memory allowance (``ctx.memory``; about 16 bytes per
            parameter, 24 with classes, plus a pass's activations and gradients per example);
            when not even one example fits, the measurement waits
            (:class:`dynlens.budget.MemoryBudgetTooSmall`).
        stiffness: compute the stiffness statistics (the m×m Gram matrix).
        stiffness_every: with stiffness, compute it at every this many measurements (the first
            included), and only when its predicted cost fits the time budget's allowance
            (:class:`dynlens.probes.base.Occasional`); 1 for every measurement.
        matrix_max: largest probe batch whose stiffness matrix is stored.
        classes: as in :func:`dynlens.gradient_coherence` (None: from integer targets).
        fallback: "loop" or "error" when vmap cannot run the model.
        hooks: per-example gradients of Linear, Conv and BatchNorm layers from layer hooks, True, False or "auto" (see
            gradient_coherence).
        graphs: on CUDA, replay the measurement from a CUDA graph, True, False or "auto" (see
            gradient_coherence). A graph keeps its memory between measurements, where training
            would feel it; so under a Lens memory budget (``ctx.memory`` set, automatic on a
            GPU) "auto" measures without graphs (on an H200 the graphs of a ResNet-18 took the
            Hessian probe's allowance from 1.0 to 0.2 GiB over four measurements).
    """

    name = "coherence"
    default_every: ClassVar[int] = 50
    pure: ClassVar[bool] = True

    def __init__(
        self,
        every: int | None = None,
        at=None,  # noqa: ANN001 - Probe's schedule arguments
        schedule=None,  # noqa: ANN001
        mode: Mode | None = None,
        *,
        chunk_size: ChunkSize = "auto",
        stiffness: bool = True,
        stiffness_every: int = 10,
        matrix_max: int = 256,
        classes=None,  # noqa: ANN001 - see gradient_coherence
        fallback: Fallback = "loop",
        hooks: bool | str = "auto",
        graphs: bool | str = "auto",
    ) -> None:
        super().__init__(every=every, at=at, schedule=schedule, mode=mode)
        self.chunk_size = chunk_size
        self.stiffness = stiffness
        self._stiffness = Occasional(stiffness_every)
        self.matrix_max = matrix_max
        self.classes = classes
        self.fallback = fallback
        self.hooks = hooks
        self.graphs = graphs
        self._plain_seconds: float | None = None

    def describe(self) -> dict:
        return {**super().describe(), "chunk_size": self.chunk_size, "stiffness": self.stiffness,
                "stiffness_every": self._stiffness.every,
                "fallback": self.fallback, "hooks": self.hooks, "graphs": self.graphs}

    def _graphs(self, ctx: Context) -> bool | str:
        """The ``graphs`` option for this measurement: "auto" is off under a memory limit."""
        return False if self.graphs == "auto" and ctx.memory is not None else self.graphs

    def _stiffness_factor(self, ctx: Context) -> float:
        """The first stiffness measurement's predicted cost over a plain one's: the 8× seen on
        GPUs when the batch fits one chunk; when the memory allowance splits it into n chunks,
        every pair of chunks is one more pass, so 8·n(n−1)/2 (on an H200 a ResNet-18 split into
        32 chunks took 250 s against 1 s plain: 8× would have let that through)."""
        if ctx.memory is None or not self._stiffness.due:
            return 8.0
        m = ctx.fn.size
        with contextlib.suppress(Exception):  # a model the plan cannot be made for: assume one chunk
            chunk = memory_model(ctx.fn, stiffness=True, hooks=self.hooks,
                                 classes=self.classes).largest_chunk(ctx.memory, m)
            if chunk < 1:
                return math.inf
            n = -(-m // chunk)
            return 8.0 * max(1, n * (n - 1) // 2)
        return 8.0

    def measure(self, ctx: Context) -> Values:
        check_mode(ctx.model, self.mode)
        self._stiffness.tick()
        plain = self._plain_seconds
        # across ranks stiffness is not computed (gradient_coherence's group=)
        stiffness = self.stiffness and ctx.group is None and self._stiffness.wanted(
            0.0, ctx.allowance, math.inf if plain is None else plain * self._stiffness_factor(ctx))
        start = time.perf_counter()
        r = coherence_of(ctx.fn, chunk_size=self.chunk_size, stiffness=stiffness,
                         classes=self.classes, fallback=self.fallback,
                         hooks=self.hooks, graphs=self._graphs(ctx), memory=ctx.memory)
        _synchronize(ctx.fn.device)
        seconds = time.perf_counter() - start
        if stiffness:
            self._stiffness.ran(seconds)
        else:
            self._plain_seconds = seconds
        layers = ctx.layers or list(r.gsnr_per_layer)
        values: dict = {
            "alpha": r.alpha,
            "alpha_orthogonal": r.alpha_orthogonal,
            "m_coherence": r.m_coherence,
            "gsnr": r.gsnr,
            "gsnr_excluded": float(r.gsnr_excluded),
            "noise_scale": r.noise_scale,
            "trace_sigma": r.trace_sigma,
            "grad_sq_norm": r.grad_sq_norm,
            "mean_grad_norm": r.mean_grad_norm,
            "size": float(r.size),
            "vmap_fallback": float(r.method.endswith("loop")),
            "grad_norms": r.grad_norms,
            "gsnr_per_layer": np.array([r.gsnr_per_layer.get(layer, np.nan) for layer in layers]),
        }
        if r.per_class:
            values["labels"] = r.labels
            values["classes"] = r.classes
            values["per_class"] = np.array([r.per_class[int(c)] for c in r.classes])
            values["class_counts"] = np.array([r.class_counts[int(c)] for c in r.classes], dtype=np.int64)
        if stiffness:
            values.update(stiffness_within=r.stiffness_within, stiffness_between=r.stiffness_between,
                          stiffness_mean=r.stiffness_mean)
            if r.stiffness is not None and r.size <= self.matrix_max:
                values["stiffness"] = r.stiffness.astype(np.float32)
                if r.class_stiffness is not None:
                    values["class_stiffness"] = r.class_stiffness
        return values
