"""What the Lightning and Hugging Face callbacks share: the Lens's settings, checked when the
callback is made, and the end of a run (close the Lens, write the report).

Imports neither Lightning nor transformers.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dynlens.batches import batch_size, slice_examples, split_batch
from dynlens.lens import Lens
from dynlens.probes.base import Probe

__all__ = ["LensSettings", "close_lens", "stop_lens", "data_parallel_group", "shard_of"]


def data_parallel_group() -> Any:
    """The default process group when this process is one of several data-parallel processes
    (``torch.distributed`` initialised with more than one process), else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def shard_of(batch: Any, group: Any) -> Any:
    """This rank's part of ``batch``: the examples split in contiguous shards, in rank order (so
    the shards, concatenated, are the whole batch, which is what every measurement over
    ``group`` measures)."""
    dist = torch.distributed
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    inputs, _ = split_batch(batch)
    n = batch_size(inputs)
    start, stop = n * rank // world, n * (rank + 1) // world
    return slice_examples(batch, start, stop)


class LensSettings:
    """The Lens's keyword arguments a callback was given, checked at once (not at the first
    training step), and the Lens they make once the trainer has a model and an optimizer."""

    def __init__(
        self,
        where: str,
        *,
        run_dir: str | os.PathLike[str] | None,
        probes: Sequence[Probe] | str | None,
        name: str | None,
        config: dict[str, Any] | None,
        budget: float | None,
        memory_budget: float | int | None,
        report: bool,
        report_out: str | os.PathLike[str] | None,
        lens_kwargs: dict[str, Any],
    ) -> None:
        self.where = where
        if isinstance(probes, str) and probes != "default":
            raise ValueError(f"{where}(probes=...) takes a list of probes, 'default' or None; got {probes!r}")
        if probes is not None and not isinstance(probes, str):
            if not isinstance(probes, Sequence):
                raise TypeError(f"{where}(probes=...) takes a list of probes, 'default' or None; "
                                f"got {type(probes).__name__}")
            for p in probes:
                if not isinstance(p, Probe):
                    raise TypeError(f"{where}(probes=...) must hold dl.Probe instances (e.g. "
                                    f"dl.probes.Hessian(every=100)); got {type(p).__name__}: {p!r}")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"{where}(config=...) takes a dict of your hyperparameters; got {type(config).__name__}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ValueError(f"{where}(budget=...) takes what the probes may add to training's wall time, as a fraction of it "
                             f"(a number > 0, e.g. 0.05) or None (every probe on schedule); got {budget!r}")
        if not isinstance(report, bool):
            raise TypeError(f"{where}(report=...) takes True or False; got {type(report).__name__}")
        from_trainer = sorted({"model", "optimizer"} & set(lens_kwargs))
        if from_trainer:
            raise TypeError(f"{where} takes no {' or '.join(from_trainer)}: the callback measures the "
                            "model the trainer trains, with the trainer's optimizer")
        known = _lens_keywords()
        unknown = sorted(set(lens_kwargs) - known)
        if unknown:
            raise TypeError(f"{where} got unknown keyword argument(s) {unknown}; it takes the Lens's "
                            f"keyword arguments ({', '.join(sorted(known))}) and report=, report_out=")
        self.run_dir = run_dir
        self.probes = list(probes) if probes is not None and not isinstance(probes, str) else probes
        self.name = name
        self.config = config
        self.budget = budget
        self.memory_budget = memory_budget
        self.report = report
        self.report_out = report_out
        self.lens_kwargs = dict(lens_kwargs)

    def lens(self, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], probe_batch: Any,
             optimizer: torch.optim.Optimizer | None) -> Lens:
        """A new Lens on ``model`` with these settings (measures step 0 now). In a data-parallel
        run (several processes; :func:`data_parallel_group`) every rank makes one over the
        default group with its shard of the probe batch, unless ``group=`` was given: the
        measurements are the whole probe batch's and rank 0 alone writes the run."""
        kwargs = dict(self.lens_kwargs)
        if "group" not in kwargs:
            group = data_parallel_group()
            if group is not None:
                kwargs["group"] = group
                probe_batch = shard_of(probe_batch, group)
        return Lens(model, loss_fn, probe_batch, optimizer=optimizer, run_dir=self.run_dir,
                    probes=self.probes, name=self.name, config=self.config, budget=self.budget,
                    memory_budget=self.memory_budget, **kwargs)


def _lens_keywords() -> set[str]:
    """The keyword arguments ``dl.Lens`` takes, less those the trainer supplies."""
    names = set(inspect.signature(Lens.__init__).parameters)
    return names - {"self", "model", "optimizer"}


def close_lens(lens: Lens | None, settings: LensSettings) -> str | None:
    """Close ``lens`` (final measurements) and, with ``report=True``, write its HTML report;
    return the report's path (None without one). A report that fails is a warning on stderr,
    never an error that ends training."""
    if lens is None:
        return None
    lens.close()
    group = getattr(lens, "group", None)
    if not settings.report or (group is not None and torch.distributed.get_rank(group) != 0):
        return None  # under torch.distributed rank 0 alone wrote the run
    import dynlens

    try:
        return str(dynlens.report(lens.run_dir, out=settings.report_out, quiet=True))
    except Exception as err:  # noqa: BLE001 - the run is on disk; the report can be made later
        print(f"dynlens: the report of {lens.run_dir} failed ({type(err).__name__}: {err}); "
              f"write it later with `dynlens report {lens.run_dir}`", file=sys.stderr)
        return None


def stop_lens(lens: Lens | None, exception: BaseException) -> None:
    """Training raised or was interrupted: record why, skip the final measurements, release the
    run (as ``with Lens(...)`` does)."""
    if lens is not None and not lens.closed:
        lens.__exit__(type(exception), exception, exception.__traceback__)

