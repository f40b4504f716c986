"""Softmax collapse, naive loss minimisation and output-logit growth (Prieto et al. 2025,
"Grokking at the Edge of Numerical Stability"; Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities").

- **Softmax collapse** (SC, Prieto et al. Def. 3 and the authors' code): with z one example's
  logits cast to a dtype d, s = Σ_j exp(z_j − max_k z_k) evaluated in d; the example has
  collapsed in d when s == 1 exactly: every other class's term was absorbed by rounding. A
  correctly classified collapsed example has cross-entropy exactly 0 and no gradient on its
  correct-class logit: it stops teaching the model. :func:`softmax_collapse` counts it in the
  dtype the loss is computed in and in float32, bfloat16 and float16, with the fraction whose
  loss is exactly 0, the margins z_y − max_{j≠y} z_j against each dtype's absorption margin
  ln 2^p (p the significand's bits: float32 16.6, float16 7.6, bfloat16 5.5), the logits' norms
  and log Z = logsumexp(z) (Wortsman et al.'s output-logit divergence: log Z far below 0).
- **Naive loss minimisation** (NLM, Prieto et al. §4): past fitting, the loss keeps falling by
  scaling the logits, and for a positively homogeneous network that direction is θ itself.
  :func:`nlm_alignment` is cos(−∇L, θ), over all parameters and per parameter tensor.

Logits of a sequence model, (batch, sequence, classes), count every token; targets equal to
``ignore_index`` are left out, as ``F.cross_entropy`` leaves them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Collapse", "Alignment", "softmax_collapse", "nlm_alignment", "absorption_margin",
           "COLLAPSE_DTYPES", "MARGIN_QUANTILES", "collapsed", "cosines"]

# the probabilities at which the margins' distribution is kept (Collapse.margin_quantiles)
MARGIN_QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)

# the dtypes every collapse is also counted in, by name
COLLAPSE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                           "float16": torch.float16}


def absorption_margin(dtype: torch.dtype) -> float:
    """ln 2^p for a floating dtype with p significand bits (the implicit bit included): the
    margin beyond which exp(−margin) is absorbed by 1 in that dtype (float32 16.6, float16 7.6,
    bfloat16 5.5, float64 36.7)."""
    bits = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}.get(dtype)
    if bits is None:
        raise ValueError(f"absorption_margin needs a floating dtype (float64/32/16 or bfloat16), got {dtype}")
    return bits * math.log(2)


@dataclass(frozen=True)
class Collapse:
    """Softmax collapse of a batch of logits (:func:`softmax_collapse`).

    Attributes:
        fraction: the share of examples (tokens) collapsed in ``dtype``: s == 1 exactly.
        dtype: the dtype the loss is computed in (``fraction``'s).
        by_dtype: the collapsed share in float32, bfloat16 and float16 (and ``dtype``).
        zero_loss_fraction: the share whose cross-entropy in ``dtype`` is exactly 0.
        margin_min, margin_median: of z_y − max_{j≠y} z_j (in float32, float64 logits in float64).
        margin_above: by dtype name, the share of margins above that dtype's absorption margin.
        logit_norm_mean, logit_norm_max: of each example's ‖z‖₂.
        log_z_mean, log_z_min: of log Z = logsumexp(z) (float32; float64 logits in float64).
        count: examples (tokens) counted.
        margin_quantiles: the margins' quantiles at :data:`MARGIN_QUANTILES` (their distribution).
    """

    fraction: float
    dtype: str
    by_dtype: dict[str, float]
    zero_loss_fraction: float
    margin_min: float
    margin_median: float
    margin_above: dict[str, float]
    logit_norm_mean: float
    logit_norm_max: float
    log_z_mean: float
    log_z_min: float
    count: int
    margin_quantiles: np.ndarray = field(default_factory=lambda: np.zeros(0))


def collapsed(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """Per row of ``logits`` (n, classes): whether Σ_j exp(z_j − max z) == 1 exactly when the
    logits are cast to ``dtype`` and the sum is evaluated in it (the authors' recipe)."""
    z = logits.to(dtype)
    s = torch.exp(z - z.max(dim=-1, keepdim=True).values).sum(dim=-1)
    return s == 1


def _rows(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    if logits.dim() < 2:
        raise ValueError(f"logits need a class dimension: (batch, classes) or (batch, ..., classes); got shape "
                         f"{tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must hold one class index per row of logits: logits {tuple(logits.shape)} "
                         f"need targets of shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError("targets must be class indices (an integer tensor), not probabilities")
    rows, labels = logits.reshape(-1, logits.shape[-1]).detach(), targets.reshape(-1)
    keep = labels != ignore_index
    return rows[keep], labels[keep]


def softmax_collapse(logits: Tensor, targets: Tensor, dtype: torch.dtype = torch.float32,
                     ignore_index: int = -100, group: Any = None) -> Collapse:
    """Softmax collapse of ``logits`` against class ``targets`` (module docstring).

    Args:
        logits: (batch, classes), or (batch, ..., classes) for a sequence model (every position
            counts).
        targets: class indices of shape ``logits.shape[:-1]``.
        dtype: the dtype the training loss is computed in (under autocast, cross-entropy runs in
            float32: pass float32).
        ignore_index: targets with this value are left out.
        group: a ``torch.distributed`` process group (None: not distributed). Each rank passes
            the logits of its shard and every rank gets the whole batch's values: the collapsed
            and zero-loss counts are summed over ranks before dividing by the total count, and
            the per-row margins, norms and log Z are gathered (rank order) for their minima,
            means and quantiles. A rank may hold no row to count, as long as some rank does.

    Raises:
        ValueError: shapes that do not match, float targets, no row left to count, or a
            ``dtype`` that is not floating.
    """
    absorption_margin(dtype)  # checks dtype
    rows, labels = _rows(logits, targets, ignore_index)
    n = rows.shape[0]
    if group is not None:
        from dynlens.distributed import lockstep

        with lockstep(group):
            return _collapse_across_ranks(rows, labels, dtype, group)
    if n == 0:
        raise ValueError("no example to count: every target equals ignore_index")
    # a row can collapse in d only when its top two logits are at least d's absorption margin
    # minus 1 apart (else exp(-gap) > e·2^-p survives the sum): the recipe runs on those rows
    # only, the others are counted as not collapsed (exactly what the recipe gives them)
    top = rows.topk(min(2, rows.shape[1]), dim=1)
    top2 = top.values.float()
    gap = (top2[:, 0] - top2[:, 1]) if rows.shape[1] > 1 else torch.full_like(top2[:, 0], math.inf)

    def share(d: torch.dtype, test: Callable[[Tensor, Tensor], Tensor]) -> float:
        candidates = gap >= absorption_margin(d) - 1.0
        if not bool(candidates.any()):
            return 0.0
        return float(test(rows[candidates], labels[candidates]).sum()) / n

    by_dtype = {key: share(d, lambda r, _lab, d=d: collapsed(r, d)) for key, d in COLLAPSE_DTYPES.items()}
    name = str(dtype).removeprefix("torch.")
    by_dtype.setdefault(name, share(dtype, lambda r, _lab: collapsed(r, dtype)))
    zero = share(dtype, lambda r, lab: F.cross_entropy(r.to(dtype), lab, reduction="none") == 0)
    wide = rows.double() if rows.dtype == torch.float64 else rows.float()  # margins to ~1e-6 of 100
    correct = wide.gather(1, labels[:, None]).squeeze(1)
    # the largest other logit from the top two (no pass over the classes): the second where the
    # label holds the first place, else the first (a tie with the label gives a margin of 0)
    if wide.shape[1] > 1:
        values = top.values.to(wide.dtype)
        others = torch.where(top.indices[:, 0] == labels, values[:, 1], values[:, 0])
    else:
        others = torch.full_like(correct, -math.inf)
    margins = (correct - others).cpu().numpy()
    norms = torch.linalg.vector_norm(wide, dim=1).cpu().numpy()
    log_z = torch.logsumexp(wide, dim=1).cpu().numpy()
    return Collapse(
        fraction=by_dtype[name], dtype=name, by_dtype=by_dtype, zero_loss_fraction=zero,
        margin_min=float(np.min(margins)), margin_median=float(np.median(margins)),
        margin_above={key: float(np.mean(margins > absorption_margin(d)))
                      for key, d in {**COLLAPSE_DTYPES, name: dtype}.items()},
        logit_norm_mean=float(norms.mean()), logit_norm_max=float(norms.max()),
        log_z_mean=float(log_z.mean()), log_z_min=float(log_z.min()), count=int(n),
        margin_quantiles=np.quantile(margins, MARGIN_QUANTILES),
    )


def _collapse_across_ranks(rows: Tensor, labels: Tensor, dtype: torch.dtype, group: Any) -> Collapse:
    """:func:`softmax_collapse` over the rows of every rank: the counts summed, the per-row
    margins, norms and log Z gathered."""
    from dynlens.distributed import all_sum, gather_rows

    if rows.shape[0] > 0 and rows.shape[1] > 1:
        top2 = rows.topk(2, dim=1).values.float()
        gap = top2[:, 0] - top2[:, 1]
    else:
        gap = torch.full((rows.shape[0],), math.inf, device=rows.device)

    def count(d: torch.dtype, test: Callable[[Tensor, Tensor], Tensor]) -> int:
        candidates = gap >= absorption_margin(d) - 1.0
        if not bool(candidates.any()):
            return 0
        return int(test(rows[candidates], labels[candidates]).sum())

    name = str(dtype).removeprefix("torch.")
    counts = {key: count(d, lambda r, _lab, d=d: collapsed(r, d)) for key, d in COLLAPSE_DTYPES.items()}
    counts.setdefault(name, count(dtype, lambda r, _lab: collapsed(r, dtype)))
    zero = count(dtype, lambda r, lab: F.cross_entropy(r.to(dtype), lab, reduction="none") == 0)
    keys = list(counts)
    totals = all_sum(torch.tensor([rows.shape[0], zero, *(counts[k] for k in keys)], dtype=torch.float64,
                                  device=rows.device), group).tolist()
    n = int(totals[0])
    if n == 0:
        raise ValueError("no example to count on any rank: every target equals ignore_index")
    by_dtype = {key: value / n for key, value in zip(keys, totals[2:], strict=True)}
    wide = rows.double() if rows.dtype == torch.float64 else rows.float()
    correct = wide.gather(1, labels[:, None]).squeeze(1)
    others = wide.scatter(1, labels[:, None], -math.inf).max(dim=1).values if wide.shape[1] > 1 \
        else torch.full_like(correct, -math.inf)
    local = torch.stack([correct - others, torch.linalg.vector_norm(wide, dim=1),
                         torch.logsumexp(wide, dim=1)], dim=1)
    margins, norms, log_z = gather_rows(local, group).cpu().numpy().T
    return Collapse(
        fraction=by_dtype[name], dtype=name, by_dtype=by_dtype, zero_loss_fraction=totals[1] / n,
        margin_min=float(np.min(margins)), margin_median=float(np.median(margins)),
        margin_above={key: float(np.mean(margins > absorption_margin(d)))
                      for key, d in {**COLLAPSE_DTYPES, name: dtype}.items()},
        logit_norm_mean=float(norms.mean()), logit_norm_max=float(norms.max()),
        log_z_mean=float(log_z.mean()), log_z_min=float(log_z.min()), count=n,
        margin_quantiles=np.quantile(margins, MARGIN_QUANTILES),
    )


@dataclass(frozen=True)
class Alignment:
    """cos(−∇L, θ) (:func:`nlm_alignment`).

    Attributes:
        cosine: over all the parameters measured, as one vector.
        per_tensor: by parameter name (NaN where the gradient or the tensor is zero).
    """

    cosine: float
    per_tensor: dict[str, float] = field(default_factory=dict)


def cosines(direction: dict[str, Tensor], params: dict[str, Tensor]) -> Alignment:
    """cos(direction, θ) overall and per tensor, in float64 (a gradient or an update)."""
    dot = norm_d = norm_p = 0.0
    per: dict[str, float] = {}
    for name, p in params.items():
        d = direction[name].detach().double()
        q = p.detach().double()
        a, b, c = float((d * q).sum()), float((d * d).sum()), float((q * q).sum())
        dot, norm_d, norm_p = dot + a, norm_d + b, norm_p + c
        per[name] = a / math.sqrt(b * c) if b > 0 and c > 0 else math.nan
    overall = dot / math.sqrt(norm_d * norm_p) if norm_d > 0 and norm_p > 0 else math.nan
    return Alignment(cosine=overall, per_tensor=per)


def nlm_alignment(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], batch: Any,
                  mode: str = "eval", seed: int = 0, group: Any = None) -> Alignment:
    """cos(−∇L, θ) of the mean loss on ``batch``, over all trainable parameters and per tensor:
    near 1 when descending the loss mostly scales the weights (naive loss minimisation).
    The gradient comes from :class:`dynlens.functional.ModelFunction` inside
    :func:`dynlens.functional.isolated` (``.grad``, buffers and RNG untouched).

    ``group``: a ``torch.distributed`` process group (None: not distributed): each rank passes
    its shard of the batch and every rank gets the cosine with the whole batch's gradient (the
    size-weighted all-reduce of the shards' gradients; under data parallelism the parameters
    are the same on every rank)."""
    from dynlens.distributed import lockstep
    from dynlens.functional import ModelFunction, isolated

    with lockstep(group), isolated(model, mode, seed):  # type: ignore[arg-type]
        fn = ModelFunction(model, loss_fn, batch, seed=seed, group=group)
        gradient = fn.grad()
        return cosines({n: -g for n, g in gradient.items()}, fn.params)
