"""Replaying a measurement's GPU kernels with CUDA graphs.

For small models a measurement on a GPU is bound by launching its kernels, not by running
them: hundreds of small kernels, each costing the host a few microseconds. A CUDA graph
records the kernels of one run and replays them with one launch. :class:`GraphCache` keeps the
graphs of the last few measurements, keyed by everything the recorded kernels depend on
(tensor addresses, shapes and dtypes, the model's structure, the measurement's options): a
later call with the same key copies its inputs into the graph's static input tensors and
replays. A measurement is recorded only when it is seen a second time with the same key (one-off
calls pay nothing), after a warm-up run on a side stream in which any operation that would
synchronise with the host raises (``torch.cuda.set_sync_debug_mode("error")``): such code
(``.item()``, data-dependent shapes) cannot be recorded, and that key is then never tried again.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphCache", "graphs", "clear_graphs", "sync_errors"]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    outputs: Any
    extra: Any


@contextlib.contextmanager
def sync_errors() -> Iterator[None]:
    """Make every CUDA operation that synchronises with the host raise, then restore the mode."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class GraphCache:
    """The CUDA graphs of the last ``capacity`` measurements, keyed by what they depend on.

    A caller first asks :meth:`replay`; on a miss it computes eagerly and calls :meth:`saw`, and
    when a key has been seen before, :meth:`record` records ``body`` (a function of a list of
    input tensors returning ``(outputs, extra)``: a pytree of output tensors and any Python value
    computed while it ran, remembered from the recorded run) and runs it. Replayed outputs are the
    graph's own tensors, rewritten at every replay: read them before the next call of that key.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.seen: OrderedDict[Hashable, None] = OrderedDict()
        self.failed: OrderedDict[Hashable, str] = OrderedDict()

    def clear(self) -> None:
        """Forget every graph (their memory goes back to PyTorch's allocator)."""
        self.entries.clear()
        self.seen.clear()
        self.failed.clear()

    def replay(self, key: Hashable, inputs: Sequence[Tensor]) -> tuple[Any, Any] | None:
        """``(outputs, extra)`` of the recorded graph of ``key`` on ``inputs``, or None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        for static, fresh in zip(entry.inputs, inputs, strict=True):
            static.copy_(fresh)
        entry.graph.replay()
        return entry.outputs, entry.extra

    def saw(self, key: Hashable) -> bool:
        """Note that ``key`` was computed eagerly; True if it had been seen before (and its
        recording never failed): the time to :meth:`record` it."""
        before = key in self.seen and key not in self.failed
        _remember(self.seen, key, 4 * self.capacity)
        return before

    def record(self, key: Hashable, inputs: Sequence[Tensor],
               body: Callable[[list[Tensor]], tuple[Any, Any]]) -> tuple[Any, Any] | None:
        """Record ``body`` on static copies of ``inputs`` and replay it: its ``(outputs, extra)``,
        or None (remembered: never tried again) if it cannot be recorded."""
        statics = [t.detach().clone() for t in inputs]
        try:
            entry = self._record(statics, body)
        except Exception as err:  # noqa: BLE001 - anything that cannot be recorded runs eagerly
            _remember(self.failed, key, 4 * self.capacity, f"{type(err).__name__}: {err}")
            return None
        _remember(self.entries, key, self.capacity, entry)
        entry.graph.replay()
        return entry.outputs, entry.extra

    @staticmethod
    def _record(statics: list[Tensor], body: Callable[[list[Tensor]], tuple[Any, Any]]) -> _Entry:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), sync_errors():
            body(statics)  # warm-up: lazy initialisations, autograd's streams; a sync raises here
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs, extra = body(statics)
        return _Entry(graph, statics, outputs, extra)


def _remember(table: OrderedDict, key: Hashable, capacity: int, value: Any = None) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > capacity:
        table.popitem(last=False)


# The graphs of the measurements (dynlens.measures stays stateless: the cache lives here, like
# functional's choice of the fastest Hessian-vector product). Two graphs at most.
_CACHE = GraphCache(capacity=2)


def graphs() -> GraphCache:
    """The cache of recorded measurements that every measurement shares."""
    return _CACHE


def clear_graphs() -> None:
    """Free every recorded measurement's CUDA graph (and the GPU memory it holds)."""
    _CACHE.clear()
