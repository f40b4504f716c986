"""Figure functions: callable from a notebook with a run, a path or a list, with the shared look."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clean_loss, hessian_run, sharpening_then_eos, write_run
from matplotlib.figure import Figure

import dynlens as dl
from dynlens import reports
from dynlens.reports.registry import figures_for
from dynlens.reports.style import STEP_LABEL, downsample


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    loss = np.geomspace(3.0, 1e-3, 500)
    loss[300] = 1.0
    return write_run(tmp_path_factory.mktemp("f") / "run", steps=500, loss=loss)


@pytest.mark.parametrize("fn", [reports.plot_loss, reports.plot_grad_norm, reports.plot_param_norm,
                                reports.plot_update_size, reports.plot_distance_from_init])
def test_each_figure_takes_a_path_a_run_or_a_list(run_dir, fn):
    for arg in (str(run_dir), dl.load_run(run_dir), [run_dir, run_dir]):
        fig = fn(arg)
        assert isinstance(fig, Figure)
        assert fig.axes[-1].get_xlabel() == STEP_LABEL


def test_loss_spanning_decades_is_drawn_on_a_log_scale_with_finding_markers(run_dir):
    fig = reports.plot_loss(run_dir)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert "warning finding" in labels  # the spike at step 301


def test_steady_quantity_stays_linear(run_dir):
    assert reports.plot_grad_norm(run_dir).axes[0].get_yscale() == "linear"


def test_per_layer_view_draws_one_line_per_layer(run_dir):
    fig = reports.plot_per_layer(run_dir, "grad_norm")
    assert len(fig.axes[0].get_lines()) >= 3
    assert fig.axes[0].get_legend().get_title().get_text() == "layer"


def test_many_layers_become_a_heat_map(tmp_path):
    per_layer = {step: {"per_layer": np.geomspace(1, 1e-4, 40) * (step + 1)} for step in range(50)}
    run_dir = write_run(tmp_path / "deep", 49, basic=False, name="deep",
                        layers=[f"block{i}" for i in range(40)], measurements={"grad_norm": per_layer})
    fig = reports.plot_per_layer(run_dir, "grad_norm", findings=[])
    assert fig.axes[0].get_images()


def test_figures_of_a_run_without_the_probe_are_none(tmp_path):
    run_dir = write_run(tmp_path / "empty", 0, basic=False)
    assert reports.plot_grad_norm(run_dir, findings=[]) is None


def test_every_basic_probe_has_registered_figures():
    for probe in ("train", "grad_norm", "param_norm", "update_size", "distance_from_init"):
        assert figures_for(probe)


def test_downsampling_keeps_the_spike_and_the_bound():
    steps = np.arange(100_000)
    values = clean_loss(100_000)
    values[54_321] = 1e3
    x, y = downsample(steps, values)
    assert len(x) <= 2000 and y.max() == 1e3 and 54_321 in x
    assert np.all(np.diff(x) >= 0)


def test_figure_functions_leave_global_rcparams_alone(run_dir):
    import matplotlib

    before = dict(matplotlib.rcParams)
    reports.plot_loss(run_dir)
    assert dict(matplotlib.rcParams) == before


@pytest.mark.parametrize("name", ["plot_sharpness", "plot_density", "plot_trace"])
def test_hessian_figures_draw_one_and_several_runs(tmp_path, name):
    from dynlens.reports import hessian as figures

    a = hessian_run(tmp_path / "a", sharpening_then_eos(), lambda_min=[-0.1] * 27, density=True)
    b = hessian_run(tmp_path / "b", [1.0] * 27, density=True)
    fn = getattr(figures, name)
    assert fn([a]) is not None
    assert fn([a, b], []) is not None


def test_density_outliers_are_the_nodes_beyond_the_bulk():
    from dynlens.reports.hessian import density_outliers

    nodes = np.concatenate([np.linspace(-0.1, 0.1, 50), [3.0, 5.0]])
    weights = np.concatenate([np.full(50, 0.998 / 50), [0.001, 0.001]])
    assert density_outliers(nodes, weights).nonzero()[0].tolist() == [50, 51]
