"""Measurements over a batch split across the ranks of a ``torch.distributed`` process group.

Under data parallelism each rank holds a shard of the probe batch. Every measurement takes
``group=`` (a process group, or None: not distributed, no collective and no cost): each rank
passes its shard and every rank gets the value for the whole batch, the shards concatenated in
rank order. The reductions happen at the lowest layer that knows the sums:

* the mean loss, its gradient and curvature products (:class:`dynlens.functional.ModelFunction`)
  are the size-weighted sums over ranks of each shard's, ``L = Σ_r (m_r/m) L_r``, so that Lanczos,
  Hutch++ and SLQ see the whole batch's operator (every rank runs the same iteration on the same
  reduced vectors and draws the same random vectors from the same seed);
* per-example statistics are summed (coherence), gathered (NTK rows, margins, the loss ledger),
  or counted (softmax collapse).

The failure contract (the reason this module exists beside ``torch.distributed``): a rank that
raises inside a measurement while the others wait in a collective would leave them waiting
forever. So every collective dynlens makes is preceded by a *status* all-reduce of one integer
(MAX over ranks: 0 ok, else :data:`OVER_TIME`, :data:`WAITS_FOR_MEMORY`, :data:`OUT_OF_MEMORY`, :data:`FAILED`),
and every measurement runs inside :func:`lockstep`, which on leaving sends the rank's own
status through that same one-integer collective. A rank that fails therefore meets the others at
their next status collective (or at the end of the measurement): they all learn of the failure
there, raise :class:`PeerFailed`, and every rank leaves the measurement having made the same
collectives. The contract for code that makes collectives of its own inside a measurement (a
custom probe): make them through :func:`all_sum` / :func:`gather_rows` (or call
:func:`check_peers` before each one), and decide anything that changes which collectives run
(a time budget, an optional part) with :func:`decide`, so that every rank takes the same path.
A failure *inside* a collective itself (a broken connection, a rank that died) is not covered:
the process group's own ``timeout`` bounds the wait (pass ``timeout=`` to
``init_process_group``), after which the group is unusable, as ``torch.distributed`` says.

Iterative methods (Lanczos, Hutch++, SLQ) run on every rank on the same all-reduced vectors, and
the ranks stay in step because every rank computes the same numbers from them: the ranks must
run the same code on alike devices (the same kind of GPU), with the same seeds. The time budget
and the optional parts it gates are decided by rank 0 (:func:`decide`) for the same reason.

FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are sharded, so nothing that needs
the whole parameter vector in one place can run (curvature, per-example gradients, the NTK,
NLM alignment): :class:`dynlens.functional.ModelFunction` refuses such a model with a message
that says what to do. What calls the model's own forward (which gathers its parameters) works:
the loss ledger (:func:`dynlens.measures.opposing.ledger_entry`), softmax collapse, the basic
probes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["PeerFailed", "lockstep", "check_peers", "agreed_status", "status_of", "decide", "agree_min",
           "agree_mask", "agree_plan", "all_sum", "all_max", "weighted_sum", "gather_sizes", "gather_rows",
           "gather_examples", "failure_report", "rank", "world_size", "group_of", "is_sharded",
           "refuse_sharded", "NullWriter", "OK", "OVER_TIME", "WAITS_FOR_MEMORY", "OUT_OF_MEMORY",
           "FAILED"]

OK = 0
OVER_TIME = 1  # dynlens.budget.OverBudget: stopped at its deadline, every rank at the same product
WAITS_FOR_MEMORY = 2  # dynlens.budget.MemoryBudgetTooSmall: declined before allocating
OUT_OF_MEMORY = 3
FAILED = 4

_AGREED = "_dynlens_agreed"  # set on an exception once its status has been sent


class PeerFailed(RuntimeError):
    """Raised on a rank whose measurement went well when another rank's failed: the code is the
    worst status over the ranks (:data:`FAILED`, :data:`OUT_OF_MEMORY`, :data:`WAITS_FOR_MEMORY`)."""

    def __init__(self, code: int) -> None:
        what = {FAILED: "failed", OUT_OF_MEMORY: "ran out of memory",
                WAITS_FOR_MEMORY: "did not fit its memory allowance",
                OVER_TIME: "ran past its time budget"}.get(code, f"failed ({code})")
        super().__init__(f"the measurement {what} on another rank; every rank skips it")
        self.code = code
        setattr(self, _AGREED, code)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return 0 if group is None else _dist().get_rank(group)


def world_size(group: Any) -> int:
    """The number of ranks in ``group`` (1 without a group)."""
    return 1 if group is None else _dist().get_world_size(group)


def _device(group: Any, device: torch.device | None = None) -> torch.device:
    """Where the tensors of a collective on ``group`` must live: NCCL needs the current CUDA
    device, gloo takes the CPU (or the given device's tensors, copied through)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend:
        return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_int(group: Any, value: int) -> int:
    dist = _dist()
    flag = torch.tensor([value], dtype=torch.int64, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def check_peers(group: Any) -> None:
    """The status collective before each of dynlens's collectives: returns if every rank is
    well, else raises :class:`PeerFailed` (module docstring). No-op without a group."""
    if group is None:
        return
    code = _all_reduce_int(group, OK)
    if code != OK:
        raise PeerFailed(code)


def status_of(err: BaseException) -> int:
    """The status a rank sends for a measurement that raised ``err``."""
    from dynlens.budget import MemoryBudgetTooSmall, OverBudget
    from dynlens.functional import is_out_of_memory

    if isinstance(err, OverBudget):
        return OVER_TIME
    if isinstance(err, MemoryBudgetTooSmall):
        return WAITS_FOR_MEMORY
    if is_out_of_memory(err):
        return OUT_OF_MEMORY
    return FAILED


def agreed_status(err: BaseException) -> int | None:
    """The status every rank agreed on for ``err``, or None if it has not been sent yet."""
    return getattr(err, _AGREED, None)


@contextlib.contextmanager
def lockstep(group: Any) -> Iterator[None]:
    """Run a measurement so that it succeeds or fails on every rank together (module docstring).

    On a normal exit the rank sends "ok" and raises :class:`PeerFailed` if another rank failed;
    on an exception it sends its status (unless it was sent already, by a nested ``lockstep``
    or as a :class:`PeerFailed`) and re-raises. No-op without a group.
    """
    if group is None:
        yield
        return
    try:
        yield
    except Exception as err:  # an interrupt (KeyboardInterrupt, SystemExit) makes no collective
        if agreed_status(err) is None:
            code = _all_reduce_int(group, status_of(err))
            with contextlib.suppress(AttributeError, TypeError):
                setattr(err, _AGREED, code)
        raise
    code = _all_reduce_int(group, OK)
    if code != OK:
        raise PeerFailed(code)


def decide(group: Any, value: bool) -> bool:
    """Rank 0's ``value`` on every rank: for choices that change which collectives a measurement
    makes (an optional part that fits the time left on one rank but not on another)."""
    if group is None:
        return bool(value)
    check_peers(group)
    dist = _dist()
    flag = torch.tensor([1 if value else 0], dtype=torch.int64, device=_device(group))
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    return bool(flag.item())


def all_sum(tensor: Tensor, group: Any) -> Tensor:
    """Σ over ranks of ``tensor`` (a new tensor, on ``tensor``'s device and dtype)."""
    if group is None:
        return tensor
    check_peers(group)
    dist = _dist()
    device = _device(group, tensor.device)
    work = tensor.detach().to(device, copy=True).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(tensor.device)


def weighted_sum(tensor: Tensor, weight: float, group: Any) -> Tensor:
    """Σ_r w_r·t_r over ranks, with this rank's weight ``weight`` (shard size / batch size: the
    whole batch's mean from the shards' means)."""
    if group is None:
        return tensor
    return all_sum(tensor * weight, group)


def gather_sizes(size: int, group: Any) -> list[int]:
    """Every rank's ``size``, in rank order."""
    if group is None:
        return [size]
    check_peers(group)
    dist = _dist()
    device = _device(group)
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def gather_rows(tensor: Tensor, group: Any, sizes: list[int] | None = None) -> Tensor:
    """The rows (first dimension) of every rank's ``tensor`` concatenated in rank order, on every
    rank; the shards may hold different numbers of rows (``sizes``: every rank's, if known)."""
    if group is None:
        return tensor
    if sizes is None:
        sizes = gather_sizes(int(tensor.shape[0]), group)
    check_peers(group)
    dist = _dist()
    device = _device(group, tensor.device)
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.detach().to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]).to(tensor.device)


def gather_examples(tree: Any, group: Any) -> Any:
    """A batch's inputs (a tensor, tuple or dict of tensors whose first dimension indexes the
    examples) with every rank's examples, in rank order. Leaves that are not tensors with a
    batch dimension are taken from this rank as they are."""
    if group is None:
        return tree
    leaves, spec = tree_flatten(tree)
    gathered = [gather_rows(x, group) if isinstance(x, Tensor) and x.dim() > 0 else x for x in leaves]
    return tree_unflatten(gathered, spec)


def group_of(model: Any) -> Any:
    """The process group of a ``DistributedDataParallel``-wrapped model (its ``process_group``),
    or None for any other model (and when ``torch.distributed`` is not initialised)."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return getattr(model, "process_group", None) or dist.group.WORLD
    return None


def is_sharded(model: Any) -> bool:
    """True if FSDP2's ``fully_shard`` manages ``model`` or one of its submodules, or some
    parameter is a DTensor. (Between a forward and its reshard FSDP2 registers plain unsharded
    tensors as the parameters, whose storage it frees later: the module class tells, not the
    parameters' type.) Costs nothing where FSDP2 and DTensor were never imported (a model can
    only be sharded once they are; importing them would take seconds)."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    if kind is not None and any(isinstance(m, kind) for m in model.modules()):
        return True
    tensor = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor, "DTensor", None)
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def refuse_sharded(model: Any, what: str) -> None:
    """Raise a clear error for a measurement that needs every parameter in one place (second
    derivatives, per-example gradients) on a model whose parameters FSDP2 shards."""
    if is_sharded(model):
        raise ValueError(
            f"{what} needs the whole parameter vector on every rank, but this model's parameters "
            "are sharded by FSDP2 (fully_shard: DTensor parameters). Under FSDP2 the loss ledger "
            "(OpposingSignals), softmax collapse and the basic probes work; curvature (Hessian), "
            "gradient coherence, the NTK and NLM alignment do not. Measure those on a "
            "DistributedDataParallel or single-process copy of the model (e.g. load its full "
            "state dict into an unsharded module on one rank every few hundred steps)"
        )


def agree_min(group: Any, value: int | None) -> int | None:
    """The smallest ``value`` over the ranks (None stays None: every rank passes None or a
    number alike, e.g. a memory allowance, None on the CPU)."""
    if group is None or value is None:
        return value
    check_peers(group)
    dist = _dist()
    work = torch.tensor([int(value)], dtype=torch.int64, device=_device(group))
    dist.all_reduce(work, op=dist.ReduceOp.MIN, group=group)
    return int(work.item())


def agree_mask(group: Any, mask: list[bool]) -> list[bool]:
    """Rank 0's ``mask`` on every rank (which probes run now: the time budget is rank 0's)."""
    if group is None:
        return list(mask)
    check_peers(group)
    dist = _dist()
    work = torch.tensor([1 if m else 0 for m in mask], dtype=torch.int64, device=_device(group))
    dist.broadcast(work, src=dist.get_global_rank(group, 0), group=group)
    return [bool(v) for v in work.tolist()]


def agree_plan(group: Any, mask: list[bool], quiet: int) -> tuple[list[bool], int]:
    """Rank 0's ``mask`` (which probes run now) and ``quiet`` (the steps before the time budget
    can let any waiting probe through, during which no rank scans again: no collective at
    those steps) on every rank, in one broadcast."""
    if group is None:
        return list(mask), int(quiet)
    check_peers(group)
    dist = _dist()
    work = torch.tensor([1 if m else 0 for m in mask] + [int(quiet)], dtype=torch.int64,
                        device=_device(group))
    dist.broadcast(work, src=dist.get_global_rank(group, 0), group=group)
    values = work.tolist()
    return [bool(v) for v in values[:-1]], int(values[-1])


def failure_report(group: Any, err: BaseException | None, trace: str | None) -> tuple[str, str]:
    """After a measurement every rank agreed had failed: ``(message, traceback)`` of the first
    rank whose own code raised (not a :class:`PeerFailed`), gathered from every rank."""
    mine = None
    if err is not None and not isinstance(err, PeerFailed):
        mine = (rank(group), f"{type(err).__name__}: {err}", trace or "")
    everyone: list[Any] = [None] * world_size(group)
    _dist().all_gather_object(everyone, mine, group=group)
    for entry in everyone:
        if entry is not None:
            where, message, text = entry
            return f"{message} (on rank {where})", text
    return f"{type(err).__name__}: {err}", trace or ""


class NullWriter:
    """The run writer of a rank other than 0 under torch.distributed: rank 0 writes the run,
    the others measure (their collectives are needed) and write nothing."""

    def __init__(self, run_dir: Any) -> None:
        from pathlib import Path

        self.path = Path(run_dir)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def all_max(tensor: Tensor, group: Any) -> Tensor:
    """The elementwise maximum over ranks of ``tensor`` (a new tensor)."""
    if group is None:
        return tensor
    check_peers(group)
    dist = _dist()
    work = tensor.detach().to(_device(group, tensor.device), copy=True).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.MAX, group=group)
    return work.to(tensor.device)
