"""dynlens: probes that watch a PyTorch model train and say what its training dynamics are doing.

The public API is the names below (``dl.<name>``) and the subpackages ``dl.probes``,
``dl.reports``, ``dl.measures``, ``dl.linalg``, ``dl.remedies`` and ``dl.schedules``; the most used::

    import dynlens as dl
    lens = dl.Lens(model, loss_fn, probe_batch=(x, y), optimizer=opt, run_dir="runs/exp1")
    run = dl.load_run("runs/exp1")
"""

from __future__ import annotations

__version__ = "0.1.0"

from dynlens import (
    probes,
    remedies,
    schedules,
)
from dynlens.diagnose import Finding, diagnose
from dynlens.lens import Lens
from dynlens.measures.coherence import Coherence, gradient_coherence
from dynlens.measures.hessian import hessian_density, hessian_eigenvalues, hessian_trace
from dynlens.measures.ntk import empirical_ntk, kernel_distance, kernel_target_alignment
from dynlens.measures.softmax import Alignment, Collapse, nlm_alignment, softmax_collapse
from dynlens.probes import Context, Probe
from dynlens.rules.opposing_signals import data_map, opposing_signals
from dynlens.store import Run, RunError, RunInUseError, load_run


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook
    # The report stack (matplotlib, jinja2) loads on first use, not with `import dynlens`.
    if name in ("report", "reports"):
        import dynlens.reports

        return dynlens.reports.report if name == "report" else dynlens.reports
    raise AttributeError(f"module 'dynlens' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Lens",
    "Probe",
    "Context",
    "Run",
    "RunError",
    "RunInUseError",
    "load_run",
    "diagnose",
    "Finding",
    "report",
    "probes",
    "schedules",
    "gradient_coherence",
    "Coherence",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_density",
    "empirical_ntk",
    "kernel_distance",
    "kernel_target_alignment",
    "opposing_signals",
    "data_map",
    "softmax_collapse",
    "Collapse",
    "nlm_alignment",
    "Alignment",
    "remedies",
]
