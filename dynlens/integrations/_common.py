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

from dynlens.lens import Lens
from dynlens.probes.base import Probe

__all__ = ["LensSettings", "close_lens", "stop_lens"]


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
            raise ValueError(f"{where}(budget=...) takes the share of wall time the probes may take "
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
        """A new Lens on ``model`` with these settings (measures step 0 now)."""
        return Lens(model, loss_fn, probe_batch, optimizer=optimizer, run_dir=self.run_dir,
                    probes=self.probes, name=self.name, config=self.config, budget=self.budget,
                    memory_budget=self.memory_budget, **self.lens_kwargs)


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
    if not settings.report:
        return None
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

