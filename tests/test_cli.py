"""The dynlens command: demo, show and report end to end."""

from __future__ import annotations

import numpy as np
from helpers import write_run

import dynlens as dl
from dynlens.cli import main


def test_demo_writes_a_run_with_every_probe_and_its_report(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "30", "--run-dir", str(run_dir), "--quiet"]) == 0
    assert f"run: {run_dir}" in capsys.readouterr().out
    run = dl.load_run(run_dir)
    expected = {p.name for p in dl.probes.basic() + dl.probes.default()} | {"train"}
    assert expected <= set(run.probes())
    assert run.last_step == 30 and run.meta["status"] == "finished"
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert run.events().empty, run.events().message.tolist()


def test_demo_data_is_deterministic_and_balanced():
    from dynlens.demo import make_spirals

    x1, y1 = make_spirals(seed=3)
    x2, y2 = make_spirals(seed=3)
    assert x1.equal(x2) and y1.equal(y2)
    assert y1.bincount().min() > 150


def test_show_prints_steps_probes_latest_values_and_events(tmp_path, capsys):
    import torch
    from torch import nn

    class Broken(dl.Probe):
        name = "broken"

        def measure(self, ctx):
            raise ValueError("planted")

    model = nn.Linear(3, 2)
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, nn.CrossEntropyLoss(), batch, opt, run_dir=tmp_path, name="shown",
                 probes=[Broken()], budget=None) as lens:
        for _ in range(3):
            lens.step(loss=1.5)
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run      shown" in out and "last step 3" in out
    assert "loss=1.5000 (step 3)" in out
    assert "param_norm" in out and "events   4" in out and "planted" in out


def test_show_and_report_of_a_missing_run_exit_with_a_message(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "is not a dynlens run" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) != 0


def _write_run(path, costs=None):
    return write_run(path, 3, loss=1.0 / np.arange(1, 4), basic=False, name="costed", costs=costs)


def test_show_prints_what_each_probe_cost_after_the_findings(tmp_path, capsys):
    costs = {"budget": 0.05, "memory_budget": None, "wall_seconds": 40.0, "training_seconds": 36.0,
             "probe_seconds": 4.0,
             "probes": {"hessian": {"measurements": 5, "seconds": 3.0, "deferred": 12,
                                    "peak_memory": None, "products": 30},
                        "grad_norm": {"measurements": 20, "seconds": 1.0, "deferred": 0,
                                      "peak_memory": None, "products": None}}}
    assert main(["show", str(_write_run(tmp_path / "run", costs))]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("costs:   dynlens took 4.00 s of 40.00 s wall time (10.0%), budget 5.0%")
    assert start > next(i for i, line in enumerate(lines) if line.startswith("findings "))
    assert lines[start + 1:] == [
        "  hessian              5 measurements, 3.00 s, 7.5%, 12 deferred",
        "  grad_norm            20 measurements, 1.00 s, 2.5%, 0 deferred",
    ]


def test_show_counts_the_lens_own_time_in_what_dynlens_took(tmp_path, capsys):
    costs = {"budget": 0.05, "wall_seconds": 40.0, "probe_seconds": 3.0, "lens_seconds": 1.0,
             "probes": {"hessian": {"measurements": 5, "seconds": 3.0, "deferred": 2}}}
    assert main(["show", str(_write_run(tmp_path / "run", costs))]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("costs:   dynlens took 4.00 s of 40.00 s wall time (10.0%), budget 5.0%")
    assert lines[start + 1:] == [
        "  hessian              5 measurements, 3.00 s, 7.5%, 2 deferred",
        "  lens (bookkeeping)   1.00 s, 2.5%",
    ]


def test_show_of_an_unbudgeted_run_says_it_has_no_time_budget(tmp_path, capsys):
    costs = {"budget": None, "wall_seconds": 8.0, "probe_seconds": 2.0,
             "probes": {"hessian": {"measurements": 4, "seconds": 2.0, "deferred": 0}}}
    assert main(["show", str(_write_run(tmp_path / "run", costs))]) == 0
    out = capsys.readouterr().out
    assert "costs:   dynlens took 2.00 s of 8.00 s wall time (25.0%), no time budget\n" in out
    assert "  hessian              4 measurements, 2.00 s, 25.0%, 0 deferred\n" in out


def test_show_of_a_run_without_costs_prints_nothing_about_costs(tmp_path, capsys):
    assert main(["show", str(_write_run(tmp_path / "run"))]) == 0
    out = capsys.readouterr().out
    assert "latest values" in out and "findings " in out
    assert "costs" not in out and "deferred" not in out
