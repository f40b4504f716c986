"""TensorBoard output: a run exported afterwards, and written live by the Lens, read back with
TensorBoard's own event reader, equal the run database; the CLI export; a missing package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sgd_steps, single_thread, tiny_problem  # noqa: F401 - single_thread: autouse

import dynlens as dl
from dynlens.cli import main

pytest.importorskip("tensorboard", reason="the TensorBoard integration needs `pip install dynlens[tensorboard]`")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from dynlens.integrations.tensorboard import export_tensorboard  # noqa: E402

STEPS = 4


def _probes() -> list[dl.Probe]:
    # the Hessian's eigenvalues and density (a spectrum), coherence's per-layer arrays
    return [dl.probes.Hessian(every=2, k=2, density=True, extras_every=1, density_runs=2,
                              density_iters=8),
            dl.probes.Coherence(every=2)]


def _train(run_dir: Path, **lens_kwargs) -> dl.Run:
    model, loss_fn, batch = tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, loss_fn, batch, optimizer=optimizer, run_dir=run_dir, probes=_probes(),
                 budget=None, **lens_kwargs) as lens:
        sgd_steps(model, loss_fn, batch, optimizer, lens, STEPS)
    return dl.load_run(run_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tb") / "run"
    _train(path).close()
    return path


def _read(logdir: Path) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _assert_matches_run(logdir: Path, run: dl.Run) -> None:
    """Every scalar of the run, at its steps, with its value (TensorBoard keeps float32); every
    array as a histogram at its steps, of its finite values; the density as one more."""
    events = _read(logdir)
    tags = events.Tags()
    scalars = run.scalars()
    assert not scalars.empty
    expected_tags = {f"{p}/{n}" for p, n in zip(scalars.probe, scalars.name)}
    assert set(tags["scalars"]) == expected_tags
    assert {"train/loss", "train/lr", "hessian/sharpness"} <= expected_tags
    for (probe, name), rows in scalars.groupby(["probe", "name"], sort=False):
        written = events.Scalars(f"{probe}/{name}")
        assert [e.step for e in written] == rows.step.tolist(), (probe, name)
        np.testing.assert_array_equal([e.value for e in written],
                                      rows.value.to_numpy().astype(np.float32), err_msg=f"{probe}/{name}")

    histograms = set(tags["histograms"])
    arrays = {(p, n) for p in run.probes() for n in run.array_names(p)}
    assert {p for p, _ in arrays} >= {"hessian", "coherence"}  # spectra and per-layer arrays
    for probe, name in arrays:
        stored = [(s, v) for s, v in run.arrays(probe, name) if np.isfinite(v.astype(float)).any()]
        if not stored:
            continue
        written = events.Histograms(f"{probe}/{name}")
        assert [e.step for e in written] == [s for s, _ in stored], (probe, name)
        for event, (_, value) in zip(written, stored):
            finite = value.astype(float)[np.isfinite(value.astype(float))]
            assert event.histogram_value.num == finite.size
            assert event.histogram_value.min == pytest.approx(finite.min())
            assert event.histogram_value.max == pytest.approx(finite.max())
    assert histograms >= {f"{p}/{n}" for p, n in arrays}
    density = events.Histograms("hessian/density")
    nodes = run.arrays("hessian", "density_nodes")
    assert [e.step for e in density] == [s for s, _ in nodes] and len(density) >= 2
    weights = dict(run.arrays("hessian", "density_weights"))
    for event, (step, value) in zip(density, nodes):
        assert event.histogram_value.num == pytest.approx(weights[step].sum())
        assert sum(event.histogram_value.bucket) == pytest.approx(weights[step].sum())
        assert event.histogram_value.max == pytest.approx(value.max())


def test_export_writes_every_scalar_and_array_of_the_run(run_dir, tmp_path):
    run = dl.load_run(run_dir)
    assert export_tensorboard(run, tmp_path / "tb") == tmp_path / "tb"
    _assert_matches_run(tmp_path / "tb", run)
    export_tensorboard(str(run_dir), tmp_path / "from_path")  # a path works as well as a Run
    _assert_matches_run(tmp_path / "from_path", run)


def test_live_lens_writes_what_the_run_stores(tmp_path):
    run = _train(tmp_path / "run", tensorboard_dir=tmp_path / "live")
    _assert_matches_run(tmp_path / "live", run)
    assert not (run.events().level == "error").any()


def test_cli_export(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert capsys.readouterr().out.strip() == f"tensorboard: {tmp_path / 'tb'}"
    _assert_matches_run(tmp_path / "tb", dl.load_run(run_dir))
    assert main(["export", str(tmp_path / "missing"), "--tensorboard", str(tmp_path / "x")]) == 2
    assert "is not a dynlens run" in capsys.readouterr().err


def test_missing_tensorboard_says_what_to_install(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install dynlens\[tensorboard\]"):
        export_tensorboard(run_dir, tmp_path / "tb")
    assert main(["export", str(run_dir), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert "pip install dynlens[tensorboard]" in err and "Traceback" not in err
    model, loss_fn, batch = tiny_problem()
    with pytest.raises(ImportError, match=r"pip install dynlens\[tensorboard\]"):
        dl.Lens(model, loss_fn, batch, run_dir=tmp_path / "run", tensorboard_dir=tmp_path / "live")
    assert not (tmp_path / "run").exists()  # refused before the run began: nothing to clean up
    assert not (tmp_path / "tb").exists() and not (tmp_path / "live").exists()


def test_a_tensorboard_error_is_an_event_never_an_exception_into_training(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    add_scalar = SummaryWriter.add_scalar

    def full_disk_at_step_3(self, tag, value, global_step=None, **kwargs):
        if global_step == 3:
            raise OSError(28, "No space left on device")
        return add_scalar(self, tag, value, global_step, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk_at_step_3)
    run = _train(tmp_path / "run", tensorboard_dir=tmp_path / "live")
    errors = run.events()[run.events().level == "error"]
    assert len(errors) == 1  # once: TensorBoard output stops, the run goes on
    assert "TensorBoard" in errors.message.iloc[0] and "No space left" in errors.message.iloc[0]
    assert run.meta["status"] == "finished" and run.last_step == STEPS
    assert run.series("train", "loss").index.tolist() == list(range(1, STEPS + 1))
    assert "at step 3" in errors.message.iloc[0] and errors.step.iloc[0] == 3
    assert [e.step for e in _read(tmp_path / "live").Scalars("train/loss")] == [1, 2]


def test_import_dynlens_never_imports_tensorboard():
    code = ("import sys, dynlens, dynlens.cli, dynlens.integrations.tensorboard; "
            "assert 'tensorboard' not in sys.modules and 'torch.utils.tensorboard' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_writer_that_writes_nothing_gets_no_event_file(tmp_path):
    from dynlens.integrations.tensorboard import TensorBoardTee

    calls = []

    class Silent:  # another rank's writer under torch.distributed: the tee passes calls on only
        path = tmp_path / "run"

        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))

    tee = TensorBoardTee(Silent(), tmp_path / "tb")
    tee.step_scalar(1, "train", "loss", 0.5)
    tee.array(1, "grad_norm", "per_layer", np.ones(3))
    tee.close()
    assert [c[0] for c in calls] == ["step_scalar", "array", "close"] and tee.path == tmp_path / "run"
    assert not (tmp_path / "tb").exists()
