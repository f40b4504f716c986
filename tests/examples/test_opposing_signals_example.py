"""examples/opposing_signals.py: the stored run's top opposing pair is the planted one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from helpers import single_thread  # noqa: F401  (autouse: one torch thread)

import dynlens as dl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "opposing_signals.py"


def test_the_planted_pair_is_recovered_from_the_run(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("opposing_signals_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["opposing_signals.py", "--steps", "200", "--out", str(tmp_path / "run")])
    module.main()
    pairs = dl.opposing_signals(tmp_path / "run")
    groups = sorted([sorted(pairs[0].group_a.tolist()), sorted(pairs[0].group_b.tolist())])
    assert groups == [list(range(20)), list(range(20, 40))]
    assert (tmp_path / "run" / "report.html").exists()
