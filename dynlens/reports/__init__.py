"""Figures and the HTML report.

One matplotlib figure function per probe (each takes a Run, a run directory or a list of them,
and returns a Figure), registered for its probe's section of the report; :func:`report` writes
the self-contained HTML page::

    dl.reports.plot_loss("runs/exp1")
    dl.report(["runs/lr0.1", "runs/lr0.01"], out="compare.html")
"""

from dynlens.reports.basic import (
    plot_distance_from_init,
    plot_grad_norm,
    plot_loss,
    plot_param_norm,
    plot_per_layer,
    plot_update_size,
)
from dynlens.reports.coherence import (
    plot_coherence,
    plot_grad_norms,
    plot_noise_scale,
    plot_stiffness,
)
from dynlens.reports.hessian import plot_density, plot_sharpness, plot_trace
from dynlens.reports.html import Report, render_html, report
from dynlens.reports.ntk import (
    plot_kernel_alignment,
    plot_kernel_alignment_per_layer,
    plot_kernel_by_class,
    plot_kernel_eigenvalues,
    plot_kernel_motion,
    plot_kernel_spectra,
)
from dynlens.reports.opposing_signals import (
    plot_data_map,
    plot_opposing_groups,
    plot_opposing_inputs,
)
from dynlens.reports.registry import figure, figures_for
from dynlens.reports.softmax_collapse import (
    plot_attention_logits,
    plot_collapse,
    plot_margins,
    plot_nlm,
)
from dynlens.reports.weight_spectrum import plot_stable_rank, plot_top_singular_value

__all__ = [
    "report", "Report", "render_html", "figure", "figures_for",
    "plot_loss", "plot_grad_norm", "plot_param_norm", "plot_update_size",
    "plot_distance_from_init", "plot_per_layer",
    "plot_coherence", "plot_noise_scale", "plot_stiffness", "plot_grad_norms",
    "plot_sharpness", "plot_density", "plot_trace",
    "plot_top_singular_value", "plot_stable_rank",
    "plot_collapse", "plot_margins", "plot_nlm", "plot_attention_logits",
    "plot_opposing_groups", "plot_opposing_inputs", "plot_data_map",
    "plot_kernel_motion", "plot_kernel_alignment", "plot_kernel_alignment_per_layer", "plot_kernel_eigenvalues",
    "plot_kernel_spectra", "plot_kernel_by_class",
]
