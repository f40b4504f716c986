"""A run in TensorBoard: its scalars as scalar plots, its arrays (spectra, per-layer values,
per-example losses) as histograms over steps.

Two ways, both writing the same events:

* afterwards, from a stored run: :func:`export_tensorboard` (``dynlens export RUN --tensorboard DIR``);
* live, while training: ``dl.Lens(..., tensorboard_dir=DIR)``, which wraps the Lens's run writer in a
  :class:`TensorBoardTee`: every scalar and array the Lens stores is also written to TensorBoard.

Tags are ``probe/name`` as in the run database (``hessian/sharpness``, ``train/loss``,
``coherence/gsnr_per_layer``); steps are the run's steps (0 is the state before training). Every
array becomes a histogram of its finite values under its own tag; a spectral density
(``density_nodes`` with ``density_weights``, the Hessian probe's SLQ density) is also written as
one histogram, ``probe/density``, whose bucket counts are the density's weights. Scalars are stored
by TensorBoard as float32.

Events are written with PyTorch's own ``torch.utils.tensorboard.SummaryWriter``: torch is already a
dependency, so the only extra is the ``tensorboard`` package (``pip install dynlens[tensorboard]``),
and its background thread writes the event file: a live scalar costs the main thread tens of
microseconds (building its record and queueing it), an array's histogram a little more. This module imports TensorBoard only when it
writes: ``import dynlens`` never does.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dynlens.store import Run, RunWriter

__all__ = ["export_tensorboard", "TensorBoardTee", "require_tensorboard", "INSTALL_HINT"]

INSTALL_HINT = "pip install dynlens[tensorboard]"

#: buckets of every histogram (TensorBoard's own summary API uses 30)
BINS = 30


def require_tensorboard() -> type:
    """PyTorch's ``SummaryWriter`` class; ImportError saying what to install when the
    ``tensorboard`` package is missing (or too old for this torch)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            f"writing TensorBoard events needs the tensorboard package ({err}); install it with "
            f"`{INSTALL_HINT}` (or `pip install tensorboard`)"
        ) from err
    return SummaryWriter


def _finite(value: Any) -> np.ndarray:
    """The finite entries of an array, flattened, as float64."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    return flat[np.isfinite(flat)]


class _Events:
    """Writes dynlens records to one ``SummaryWriter``: the tag scheme and the histograms,
    shared by the export and the live tee so that both write the same events."""

    def __init__(self, summary: Any) -> None:
        self.summary = summary
        self._density: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # probe -> (step, parts)

    def scalar(self, step: int, probe: str, name: str, value: float) -> None:
        self.summary.add_scalar(f"{probe}/{name}", float(value), global_step=int(step))

    def array(self, step: int, probe: str, name: str, value: Any) -> None:
        self._histogram(step, f"{probe}/{name}", _finite(value))
        if name in ("density_nodes", "density_weights"):
            held_step, parts = self._density.get(probe, (step, {}))
            if held_step != step:
                parts = {}
            parts[name] = np.asarray(value, dtype=np.float64).reshape(-1)
            self._density[probe] = (step, parts)
            if len(parts) == 2:
                del self._density[probe]
                self._spectral_density(step, probe, parts["density_nodes"], parts["density_weights"])

    def _spectral_density(self, step: int, probe: str, nodes: np.ndarray, weights: np.ndarray) -> None:
        if nodes.shape != weights.shape:
            return
        keep = np.isfinite(nodes) & np.isfinite(weights) & (weights >= 0)
        if weights[keep].sum() > 0:
            self._histogram(step, f"{probe}/density", nodes[keep], weights[keep])

    def _histogram(self, step: int, tag: str, values: np.ndarray,
                   weights: np.ndarray | None = None) -> None:
        """A histogram of ``BINS`` equal buckets over the values' range (``weights``: the bucket
        counts are sums of weights). Binned here, not by ``SummaryWriter.add_histogram``, whose
        default bins (about 1,500 exponential ones, then compressed) took twice as long on a
        1,000-value array."""
        if not values.size:
            return
        counts, edges = np.histogram(values, bins=BINS, weights=weights)
        w = np.ones_like(values) if weights is None else weights
        self.summary.add_histogram_raw(
            tag, min=float(values.min()), max=float(values.max()), num=float(w.sum()),
            sum=float((w * values).sum()), sum_squares=float((w * values**2).sum()),
            bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=int(step))


def export_tensorboard(run_or_path: Run | str | os.PathLike[str],
                       logdir: str | os.PathLike[str]) -> Path:
    """Write a stored run to TensorBoard event files in ``logdir``; return ``logdir``.

    Every scalar becomes a scalar event and every array a histogram, tagged ``probe/name`` at
    the run's steps (see the module's docstring). Open with ``tensorboard --logdir DIR``. Each
    export adds a new event file: export into a fresh directory (one per run, e.g.
    ``tb/<run name>``) so that TensorBoard does not show a run twice. Works on a run that is
    still being written (as it stands at its last committed step).

    Raises:
        ImportError: the ``tensorboard`` package is not installed (``pip install dynlens[tensorboard]``).
        dynlens.RunError: ``run_or_path`` is not a readable run.
    """
    from dynlens.store import Run, load_run

    summary_writer = require_tensorboard()
    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    logdir = Path(logdir)
    summary = summary_writer(log_dir=str(logdir), max_queue=1000)
    try:
        events = _Events(summary)
        for probe in run.probes():
            for row in run.scalars(probe).itertuples(index=False):
                events.scalar(row.step, row.probe, row.name, row.value)
            # step by step across the probe's arrays, as the Lens writes them (a density's
            # nodes and weights of one step pair up)
            arrays = [(step, name, value) for name in run.array_names(probe)
                      for step, value in run.arrays(probe, name)]
            arrays.sort(key=lambda item: item[0])
            for step, name, value in arrays:
                events.array(step, probe, name, value)
    finally:
        summary.close()
        if run is not run_or_path:
            run.close()
    return logdir


class TensorBoardTee:
    """A run writer that also writes to TensorBoard: ``Lens(..., tensorboard_dir=DIR)`` wraps
    its :class:`~dynlens.store.RunWriter` in one.

    Every call goes to the run writer first, unchanged; ``scalar``, ``step_scalar`` and ``array``
    are then also written to TensorBoard (values that reach a run writer are host values
    already: nothing here waits for the GPU). TensorBoard is a copy, never the record: an error
    writing it (a full disk, an unwritable directory) becomes an error event in the run, and
    TensorBoard output stops for the rest of the run; it never reaches training. Only a writer
    that writes the run gets an event file: under torch.distributed the ranks other than 0 hold
    a writer that writes nothing (:class:`dynlens.distributed.NullWriter`), and so do their tees.

    Args:
        writer: the run writer to wrap.
        logdir: the directory of TensorBoard's event files (created if missing).
        flush_secs: how often the event file is flushed, for a running TensorBoard to see it.

    Raises:
        ImportError: the ``tensorboard`` package is not installed (``pip install dynlens[tensorboard]``).
    """

    def __init__(self, writer: RunWriter, logdir: str | os.PathLike[str], flush_secs: int = 10) -> None:
        from dynlens.store import RunWriter

        summary_writer = require_tensorboard()  # a missing package is the caller's to fix: raise
        self._writer = writer
        self._events: _Events | None = None
        self.logdir = Path(logdir)
        if not isinstance(writer, RunWriter):
            return  # another rank's: rank 0 writes the run and its TensorBoard events
        try:
            # a long queue: a measurement's dozens of records never wait for the writer thread
            self._events = _Events(summary_writer(log_dir=str(self.logdir), flush_secs=flush_secs,
                                                  max_queue=1000))
        except Exception as err:  # noqa: BLE001 - TensorBoard must never stop the run
            self._failed(None, err)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        # everything else (path, closed, set_meta, event, array_labels, ...) is the run writer's
        return getattr(self._writer, name)

    def _guard(self, step: int | None, write: Callable[[_Events], None]) -> None:
        if self._events is None:
            return
        try:
            write(self._events)
        except Exception as err:  # noqa: BLE001 - TensorBoard must never stop the run
            self._failed(step, err)

    def _failed(self, step: int | None, err: BaseException) -> None:
        events, self._events = self._events, None
        self._writer.event(
            step, "error", None,
            f"writing TensorBoard events to {str(self.logdir)!r} failed"
            + (f" at step {step}" if step is not None else "")
            + f": {type(err).__name__}: {err}. TensorBoard output is off for the rest of the run; "
            "the run database is complete (dynlens export RUN --tensorboard DIR writes it again)",
            traceback.format_exc(),
        )
        if events is not None:
            try:
                events.summary.close()
            except Exception:  # noqa: BLE001, S110 - already failing: the event above says so
                pass

    def scalar(self, step: int, probe: str, name: str, value: float) -> None:
        self._writer.scalar(step, probe, name, value)
        self._guard(step, lambda e: e.scalar(step, probe, name, value))

    def step_scalar(self, step: int, probe: str, name: str, value: float) -> None:
        self._writer.step_scalar(step, probe, name, value)
        self._guard(step, lambda e: e.scalar(step, probe, name, value))

    def array(self, step: int, probe: str, name: str, value: np.ndarray) -> None:
        self._writer.array(step, probe, name, value)
        self._guard(step, lambda e: e.array(step, probe, name, value))

    def close(self) -> None:
        """Flush and close the event file, then the run writer."""
        try:
            self._guard(None, lambda e: e.summary.close())
            self._events = None
        finally:
            self._writer.close()
