"""dl.probes.WeightSpectrum in a Lens: labelled arrays, its rule, its figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import sgd_steps, tiny_problem
from torch import nn

import dynlens as dl
from dynlens.probes.base import Labelled
from dynlens.store import RunWriter


def test_the_probe_records_each_matrix_labelled_by_its_parameter_name(tmp_path):
    model, loss_fn, batch = tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, loss_fn, batch, optimizer, run_dir=tmp_path, basic=False, budget=None,
                 probes=[dl.probes.WeightSpectrum(every=2)]) as lens:
        sgd_steps(model, loss_fn, batch, optimizer, lens, 4)
    run = dl.load_run(tmp_path)
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert run.array_labels("weight_spectrum", "top_singular_value") == names
    assert run.array_labels("weight_spectrum", "stable_rank") == names
    step, last = run.arrays("weight_spectrum", "top_singular_value")[-1]
    assert step == 4
    exact = [float(torch.linalg.svdvals(p.detach().double())[0]) for n, p in model.named_parameters() if n in names]
    np.testing.assert_allclose(last, exact, rtol=1e-6)
    assert run.series("weight_spectrum", "max_singular_value")[4] == pytest.approx(max(exact), rel=1e-6)
    for draw in (dl.reports.plot_top_singular_value, dl.reports.plot_stable_rank):
        fig = draw(run)
        assert fig is not None and [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == names


def test_weight_spectrum_is_a_default_probe():
    assert "weight_spectrum" in [p.name for p in dl.probes.default()]


def test_labels_must_be_one_per_entry_and_an_unlabelled_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="one label per entry"):
        Labelled(np.zeros(3), ("a", "b"))
    with pytest.raises(ValueError, match="strings"):
        Labelled(np.zeros(2), (1, 2))  # type: ignore[arg-type]
    writer = RunWriter(tmp_path)
    writer.set_meta({"layers": ["0", "2"]})
    for step in (0, 1):
        writer.array(step, "grad_norm", "per_layer", np.ones(3))  # three entries, two layers
    writer.close()
    with pytest.raises(ValueError, match="must carry its own labels"):
        dl.reports.plot_per_layer(dl.load_run(tmp_path), "grad_norm")


def test_labels_are_stored_when_they_change_and_read_back_by_step(tmp_path):
    writer = RunWriter(tmp_path)
    writer.array_labels(0, "p", "x", ["a", "b"])
    writer.array_labels(5, "p", "x", ["a", "b"])  # unchanged: nothing new stored
    writer.array_labels(9, "p", "x", ["c"])
    writer.close()
    run = dl.load_run(tmp_path)
    assert run.meta["array_labels"] == {"p": {"x": [[0, ["a", "b"]], [9, ["c"]]]}}
    assert run.array_labels("p", "x", step=8) == ["a", "b"]
    assert run.array_labels("p", "x") == ["c"]
    assert run.array_labels("p", "y") is None


def _planted_run(path, collapse: bool):
    writer = RunWriter(path)
    for step in range(0, 60, 10):
        falling = 8.0 * (0.5 ** (step / 10)) if collapse else 8.0 - 0.1 * step / 10
        writer.array(step, "weight_spectrum", "stable_rank", np.array([falling + 1e-9, 5.0]))
        writer.array_labels(step, "weight_spectrum", "stable_rank", ["encoder.weight", "head.weight"])
    writer.close()
    return dl.load_run(path)


def test_the_collapse_rule_fires_on_a_planted_collapse_and_names_the_matrix(tmp_path):
    found = [f for f in dl.diagnose(_planted_run(tmp_path / "a", collapse=True)) if f.rule == "stable_rank_collapse"]
    assert len(found) == 1
    finding = found[0]
    assert finding.evidence["matrix"] == "encoder.weight" and finding.probe == "weight_spectrum"
    assert finding.steps == (0, 50) and finding.evidence["fraction"] <= 0.25
    quiet = [f for f in dl.diagnose(_planted_run(tmp_path / "b", collapse=False)) if f.rule == "stable_rank_collapse"]
    assert quiet == []


def test_the_probe_never_runs_the_model():
    calls = []
    model = nn.Linear(4, 3)
    model.register_forward_hook(lambda *args: calls.append(1))
    ctx = dl.probes.Context(model=model, loss_fn=nn.MSELoss(), probe_batch=(torch.zeros(2, 4), torch.zeros(2, 3)),
                            optimizer=None, step=0)
    values = dl.probes.WeightSpectrum().measure(ctx)
    assert calls == [] and isinstance(values["stable_rank"], Labelled)
