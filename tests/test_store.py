"""The run database: round trips, NaN, no pickle, concurrent reading, and clear errors."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import dynlens as dl
from dynlens.store import Run, RunWriter, decode_array


def test_scalars_arrays_events_and_meta_round_trip(tmp_path):
    w = RunWriter(tmp_path)
    w.set_meta({"name": "r", "config": {"lr": 0.1, "nested": {"a": [1, 2]}}})
    w.scalar(0, "p", "x", 1.5)
    w.scalar(1, "p", "x", float("nan"))
    w.scalar(2, "p", "x", float("inf"))
    w.array(1, "p", "m", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.array(2, "p", "i", np.array([1, 2, 3], dtype=np.int64))
    w.event(1, "error", "p", "boom", "Traceback ...")
    w.commit()
    run = dl.load_run(tmp_path)
    s = run.series("p", "x")
    assert s[0] == 1.5 and np.isnan(s[1]) and s[2] == np.inf
    (step, m), = run.arrays("p", "m")
    assert step == 1 and m.dtype == np.float32 and m.shape == (2, 3) and m[1, 2] == 5
    assert run.arrays("p", "i")[0][1].tolist() == [1, 2, 3]
    assert run.events().message.tolist() == ["boom"]
    assert run.config == {"lr": 0.1, "nested": {"a": [1, 2]}}
    assert run.scalars().columns.tolist() == ["step", "probe", "name", "value"]
    assert run.probes() == ["p"]
    w.close()


def test_a_reader_sees_each_commit_while_the_writer_is_open(tmp_path):
    w = RunWriter(tmp_path)
    run = dl.load_run(tmp_path)
    for step in range(3):
        w.scalar(step, "p", "x", float(step))
        assert len(run.series("p", "x")) == step  # not yet committed
        w.commit()
        assert len(run.series("p", "x")) == step + 1
    w.close()
    assert run.last_step == 2


def test_arrays_of_object_dtype_cannot_be_decoded():
    with pytest.raises(dl.RunError, match="unsupported dtype"):
        decode_array("object", "[1]", b"\x00" * 8)


def test_a_path_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(dl.RunError, match="is not a dynlens run"):
        dl.load_run(tmp_path)


def test_an_unknown_schema_version_is_a_clear_error(tmp_path):
    w = RunWriter(tmp_path)
    w.set_meta({"schema_version": 99})
    w.close()
    with pytest.raises(dl.RunError, match="schema version 99"):
        dl.load_run(tmp_path)


def test_a_damaged_database_is_a_clear_error_not_an_sqlite_traceback(tmp_path):
    w = RunWriter(tmp_path / "run")
    for step in range(200):
        w.scalar(step, "p", "x", float(step))
    w.close()
    db = tmp_path / "run" / "dynlens.sqlite"
    db.write_bytes(db.read_bytes()[:600])
    with pytest.raises(dl.RunError) as info:
        dl.load_run(tmp_path / "run").scalars()
    assert not isinstance(info.value, sqlite3.Error)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "dynlens.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(dl.RunError, match="damaged, truncated or not a run"):
        dl.load_run(tmp_path / "junk")


def test_a_relative_run_path_opens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = RunWriter("runs/rel")
    w.scalar(1, "p", "x", 2.0)
    w.close()
    assert dl.load_run("runs/rel").series("p", "x")[1] == 2.0


def test_step_scalars_go_to_the_step_log_and_read_back_merged_with_scalars(tmp_path):
    w = RunWriter(tmp_path)
    for step in range(1, 6):
        w.step_scalar(step, "train", "loss", 1.0 / step)
        w.step_scalar(step, "train", "lr", float("nan") if step == 3 else 0.1)
        if step % 2 == 0:
            w.scalar(step, "train", "other", 7.0)
        w.commit()
    run = dl.load_run(tmp_path)
    assert run.series("train", "loss").tolist() == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert np.isnan(run.series("train", "lr")[3])
    frame = run.scalars("train")
    assert frame.step.is_monotonic_increasing and len(frame) == 12
    assert set(run.scalar_names("train")) == {"loss", "lr", "other"}
    assert run.probes() == ["train"] and run.last_step == 5
    w.close()


def test_a_cut_short_step_log_record_and_an_uncommitted_name_are_left_out(tmp_path):
    w = RunWriter(tmp_path)
    w.step_scalar(1, "train", "loss", 2.0)
    w.commit()
    w.close()
    log = tmp_path / "steps.bin"
    whole = log.read_bytes()
    # a record whose name index was never committed, then half a record (killed mid-write)
    log.write_bytes(whole + whole[:8] + (7).to_bytes(4, "little") + whole[12:20] + whole[:9])
    run = dl.load_run(tmp_path)
    assert run.series("train", "loss").to_dict() == {1: 2.0}
    assert run.last_step == 1


def test_a_stale_step_log_beside_no_database_is_not_read_into_a_new_run(tmp_path):
    (tmp_path / "steps.bin").write_bytes(b"\x01" * 200)
    w = RunWriter(tmp_path)
    w.step_scalar(1, "train", "loss", 3.0)
    w.close()
    assert dl.load_run(tmp_path).scalars().values.tolist() == [[1, "train", "loss", 3.0]]


def test_a_closed_run_is_one_file_and_reading_it_leaves_no_journal_files(tmp_path):
    w = RunWriter(tmp_path)
    w.scalar(0, "p", "x", 1.0)
    w.close()
    journal = [tmp_path / "dynlens.sqlite-wal", tmp_path / "dynlens.sqlite-shm"]
    assert not any(f.exists() for f in journal)
    run = dl.load_run(tmp_path)
    assert run.series("p", "x").tolist() == [1.0]
    run.close()
    assert not any(f.exists() for f in journal)


def test_closing_while_a_reader_is_open_loses_nothing(tmp_path):
    w = RunWriter(tmp_path)
    run = dl.load_run(tmp_path)
    w.scalar(0, "p", "x", 2.0)
    w.close()  # the reader may keep the database in WAL mode: no error, and the data is there
    assert run.series("p", "x").tolist() == [2.0]
    run.close()
    assert dl.load_run(tmp_path).series("p", "x").tolist() == [2.0]


def _logged_run(path):
    w = RunWriter(path)
    for step in range(1, 4):
        w.step_scalar(step, "train", "loss", 1.0 / step)
        w.scalar(step, "p", "x", float(step))
        w.commit()
    w.close()
    return dl.load_run(path)


def test_probes_and_last_step_read_the_step_log_once_until_refresh(tmp_path, monkeypatch):
    run = _logged_run(tmp_path)

    def read_everything():
        assert run.probes() == ["p", "train"] and run.last_step == 3
        assert run.scalar_names("train") == ["loss"] and len(run.series("train", "loss")) == 3

    read_everything()
    reads, queries = [], []
    read_step_log, query = Run._read_step_log, Run._query
    monkeypatch.setattr(Run, "_read_step_log", lambda self: reads.append(1) or read_step_log(self))
    monkeypatch.setattr(Run, "_query", lambda self, sql, params=(): queries.append(sql) or query(self, sql, params))
    for _ in range(3):
        read_everything()
    assert reads == []
    assert set(queries) == {"PRAGMA data_version"}  # the check that nothing was committed since
    run.refresh()
    assert run.probes() == ["p", "train"] and reads == [1]


def test_what_the_writer_commits_later_is_seen_without_refresh(tmp_path):
    w = RunWriter(tmp_path)
    w.step_scalar(1, "train", "loss", 1.0)
    w.commit()
    run = dl.load_run(tmp_path)
    assert run.probes() == ["train"] and run.last_step == 1
    w.step_scalar(2, "train", "loss", 0.5)
    w.commit()
    assert run.last_step == 2 and run.series("train", "loss").tolist() == [1.0, 0.5]
    w.scalar(3, "p", "x", 1.0)
    w.commit()
    assert run.probes() == ["p", "train"] and run.last_step == 3
    w.close()


def test_a_series_changed_by_its_caller_leaves_the_run_unchanged(tmp_path):
    run = _logged_run(tmp_path)
    series = run.series("train", "loss")
    series[1] = 99.0
    run.scalar_names("p").append("y")
    run.probes().clear()
    assert run.series("train", "loss")[1] == 1.0
    assert run.scalar_names("p") == ["x"] and run.probes() == ["p", "train"]


def test_arrays_of_one_shape_decode_as_separate_writable_arrays(tmp_path):
    w = RunWriter(tmp_path)
    for step in range(3):
        w.array(step, "p", "m", np.full((2, 2), step, dtype=np.float32))
    w.array(3, "p", "m", np.arange(3, dtype=np.int64))
    w.close()
    run = dl.load_run(tmp_path)
    values = run.arrays("p", "m")
    assert [s for s, _ in values] == [0, 1, 2, 3]
    assert [(v.dtype, v.shape) for _, v in values] == [(np.float32, (2, 2))] * 3 + [(np.int64, (3,))]
    values[0][1][0, 0] = 7.0
    assert values[1][1][0, 0] == 1.0 and run.arrays("p", "m")[0][1][0, 0] == 0.0
