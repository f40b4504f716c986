"""The dynlens command: demo, show and report end to end."""

from __future__ import annotations

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
                 probes=[Broken()]) as lens:
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
