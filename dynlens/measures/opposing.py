"""Per-example training dynamics: the ledger, opposing signals and dataset cartography.

- **Ledger**: the per-example loss ℓ_i(t), the probability of the correct class p(y_i)(t) and
  whether the prediction is correct, of N tracked examples at T probe steps
  (:class:`Ledger`, one column per step from :func:`ledger_entry`).
- **Opposing signals** (Rosenfeld & Risteski 2024, "Outliers with Opposing Signals Have an
  Outsized Effect on Neural Network Optimization"): consistent, large-magnitude input features
  shared by two groups with different labels pull the weights in opposite directions; near the
  edge of stability the loss oscillates between the groups (one group's loss rises while the
  other's falls). The paper finds the groups by hand; :func:`opposing_signals` is dynlens's
  detector (its docstring gives the definition and the significance test).
- **Dataset cartography** (Swayamdipta et al. 2020, "Dataset Cartography: Mapping and
  Diagnosing Datasets with Training Dynamics"): per example, confidence = mean p(y_i),
  variability = std p(y_i), correctness = fraction of steps correct, and the region of the map
  (easy, hard, ambiguous); forgetting events (Toneva et al. 2019, "An Empirical Study of Example
  Forgetting during Deep Neural Network Learning"): correct → wrong transitions
  (:func:`data_map`).

Sequence models: an example's loss is ``loss_fn`` on that example alone (the mean over its
tokens), its p(y) the mean over its counted tokens of p(y_token), and it is correct when more
than half of its counted tokens are predicted correctly; targets equal to ``ignore_index`` are
left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from dynlens.batches import logits_of
from dynlens.distributed import gather_rows, gather_sizes, is_sharded, lockstep, refuse_sharded
from dynlens.functional import (
    ModelFunction,
    batch_size,
    call_model,
    example_losses,
    isolated,
    slice_examples,
    split_batch,
)
from dynlens.parameters import unflatten

__all__ = ["Ledger", "LedgerEntry", "ledger_entry", "along_direction", "ledger_from_entries", "OpposingPair",
           "opposing_signals", "DataMap", "data_map", "REGIONS"]

# the regions of the data map, in the order DataMap.region_counts lists them
REGIONS = ("easy", "hard", "ambiguous")


# ----------------------------------------------------------------------------- the ledger


class LedgerEntry(NamedTuple):
    """One probe step of the ledger (:func:`ledger_entry`): for each of N examples, its loss
    (float32), p(y) (float32, NaN where the outputs are not class logits) and whether it is
    predicted correctly (bool). Unpacks as ``loss, p_y, correct``."""

    loss: np.ndarray
    p_y: np.ndarray
    correct: np.ndarray


def _class_statistics(outputs: Tensor, targets: Any, ignore_index: int) -> tuple[Tensor, Tensor] | None:
    """Per example: mean over its counted positions of p(y) and whether more than half are
    predicted correctly; None where the outputs are not class logits for integer targets."""
    if not isinstance(targets, Tensor) or targets.is_floating_point() or outputs.dim() != targets.dim() + 1 \
            or tuple(outputs.shape[:-1]) != tuple(targets.shape):
        return None
    n = outputs.shape[0]
    logits, labels = outputs.reshape(n, -1, outputs.shape[-1]).float(), targets.reshape(n, -1)
    counted = labels != ignore_index
    safe = labels.masked_fill(~counted, 0)
    p = torch.softmax(logits, dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    hit = (logits.argmax(dim=-1) == safe) & counted
    tokens = counted.sum(dim=1)
    p_y = (p * counted).sum(dim=1) / tokens  # NaN where nothing is counted
    return p_y, hit.sum(dim=1) * 2 > tokens


def ledger_entry(model: nn.Module, loss_fn: Callable[..., Any], batch: Any, chunk_size: int = 1024,
                 ignore_index: int | None = None, group: Any = None) -> LedgerEntry:
    """Each example's loss, p(y) and correctness on ``batch`` under the current parameters.

    The model runs in eval mode inside :func:`dynlens.functional.isolated`, without autograd, in
    chunks of ``chunk_size`` examples: parameters, ``.grad``, buffers, training flags and random
    states are left as they were. The loss of an example is ``loss_fn`` on that example alone
    (:func:`dynlens.functional.example_losses`); p(y) = softmax(z)_y of the logits z, and the
    prediction is correct when argmax z = y (sequences: module docstring). Outputs that are not
    class logits for integer targets (regression) give p(y) = NaN and correct = False.

    Args:
        ignore_index: target value left out of p(y) and correctness; default the loss module's
            own ``ignore_index`` where it has one, else -100.
        group: a ``torch.distributed`` process group (None: not distributed). Each rank passes
            its shard of the tracked examples and gets the entries of every rank's, concatenated
            in rank order (all-gathered: rank 0 writes them). The model is called as it is, so a
            model sharded by FSDP2 (``fully_shard``) works too: its forward gathers its own
            parameters, and every rank runs the same number of forward passes (the largest
            shard's chunks; a rank whose shard is shorter runs its last chunk again).

    Cost: one forward pass over the batch.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of examples, got {chunk_size}")
    ignore = ignore_index if ignore_index is not None else int(getattr(loss_fn, "ignore_index", -100))
    inputs, targets = split_batch(batch)
    n = batch_size(inputs)
    losses, p_ys, hits = [], [], []
    # under FSDP2 every forward is a collective: every rank runs as many as the largest shard needs
    sizes = [n] if group is None else gather_sizes(n, group)
    passes = -(-max(sizes) // chunk_size)
    with lockstep(group), isolated(model, "eval"), torch.no_grad():
        for index in range(passes):
            start = index * chunk_size
            if start >= n:  # this shard is done: run a forward for the others' sake, dropped
                if n and is_sharded(model):
                    call_model(model, slice_examples(inputs, max(0, n - chunk_size), n))
                continue
            stop = min(n, start + chunk_size)
            x, y = slice_examples(inputs, start, stop), slice_examples(targets, start, stop)
            outputs = call_model(model, x)
            if not isinstance(outputs, Tensor) and logits_of(outputs) is not None:
                # a ModelOutput or a tuple: its logits (loss_fn must take them, as
                # dynlens.integrations.hf.causal_lm_loss does)
                outputs = logits_of(outputs)
            losses.append(example_losses(loss_fn, outputs, y).float().reshape(-1).cpu())
            stats = _class_statistics(outputs, y, ignore)
            if stats is None:
                stats = (torch.full((stop - start,), math.nan), torch.zeros(stop - start, dtype=torch.bool))
            p_ys.append(stats[0].float().cpu())
            hits.append(stats[1].cpu())
        if group is not None:
            local = torch.stack([torch.cat(losses).double(), torch.cat(p_ys).double(),
                                 torch.cat(hits).double()], dim=1) if losses else torch.zeros(0, 3, dtype=torch.float64)
            whole = gather_rows(local, group, sizes)
            return LedgerEntry(whole[:, 0].float().numpy(), whole[:, 1].float().numpy(),
                               whole[:, 2].bool().numpy())
    return LedgerEntry(torch.cat(losses).numpy(), torch.cat(p_ys).numpy(), torch.cat(hits).numpy())


def along_direction(model: nn.Module, loss_fn: Callable[..., Any], batch: Any, vector: Tensor,
                    chunk_size: int = 1024, group: Any = None) -> np.ndarray:
    """⟨∇ℓ_i, v⟩ for each example of ``batch``: the derivative of its loss along ``vector`` (a
    flat vector over the trainable parameters in ``named_parameters`` order, such as the
    Hessian's top eigenvector), float64 (N,). The opposing groups of Rosenfeld & Risteski pull
    along the sharpest direction in opposite ways, so the sign of ⟨g_i, v⟩ is a second way to
    split a pair (the docs, What dynlens measures § Opposing signals).

    Computed as the tangent of the per-example losses (``torch.func.jvp``), in eval mode inside
    :func:`dynlens.functional.isolated`, in chunks: one forward pass with tangents, no
    per-example gradient is formed. Where a layer has no forward-mode derivative
    (``nn.MultiheadAttention``'s fused kernel), by two backward passes instead
    (:func:`_along_by_reverse_mode`).

    With ``group`` (a ``torch.distributed`` process group), each rank passes its shard of the
    batch and the same ``vector`` (the Hessian's eigenvector, computed from all ranks'
    products, is the same on every rank); every rank gets the values of the whole batch, the
    shards concatenated in rank order, as :func:`ledger_entry` gives the losses.

    Raises:
        ValueError: ``vector`` does not have one entry per trainable parameter, or the model's
            parameters are sharded by FSDP2 (the direction needs them all on every rank).
    """
    if group is not None:
        refuse_sharded(model, "along_direction (⟨∇ℓ_i, v⟩ along the Hessian's top eigenvector)")
        n = batch_size(split_batch(batch)[0])
        sizes = gather_sizes(n, group)
        with lockstep(group):
            local = along_direction(model, loss_fn, batch, vector, chunk_size) if n else np.zeros(0)
            whole = gather_rows(torch.as_tensor(local, dtype=torch.float64), group, sizes)
        return whole.cpu().numpy()
    if batch_size(split_batch(batch)[0]) == 0:
        return np.zeros(0)
    with isolated(model, "eval"):
        fn = ModelFunction(model, loss_fn, batch)
        if vector.numel() != fn.num_params:
            raise ValueError(f"the direction has {vector.numel()} entries and the model "
                             f"{fn.num_params} trainable parameters")
        direction = {name: t.to(fn.params[name].dtype)
                     for name, t in unflatten(vector.to(fn.device), fn.params).items()}
        try:
            # vmap's chunks bound the memory: chunk_size examples' activations and tangents at a time
            _, tangent = torch.func.jvp(lambda p: fn.per_example_losses(p, chunk_size=chunk_size),
                                        (fn.params,), (direction,))
        except (NotImplementedError, RuntimeError) as err:
            if "forward AD" not in str(err) and "forward-mode" not in str(err):
                raise
            tangent = _along_by_reverse_mode(fn, direction, chunk_size)
    return tangent.detach().double().reshape(-1).cpu().numpy()


def _along_by_reverse_mode(fn: ModelFunction, direction: dict[str, Tensor], chunk_size: int) -> Tensor:
    """⟨∇ℓ_i, v⟩ for every example without forward-mode derivatives, for layers that have none
    (``nn.MultiheadAttention``'s fused kernel in eval mode: torchvision's ViTs): with u a
    zero vector over the examples, g(u) = Σ_i u_i ∇ℓ_i = Jᵀu by a backward pass that keeps its
    graph, and the gradient of ⟨g(u), v⟩ with respect to u is Jv. Two backward passes over the
    set, whose graph it holds at once (the forward-mode path holds chunk_size examples')."""
    params = {name: t.detach().requires_grad_(True) for name, t in fn.params.items()}
    with torch.enable_grad():
        losses = fn.per_example_losses(params, chunk_size=chunk_size)
        u = torch.zeros_like(losses, requires_grad=True)
        grads = torch.autograd.grad(losses, list(params.values()), grad_outputs=u, create_graph=True,
                                    allow_unused=True)
        inner = sum(((g * direction[name]).sum() for name, g in zip(params, grads, strict=True) if g is not None),
                    u.sum() * 0)
        (along,) = torch.autograd.grad(inner, u)
    return along


@dataclass(frozen=True)
class Ledger:
    """Per-example values of N tracked examples at T probe steps.

    Attributes:
        steps: (T,) int64, the training step of each row, increasing.
        loss: (T, N) float32, ℓ_i(t), each example's loss.
        p_y: (T, N) float32, p(y_i)(t), the probability of the correct class (NaN: not classification).
        correct: (T, N) bool, whether the prediction is correct.
        example_ids: (N,) int64, the examples' ids (their index in the dataset).
        labels: (N,) int64, each example's class (for sequences, whatever the caller groups by).
        inputs: (N, D) float32 or None, a summary of each example's input (its flattened input,
            or a downsampled one) from which :func:`opposing_signals` reports the shared input
            signal.
        along_top: (T, N) float32 or None, ⟨∇ℓ_i, v⟩ with the Hessian's top eigenvector v at the
            steps where the Hessian probe had measured one (NaN at the others;
            :func:`along_direction`).

    Memory: 9·T·N bytes for the three (T, N) arrays (10,000 examples × 1,000 steps: 90 MB), plus
    4·N·D for ``inputs``.
    """

    steps: np.ndarray
    loss: np.ndarray
    p_y: np.ndarray
    correct: np.ndarray
    example_ids: np.ndarray
    labels: np.ndarray
    inputs: np.ndarray | None = None
    along_top: np.ndarray | None = None

    def __post_init__(self) -> None:
        t, n = len(self.steps), len(self.example_ids)
        for name in ("loss", "p_y", "correct"):
            shape = getattr(self, name).shape
            if shape != (t, n):
                raise ValueError(f"Ledger.{name} must have shape (steps, examples) = ({t}, {n}), got {shape}")
        if self.labels.shape != (n,):
            raise ValueError(f"Ledger.labels must hold one label per example ({n}), got shape {self.labels.shape}")
        if self.inputs is not None and (self.inputs.ndim != 2 or self.inputs.shape[0] != n):
            raise ValueError(f"Ledger.inputs must be (examples, features) with {n} rows, got shape "
                             f"{self.inputs.shape}; flatten each example's input (or a summary of it)")
        if self.along_top is not None and self.along_top.shape != (t, n):
            raise ValueError(f"Ledger.along_top must have shape (steps, examples) = ({t}, {n}), got "
                             f"{self.along_top.shape}")
        if t > 1 and np.any(np.diff(self.steps) <= 0):
            raise ValueError("Ledger.steps must increase")

    @property
    def nbytes(self) -> int:
        """Bytes held by the ledger's arrays."""
        arrays = (self.steps, self.loss, self.p_y, self.correct, self.example_ids, self.labels, self.inputs,
                  self.along_top)
        return sum(a.nbytes for a in arrays if a is not None)

    def window(self, window: tuple[int, int] | None) -> Ledger:
        """The rows whose step lies in ``[start, stop)`` (all rows for None)."""
        if window is None:
            return self
        keep = (self.steps >= window[0]) & (self.steps < window[1])
        return Ledger(self.steps[keep], self.loss[keep], self.p_y[keep], self.correct[keep], self.example_ids,
                      self.labels, self.inputs, None if self.along_top is None else self.along_top[keep])


def ledger_from_entries(steps: Sequence[int], entries: Sequence[LedgerEntry | tuple[Any, Any, Any]],
                        labels: Any, example_ids: Any = None, inputs: Any = None) -> Ledger:
    """A :class:`Ledger` from one :func:`ledger_entry` per step.

    Args:
        steps: the training step of each entry.
        entries: ``(loss, p_y, correct)`` per step, each of N examples (arrays or tensors).
        labels: (N,) each example's class (a tensor or array).
        example_ids: (N,) ids; default 0..N-1.
        inputs: optional (N, ...) inputs or summaries of them, flattened to (N, D) float32.
    """
    if len(steps) != len(entries):
        raise ValueError(f"one entry per step: got {len(steps)} steps and {len(entries)} entries")

    def stack(i: int, dtype: type) -> np.ndarray:
        if not entries:
            return np.zeros((0, len(np.asarray(labels))), dtype=dtype)
        return np.stack([_numpy(e[i]).astype(dtype, copy=False).reshape(-1) for e in entries])

    label_array = _numpy(labels).astype(np.int64).reshape(-1)
    n = len(label_array)
    ids = np.arange(n, dtype=np.int64) if example_ids is None else _numpy(example_ids).astype(np.int64).reshape(-1)
    summary = None if inputs is None else _numpy(inputs).astype(np.float32).reshape(n, -1)
    return Ledger(np.asarray(steps, dtype=np.int64), stack(0, np.float32), stack(1, np.float32),
                  stack(2, np.bool_), ids, label_array, summary)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


# ----------------------------------------------------------------------------- opposing signals


@dataclass(frozen=True)
class OpposingPair:
    """Two groups of examples whose losses move in opposite directions (:func:`opposing_signals`).

    Attributes:
        group_a, group_b: the members' example ids (group a: positive loadings on the component).
        correlation: Pearson correlation over the window's steps of the two groups' mean loss
            changes ΔL̄_a(t), ΔL̄_b(t) (−1: one group's loss rises exactly when the other's falls).
        p_value: the share of time-shuffled ledgers whose detected pair is at least as
            anti-correlated (:func:`opposing_signals`).
        steps: (T,) the window's steps.
        loss_a, loss_b: (T,) float64, each group's mean loss at each step.
        labels_a, labels_b: label → number of members with it.
        oscillation_steps: the steps t at which the two groups' losses moved in opposite
            directions since the previous step, by more than the median |ΔL̄_a − ΔL̄_b|.
        input_signal_a, input_signal_b: (D,) float32, each group's mean input minus the mean
            input of all ledger examples (None without ``Ledger.inputs``).
        shared_input_signal: (D,) float32, the mean input of both groups together minus the
            mean input of all ledger examples: the feature the groups share (None without inputs).
        component: which principal component (0: the leading one) split the candidates.
        along_top_a, along_top_b: each group's mean ⟨∇ℓ_i, v⟩ with the Hessian's top eigenvector,
            each step's sign set so that group a's is positive (v's sign is arbitrary), averaged
            over the window's steps that have it; None without ``Ledger.along_top``.
        along_top_agreement: the share of (member, step) pairs whose ⟨∇ℓ_i, v⟩ falls on its
            group's side of zero (group a positive, b negative, per step): 1 when the sign of
            ⟨g_i, v⟩ splits the pair as the loss changes do, 0.5 when it says nothing; None
            without ``Ledger.along_top``.
    """

    group_a: np.ndarray
    group_b: np.ndarray
    correlation: float
    p_value: float
    steps: np.ndarray
    loss_a: np.ndarray
    loss_b: np.ndarray
    labels_a: dict[int, int]
    labels_b: dict[int, int]
    oscillation_steps: np.ndarray
    input_signal_a: np.ndarray | None
    input_signal_b: np.ndarray | None
    shared_input_signal: np.ndarray | None
    component: int
    along_top_a: float | None = None
    along_top_b: float | None = None
    along_top_agreement: float | None = None


def _candidates(delta: np.ndarray, mean_delta: np.ndarray, count: int) -> np.ndarray:
    """Column indices of the ``count`` examples with the largest Σ_t |Δℓ_i(t)|, joined by the
    ``count`` largest Σ over loss-spike steps (those where the mean loss rose)."""
    moved = np.abs(delta)
    chosen = set(np.argsort(-moved.sum(axis=0), kind="stable")[:count].tolist())
    spikes = mean_delta > 0
    if spikes.any():
        chosen |= set(np.argsort(-moved[spikes].sum(axis=0), kind="stable")[:count].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / scale if scale > 0 else 0.0


def _leading_patterns(centred: np.ndarray, components: int) -> np.ndarray:
    """The leading ``components`` left singular vectors of ``centred`` (time × candidates), as
    columns of unit norm, from the eigenvectors of its smaller Gram matrix (a few times faster
    than an SVD; only the top few are needed, whose accuracy the squared condition number does
    not touch)."""
    steps, count = centred.shape
    if count <= steps:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        keep = np.argsort(values)[::-1][:components]
        keep = keep[values[keep] > values.max() * 1e-12]
        patterns = centred @ vectors[:, keep]
        return patterns / np.linalg.norm(patterns, axis=0)
    values, vectors = np.linalg.eigh(centred @ centred.T)
    keep = np.argsort(values)[::-1][:components]
    return vectors[:, keep[values[keep] > values.max() * 1e-12]]


def _pairs(delta: np.ndarray, components: int, membership: float) -> list[tuple[int, np.ndarray, np.ndarray, float]]:
    """Per principal component of the candidates' centred loss-change trajectories (rows of
    ``delta``: time, columns: candidates): the candidates whose trajectory correlates with the
    component's time pattern at ≥ ``membership`` (group a) or ≤ −``membership`` (group b), and
    the correlation of the two groups' mean loss changes. Components that leave a group empty
    give no pair."""
    centred = delta - delta.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    if delta.shape[0] < 3 or not np.any(norms > 0):
        return []
    u = _leading_patterns(centred, components)
    found = []
    for k in range(u.shape[1]):
        pattern = u[:, k]
        r = (pattern @ centred) / np.where(norms > 0, norms, np.inf)  # u[:, k] is centred and of unit norm
        a, b = np.flatnonzero(r >= membership), np.flatnonzero(r <= -membership)
        if len(a) and len(b):
            found.append((k, a, b, _correlation(delta[:, a].mean(axis=1), delta[:, b].mean(axis=1))))
    return found


def opposing_signals(ledger: Ledger, window: tuple[int, int] | None = None, candidates: int | None = None,
                     threshold: float = 0.01, min_anticorrelation: float = 0.5, membership: float = 0.5,
                     components: int = 3, permutations: int = 99, seed: int = 0) -> list[OpposingPair]:
    """Pairs of example groups whose losses oscillate against each other (Rosenfeld & Risteski 2024).

    Definition (dynlens's; the paper picks the groups by hand). Over the ledger's rows whose step
    lies in ``window`` ([start, stop); default all), with Δℓ_i(t) = ℓ_i(t) − ℓ_i(t−1):

    1. Candidates: the ``candidates`` examples with the largest Σ_t |Δℓ_i(t)|, together with the
       ``candidates`` largest Σ_{t ∈ spikes} |Δℓ_i(t)| over the loss-spike steps (those where the
       mean loss of all ledger examples rose). Default: N/5, at least 16 and at most 256.
    2. Pairing: the candidates' trajectories Δℓ_i(·), each centred over time, are decomposed
       into principal components (the time patterns u_k: left singular vectors). For each of
       the leading ``components`` patterns, group a holds the candidates whose trajectory
       correlates with u_k at r ≥ ``membership``, group b those at r ≤ −``membership`` (the
       sign of the component's loading, keeping only examples it describes well).
    3. Statistic: ρ = the Pearson correlation over time of the two groups' mean loss changes.
    4. Significance (a permutation test): steps 2–3 run again on the same candidates in
       ``permutations`` ledgers in which each candidate's Δℓ_i(·) is shuffled over time
       independently (NumPy generator seeded with ``seed``), which keeps every example's amount
       of movement and destroys only the timing the groups share; each shuffled ledger gives its
       most anti-correlated pair's ρ (0 when it has none). The split is as free to find
       anti-correlated groups in the shuffled ledgers as in the real one, so the test accounts
       for the selection (in 9 loss changes of independent random walks the split alone finds
       groups at ρ ≈ −0.9).
       p = (1 + #{shuffled ρ ≤ ρ}) / (1 + permutations). A pair is reported when p ≤
       ``threshold`` (default 0.01: 99 permutations, none as anti-correlated as the pair) and
       ρ ≤ −``min_anticorrelation`` (default −0.5: an oscillation, not a weak tendency), most
       anti-correlated first; a pair sharing more than half its members with one reported
       before it (another component finding the same groups) is left out. A run whose losses
       only fall together reports none.

    Raises:
        ValueError: fewer than 2 candidates, no permutation, or ``membership`` outside (0, 1).

    Cost: no forward or backward pass; (1 + permutations) eigendecompositions of a Gram matrix
    of the (T − 1) × C candidates' changes (C ≤ 2·``candidates``), min(T − 1, C) on a side:
    10,000 examples × 1,000 steps with a planted pair took ~4 s on a shared two-core CPU.

    Returns:
        :class:`OpposingPair` list, possibly empty.
    """
    if (candidates is not None and candidates < 2) or permutations < 1 or not 0 < membership < 1:
        raise ValueError(f"opposing_signals needs candidates >= 2 (got {candidates}), permutations >= 1 "
                         f"(got {permutations}) and 0 < membership < 1 (got {membership})")
    view = ledger.window(window)
    t, n = view.loss.shape
    if t < 4 or n < 2:
        return []
    loss = view.loss.astype(np.float64)
    delta = np.diff(loss, axis=0)
    finite = np.all(np.isfinite(delta), axis=0)
    count = candidates if candidates is not None else min(256, max(16, n // 5))
    pool = np.flatnonzero(finite)
    chosen = pool[_candidates(delta[:, pool], delta[:, pool].mean(axis=1), count)]
    found = _pairs(delta[:, chosen], components, membership)
    found = [f for f in found if f[3] <= -min_anticorrelation]
    if not found:
        return []
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    moved = delta[:, chosen]
    for j in range(permutations):
        shuffled = rng.permuted(moved, axis=0)  # each candidate's column on its own
        null[j] = min((f[3] for f in _pairs(shuffled, components, membership)), default=0.0)
    mean_input = view.inputs.mean(axis=0) if view.inputs is not None else None
    pairs: list[OpposingPair] = []
    reported: list[set[int]] = []
    for k, a, b, rho in sorted(found, key=lambda f: f[3]):
        p = (1 + int(np.sum(null <= rho))) / (1 + permutations)
        members = set(np.concatenate([a, b]).tolist())
        if p > threshold or any(len(members & before) > len(members) / 2 for before in reported):
            continue
        reported.append(members)
        ia, ib = chosen[a], chosen[b]
        da, db = delta[:, ia].mean(axis=1), delta[:, ib].mean(axis=1)
        gap = np.abs(da - db)
        opposite = (da * db < 0) & (gap > np.median(gap))
        signals: list[np.ndarray | None] = [None, None, None]
        if mean_input is not None and view.inputs is not None:
            signals = [(view.inputs[idx].mean(axis=0) - mean_input).astype(np.float32)
                       for idx in (ia, ib, np.concatenate([ia, ib]))]
        pairs.append(OpposingPair(
            group_a=view.example_ids[ia], group_b=view.example_ids[ib], correlation=rho, p_value=p,
            steps=view.steps, loss_a=loss[:, ia].mean(axis=1), loss_b=loss[:, ib].mean(axis=1),
            labels_a=_histogram(view.labels[ia]), labels_b=_histogram(view.labels[ib]),
            oscillation_steps=view.steps[1:][opposite], input_signal_a=signals[0], input_signal_b=signals[1],
            shared_input_signal=signals[2], component=k, **_along_top(view.along_top, ia, ib)))
    return pairs


def _along_top(along: np.ndarray | None, ia: np.ndarray, ib: np.ndarray) -> dict[str, float | None]:
    """The pair's :class:`OpposingPair` ``along_top_*`` fields from the ledger's ⟨∇ℓ_i, v⟩."""
    empty: dict[str, float | None] = {"along_top_a": None, "along_top_b": None, "along_top_agreement": None}
    if along is None:
        return empty
    a, b = along[:, ia].astype(np.float64), along[:, ib].astype(np.float64)
    measured = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if not measured.any() or not len(ia) or not len(ib):
        return empty
    a, b = a[measured], b[measured]
    # v's sign is arbitrary at each measurement: orient each step so that group a's mean is the larger
    sign = np.where(a.mean(axis=1) >= b.mean(axis=1), 1.0, -1.0)[:, None]
    a, b = a * sign, b * sign
    agree = (np.count_nonzero(a > 0) + np.count_nonzero(b < 0)) / (a.size + b.size)
    return {"along_top_a": float(a.mean()), "along_top_b": float(b.mean()), "along_top_agreement": float(agree)}


def _histogram(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


# ----------------------------------------------------------------------------- dataset cartography


@dataclass(frozen=True)
class DataMap:
    """Dataset cartography and forgetting of the ledger's examples (:func:`data_map`).

    Attributes (each (N,), in the ledger's example order):
        example_ids, labels: as in the :class:`Ledger`.
        confidence: mean over the window's steps of p(y_i), float64 in [0, 1].
        variability: standard deviation over those steps of p(y_i) (population, ddof 0), in [0, 0.5].
        correctness: the fraction of those steps at which the example is predicted correctly.
        forgetting: the number of forgetting events, steps at which the example went from
            correct to wrong since the previous row (Toneva et al. 2019), int64.
        never_learned: whether the example was never predicted correctly in the window (Toneva
            et al. rank these above every forgotten example: infinitely forgotten).
        region: "easy", "hard" or "ambiguous" (:func:`data_map` gives the cut-offs).
    """

    example_ids: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    variability: np.ndarray
    correctness: np.ndarray
    forgetting: np.ndarray
    never_learned: np.ndarray
    region: np.ndarray

    def region_counts(self) -> dict[str, int]:
        """Examples per region, in :data:`REGIONS` order."""
        return {name: int(np.sum(self.region == name)) for name in REGIONS}

    def most_forgotten(self, k: int | None = None) -> np.ndarray:
        """Example ids ranked by forgetting, Toneva et al.'s convention: never-learned examples
        first, then by the number of forgetting events, ties by lower confidence; the first ``k``."""
        order = np.lexsort((self.confidence, -self.forgetting, ~self.never_learned))
        return self.example_ids[order[:k]]

    def to_dataframe(self) -> Any:
        """The map as a pandas DataFrame, one row per example (needs pandas)."""
        import pandas as pd

        return pd.DataFrame({"example": self.example_ids, "label": self.labels, "confidence": self.confidence,
                             "variability": self.variability, "correctness": self.correctness,
                             "forgetting": self.forgetting, "never_learned": self.never_learned,
                             "region": self.region})


def data_map(ledger: Ledger, window: tuple[int, int] | None = None, confidence_cut: float = 0.5,
             variability_cut: float = 0.25) -> DataMap:
    """The data map of the ledger's examples over the steps in ``window`` ([start, stop); default all).

    Per example i over the window's T steps: confidence = (1/T) Σ_t p(y_i)(t), variability =
    the standard deviation of p(y_i)(t), correctness = the fraction of steps correct
    (Swayamdipta et al. 2020, §2); forgetting events = #{t : correct at t−1, wrong at t}
    (Toneva et al. 2019, counted between consecutive ledger rows: a sparse ledger misses
    flips between its rows).

    Regions (Swayamdipta et al. name them on the map; their cut-offs were percentiles, these are
    fixed so maps of different runs compare): **ambiguous** when variability ≥
    ``variability_cut`` (0.25, half the largest possible standard deviation of a probability:
    p(y) swings over a quarter of its range), otherwise **easy** when
    confidence ≥ ``confidence_cut`` (0.5) and **hard** when below it.

    Cost: no forward or backward pass; O(T·N).

    Raises:
        ValueError: an empty window, or a ledger without p(y) (not classification).
    """
    view = ledger.window(window)
    if view.loss.shape[0] == 0:
        raise ValueError(f"the window {window} holds no ledger step (steps {ledger.steps.min(initial=0)}.."
                         f"{ledger.steps.max(initial=0)})")
    p = view.p_y.astype(np.float64)
    if np.all(np.isnan(p)):
        raise ValueError("the ledger holds no p(y): the data map needs class logits and integer targets")
    confidence, variability = np.nanmean(p, axis=0), np.nanstd(p, axis=0)
    correct = view.correct
    forgetting = np.sum(correct[:-1] & ~correct[1:], axis=0).astype(np.int64)
    region = np.where(variability >= variability_cut, "ambiguous",
                      np.where(confidence >= confidence_cut, "easy", "hard"))
    return DataMap(view.example_ids, view.labels, confidence, variability, correct.mean(axis=0), forgetting,
                   ~correct.any(axis=0), region)
