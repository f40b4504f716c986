"""The run database: one SQLite file per run, in WAL mode, and its read API.

Layout of ``run_dir/dynlens.sqlite`` (schema version 1):

* ``meta(key, value)``: JSON values — name, config, model summary, versions, start time, probes.
* ``scalars(step, probe, name, value)``: one float per row; NaN is stored as NULL.
* ``arrays(step, probe, name, dtype, shape, data)``: raw little-endian bytes, a NumPy dtype string
  and a JSON shape. No pickle: a run someone else made is safe to open.
* ``events(step, time, level, probe, message, traceback)``: errors, warnings and notes.

Beside it, ``run_dir/steps.bin`` holds the scalars recorded at every step (the training loss and
learning rate): fixed 20-byte records (step int64, name index int32, value float64,
little-endian), appended with one ``write`` per step; the names are the meta key
``step_scalars``. A SQLite commit at every step cost more than the rest of the Lens together on a
small model (its pages fall out of the CPU caches between steps); an append costs a system call.
The read API merges both, so a reader sees one ``scalars`` table.

The writer commits once per training step (``RunWriter.commit``), so everything ``Lens.step()``
returned from is on disk, also if the process is killed. Readers open the file while it is
being written: WAL mode lets them see the last committed step.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["RunWriter", "Run", "load_run", "RunError", "RunInUseError", "SCHEMA_VERSION", "DB_NAME",
           "COST_COLUMNS", "costs_frame"]

SCHEMA_VERSION = 1
DB_NAME = "dynlens.sqlite"
LOCK_NAME = "dynlens.lock"
STEP_LOG = "steps.bin"
_STEP_RECORD = np.dtype([("step", "<i8"), ("name", "<i4"), ("value", "<f8")])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scalars (step INTEGER NOT NULL, probe TEXT NOT NULL, name TEXT NOT NULL, value REAL);
CREATE TABLE IF NOT EXISTS arrays (
    step INTEGER NOT NULL, probe TEXT NOT NULL, name TEXT NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    step INTEGER, time REAL NOT NULL, level TEXT NOT NULL, probe TEXT, message TEXT NOT NULL,
    traceback TEXT);
"""

# Built when the writer closes, not while training: maintaining them on every insert doubles
# the pages each per-step commit writes. A run read while (or after being killed while) it is
# written is scanned instead, which is fast at the sizes one run holds.
_INDEXES = """
CREATE INDEX IF NOT EXISTS scalars_by_probe ON scalars (probe, name, step);
CREATE INDEX IF NOT EXISTS arrays_by_probe ON arrays (probe, name, step);
"""

_ARRAY_DTYPES = {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}


COST_COLUMNS = ["probe", "measurements", "seconds", "share", "deferred", "peak_memory", "products"]


def costs_frame(costs: Mapping[str, Any] | None) -> pd.DataFrame:
    """The table of what each probe cost a run, from the ``costs`` record the Lens keeps (the
    run's meta key ``costs``): one row per probe with ``measurements`` (how many it took),
    ``seconds`` (their total wall time), ``share`` (seconds over the run's wall time so far),
    ``deferred`` (due measurements the time budget postponed or skipped), ``peak_memory`` (the
    most device memory, bytes, one measurement took beyond what was in use before it, among the
    measurements that raised the process's peak, where the allocator shows it exactly; NaN
    where none did, and on the CPU) and ``products`` (Hessian-vector products, where the probe
    reports them). A last row ``lens`` holds the Lens's own time outside measurements
    (``lens.step()``'s bookkeeping, the basic probes, writes), which the time budget counts too."""
    costs = costs or {}
    wall = float(costs.get("wall_seconds") or 0.0)
    rows = []
    for name, c in (costs.get("probes") or {}).items():
        seconds = float(c.get("seconds", 0.0))
        peak = c.get("peak_memory")
        rows.append({
            "probe": name,
            "measurements": int(c.get("measurements", 0)),
            "seconds": seconds,
            "share": seconds / wall if wall > 0 else math.nan,
            "deferred": int(c.get("deferred", 0)),
            "peak_memory": math.nan if peak is None else float(peak),
            "products": float(c["products"]) if c.get("products") is not None else math.nan,
        })
    if costs.get("lens_seconds") is not None:
        own = float(costs["lens_seconds"])
        rows.append({"probe": "lens", "measurements": 0, "seconds": own,
                     "share": own / wall if wall > 0 else math.nan, "deferred": 0,
                     "peak_memory": math.nan, "products": math.nan})
    return pd.DataFrame(rows, columns=COST_COLUMNS)


class RunError(Exception):
    """A path that is not a readable dynlens run (missing, damaged, or of an unknown schema)."""


class RunInUseError(RunError):
    """The run directory is held by another open Lens."""


def _json_safe(value: Any) -> Any:
    """A JSON-friendly copy of ``value``: unknown objects become their ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return repr(value)


def encode_array(array: np.ndarray) -> tuple[str, str, bytes]:
    """(dtype, shape, bytes) of an array, little-endian, without pickle."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in _ARRAY_DTYPES:
        array = array.astype(np.float64)
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return array.dtype.name, json.dumps(list(array.shape)), data


def decode_array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    """The array stored as (dtype, shape, bytes); refuses dtypes that could hold objects."""
    if dtype not in _ARRAY_DTYPES:
        raise RunError(f"array of unsupported dtype {dtype!r} in the run database")
    dims = tuple(int(d) for d in json.loads(shape))
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(dims).astype(dtype)


class RunWriter:
    """Writes one run: holds the directory's lock, buffers a step's rows, commits on request.

    Args:
        run_dir: the run directory (created if missing).
        overwrite: replace an existing run in ``run_dir`` instead of refusing.

    Raises:
        RunInUseError: another open Lens holds ``run_dir``.
        RunError: ``run_dir`` cannot be written, or already holds a run and ``overwrite`` is False.
    """

    def __init__(self, run_dir: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.path = Path(run_dir)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 - held for the run's life
        except OSError as err:
            raise RunError(
                f"cannot write the run directory {str(self.path)!r} ({err.strerror or err}); pass "
                "run_dir= a directory this process can create and write"
            ) from err
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._lock.close()
            raise RunInUseError(
                f"the run directory {str(self.path)!r} is in use by another open Lens (its lock "
                f"{LOCK_NAME} is held); close that Lens first or pass a different run_dir"
            ) from err
        db = self.path / DB_NAME
        if db.exists():
            if not overwrite:
                self._release()
                raise RunError(
                    f"{str(self.path)!r} already holds a run; pass a new run_dir, or "
                    "overwrite=True to replace it"
                )
            for stale in (db, f"{db}-wal", f"{db}-shm", self.path / STEP_LOG):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
        try:
            self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # A commit reaches the OS before step() returns: it survives the process being
            # killed. (synchronous=FULL would also survive power loss, at an fsync per step.)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as err:
            self._release()
            raise RunError(f"cannot create the run database in {str(self.path)!r}: {err}") from err
        # a new run starts an empty step log (one left beside a deleted database is stale)
        self._log = os.open(self.path / STEP_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._log_buffer = bytearray()
        self._log_names: dict[tuple[str, str], int] = {}
        self._pending_meta: list[tuple[str, str]] = []
        self._scalars: list[tuple[int, str, str, float | None]] = []
        self._arrays: list[tuple[int, str, str, str, str, bytes]] = []
        self._events: list[tuple[int | None, float, str, str | None, str, str | None]] = []
        self._labels: dict[str, dict[str, list[list[Any]]]] = {}  # probe -> name -> [[step, labels]]
        self.closed = False
        self.set_meta({"schema_version": SCHEMA_VERSION})
        self.commit()

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
        self._lock.close()

    def set_meta(self, items: Mapping[str, Any]) -> None:
        """Store run metadata (JSON values); written with the next commit."""
        rows = [(k, json.dumps(_json_safe(v))) for k, v in items.items()]
        self._pending_meta += rows

    def scalar(self, step: int, probe: str, name: str, value: float) -> None:
        """Queue one scalar (NaN is stored as NULL and read back as NaN)."""
        v = float(value)
        self._scalars.append((step, probe, name, None if math.isnan(v) else v))

    def step_scalar(self, step: int, probe: str, name: str, value: float) -> None:
        """Queue a scalar recorded at (nearly) every step; it goes to the append-only step log
        (``steps.bin``) instead of the database. Read back through the same API as scalars."""
        key = (probe, name)
        index = self._log_names.get(key)
        if index is None:
            index = self._log_names[key] = len(self._log_names)
            self.set_meta({"step_scalars": [list(k) for k in self._log_names]})
        self._log_buffer += struct.pack("<qid", step, index, float(value))

    def array(self, step: int, probe: str, name: str, value: np.ndarray) -> None:
        """Queue one array, stored as raw bytes + dtype + shape."""
        self._arrays.append((step, probe, name, *encode_array(value)))

    def array_labels(self, step: int, probe: str, name: str, labels: Sequence[str]) -> None:
        """Label the entries of the array ``probe/name`` from ``step`` on (one label per entry
        of its first axis). Stored in the run's metadata (``array_labels``) only when they
        differ from the array's current labels; read back by :meth:`Run.array_labels`."""
        labels = [str(label) for label in labels]
        history = self._labels.setdefault(probe, {}).setdefault(name, [])
        if history and history[-1][1] == labels:
            return
        history.append([int(step), labels])
        self.set_meta({"array_labels": self._labels})

    def event(self, step: int | None, level: str, probe: str | None, message: str,
              traceback: str | None = None) -> None:
        """Queue an event (level: "info", "warning" or "error")."""
        self._events.append((step, time.time(), level, probe, message, traceback))

    def commit(self) -> None:
        """Write everything queued: database rows in one transaction, then the step log (so the
        names of step-log records are on disk before the records)."""
        self._commit_database()
        if self._log_buffer:
            os.write(self._log, self._log_buffer)
            self._log_buffer.clear()

    def _commit_database(self) -> None:
        meta = self._pending_meta
        if not (meta or self._scalars or self._arrays or self._events):
            return
        db = self._db
        db.execute("BEGIN")
        try:
            if meta:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
            if self._scalars:
                db.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?)", self._scalars)
            if self._arrays:
                db.executemany("INSERT INTO arrays VALUES (?, ?, ?, ?, ?, ?)", self._arrays)
            if self._events:
                db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", self._events)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._pending_meta.clear()
        self._scalars.clear()
        self._arrays.clear()
        self._events.clear()

    def close(self) -> None:
        """Commit what is queued, close the database and release the directory."""
        if self.closed:
            return
        try:
            self.commit()
            self._db.executescript(_INDEXES)
            try:
                # back to a rollback journal: the WAL is checkpointed into the database and
                # removed, and later readers (read-only) leave no -wal/-shm files beside it
                self._db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.OperationalError:
                pass  # a reader still has it open: it stays in WAL mode, nothing is lost
            self._db.close()
            os.close(self._log)
        finally:
            self.closed = True
            self._release()


@dataclass(frozen=True)
class _StepLog:
    """The step log as read once: its names (``(probe, name)`` by index), its whole records with
    a committed name (step, name index, value), and the file's size in whole records' bytes."""

    names: list[tuple[str, str]]
    records: np.ndarray
    size: int

    @classmethod
    def parse(cls, raw: bytes, names: list[tuple[str, str]]) -> _StepLog:
        """The log of the bytes ``raw`` of ``steps.bin``; a record cut short by a killed process,
        or whose name was not yet committed, is left out."""
        size = len(raw) - len(raw) % _STEP_RECORD.itemsize
        records = np.frombuffer(raw[:size], dtype=_STEP_RECORD)
        records = records[(records["name"] >= 0) & (records["name"] < len(names))]
        return cls(names, records, size)

    def present(self, probe: str | None = None) -> list[tuple[str, str]]:
        """The names with at least one record (of ``probe``, when given), in the order they were
        first written."""
        counts = np.bincount(self.records["name"], minlength=len(self.names))
        return [n for n, c in zip(self.names, counts, strict=True) if c and probe in (None, n[0])]

    def select(self, probe: str | None = None, name: str | None = None) -> np.ndarray:
        """The records of ``probe``/``name`` (all of them where None), in the order written."""
        if probe is None and name is None:
            return self.records
        wanted = [i for i, (p, n) in enumerate(self.names)
                  if (probe is None or p == probe) and (name is None or n == name)]
        return self.records[np.isin(self.records["name"], wanted)]


class Run:
    """A run read from disk (read-only; works while the training process is still writing).

    Open one with :func:`load_run`. Every call for data (:meth:`scalars`, :meth:`series`,
    :meth:`arrays`, :meth:`events`, :meth:`probes`, :attr:`last_step`, ...) shows the run as last
    committed, so a run being written shows its newest committed step; the metadata (``meta``,
    ``name``, ``config``) is read when the run is opened and by :meth:`refresh`. What is computed
    from the whole run (the step log's records, :meth:`probes`, :attr:`last_step`,
    :meth:`scalar_names`, :meth:`series`) is kept, and computed again only once the writer has
    committed since or after :meth:`refresh`: a report asks for the same series many times, and
    the step log of a long run holds millions of records.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        db = self.path / DB_NAME if self.path.is_dir() else self.path
        if db.name != DB_NAME or not db.is_file():
            raise RunError(
                f"{str(path)!r} is not a dynlens run: there is no {DB_NAME} in it. Pass the "
                "run_dir given to dl.Lens"
            )
        self.path = db.parent
        self._db_path = db
        self._log: _StepLog | None = None
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._cache_version: tuple[int, int] | None = None
        try:
            self._db = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            rows = self._db.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.Error as err:
            raise RunError(
                f"{str(db)!r} cannot be read as a dynlens run database ({err}); the file is "
                "damaged, truncated or not a run"
            ) from err
        try:
            self.meta: dict[str, Any] = {k: json.loads(v) for k, v in rows}
        except (ValueError, TypeError) as err:
            raise RunError(
                f"{str(db)!r} holds unreadable run metadata ({err}); the file is damaged"
            ) from err
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RunError(
                f"{str(db)!r} has run schema version {version!r}; this dynlens reads version "
                f"{SCHEMA_VERSION}. Open it with the dynlens version that wrote it"
            )

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as err:
            raise RunError(f"reading {str(self._db_path)!r} failed ({err}); the file is damaged") from err

    def refresh(self) -> Run:
        """Re-read the metadata and forget everything kept from the data tables and the step
        log (they are read again when next asked for)."""
        self.meta = {k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta")}
        self._log = None
        self._cache.clear()
        self._cache_version = None
        return self

    @property
    def name(self) -> str:
        """The run's name (``Lens(name=...)``, else the directory name)."""
        return str(self.meta.get("name") or self.path.name)

    @property
    def config(self) -> dict[str, Any]:
        """The configuration given to the Lens (``Lens(config=...)``)."""
        return dict(self.meta.get("config") or {})

    def _read_step_log(self) -> bytes:
        try:
            return (self.path / STEP_LOG).read_bytes()
        except FileNotFoundError:
            return b""

    def _step_records(self) -> _StepLog:
        """The step log (``steps.bin``), read again only when its size has changed: the writer
        only appends to it."""
        try:
            size = (self.path / STEP_LOG).stat().st_size
        except FileNotFoundError:
            size = 0
        log = self._log
        if log is None or log.size != size - size % _STEP_RECORD.itemsize:
            # the bytes before the names: the writer commits a name before the records that use it
            raw = self._read_step_log()
            rows = self._query("SELECT value FROM meta WHERE key = 'step_scalars'")
            names = [(str(p), str(n)) for p, n in json.loads(rows[0][0])] if rows else []
            log = self._log = _StepLog.parse(raw, names)
        return log

    def _kept(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """``compute()``, kept under ``key`` until the writer commits again (the database's
        ``data_version`` changes, or the step log grows) or :meth:`refresh` is called."""
        version = (self._query("PRAGMA data_version")[0][0], self._step_records().size)
        if version != self._cache_version:
            self._cache.clear()
            self._cache_version = version
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _step_log(self, probe: str | None = None, name: str | None = None) -> pd.DataFrame:
        """The step log's records as a DataFrame step, probe, name, value."""
        log = self._step_records()
        records = log.select(probe, name)
        probes = np.array([p for p, _ in log.names] or [""], dtype=object)
        scalar_names = np.array([n for _, n in log.names] or [""], dtype=object)
        return pd.DataFrame({
            "step": records["step"].astype("int64"),
            "probe": probes[records["name"]],
            "name": scalar_names[records["name"]],
            "value": records["value"].astype(float),
        })

    def scalars(self, probe: str | None = None, name: str | None = None) -> pd.DataFrame:
        """Scalars as a DataFrame with columns step, probe, name, value (ordered by step)."""
        where, params = [], []
        if probe is not None:
            where.append("probe = ?")
            params.append(probe)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        sql = "SELECT step, probe, name, value FROM scalars"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY step, rowid", params)
        frame = pd.DataFrame(rows, columns=["step", "probe", "name", "value"])
        frame["value"] = frame["value"].astype(float)
        frame["step"] = frame["step"].astype("int64")
        logged = self._step_log(probe, name)
        if not logged.empty:
            frame = logged if frame.empty else pd.concat([logged, frame], ignore_index=True)
            frame = frame.sort_values("step", kind="stable", ignore_index=True)
        return frame

    def series(self, probe: str, name: str) -> pd.Series:
        """One scalar over steps: a float Series indexed by step (the last value at a step wins)."""
        return self._kept(("series", probe, name), lambda: self._series(probe, name)).copy()

    def _series(self, probe: str, name: str) -> pd.Series:
        rows = self._query(
            "SELECT step, value FROM scalars WHERE probe = ? AND name = ? ORDER BY step, rowid",
            (probe, name),
        )
        logged = self._step_records().select(probe, name)
        # the step log first, then the database's rows (NULL, a NaN, becomes NaN): a stable sort
        # keeps that order within a step, and the last record of each step wins
        steps = np.concatenate([logged["step"], np.array([r[0] for r in rows], dtype=np.int64)])
        values = np.concatenate([logged["value"], np.array([r[1] for r in rows], dtype=float)])
        if np.any(np.diff(steps) <= 0):
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
            last = np.append(steps[1:] != steps[:-1], True)
            steps, values = steps[last], values[last]
        return pd.Series(values, index=pd.Index(steps, name="step"), name=f"{probe}/{name}", dtype=float)

    def arrays(self, probe: str, name: str) -> list[tuple[int, np.ndarray]]:
        """Every stored value of one array, as ``[(step, ndarray)]`` ordered by step."""
        rows = self._query(
            "SELECT step, dtype, shape, data FROM arrays WHERE probe = ? AND name = ? ORDER BY step, rowid",
            (probe, name),
        )
        # a run of arrays of one dtype and shape (a probe's per-layer values at every
        # measurement) is decoded in one piece: 20,000 decodes one by one took a quarter of a second
        values: list[tuple[int, np.ndarray]] = []
        for (dtype, shape), group in itertools.groupby(rows, key=lambda r: (r[1], r[2])):
            group = list(group)
            if dtype not in _ARRAY_DTYPES:
                raise RunError(f"array of unsupported dtype {dtype!r} in the run database")
            dims = [int(d) for d in json.loads(shape)]
            size = np.dtype(dtype).itemsize * math.prod(dims)
            if any(len(r[3]) != size for r in group):  # damaged: each decodes (and fails) alone
                values += [(int(s), decode_array(d, sh, b)) for s, d, sh, b in group]
                continue
            stacked = decode_array(dtype, json.dumps([len(group), *dims]), b"".join(r[3] for r in group))
            values += [(int(r[0]), stacked[i, ...]) for i, r in enumerate(group)]
        return values

    def array_labels(self, probe: str, name: str, step: int | None = None) -> list[str] | None:
        """The labels of the array ``probe/name``'s entries at ``step`` (default: the latest),
        or None when the probe stored it unlabelled (a per-layer array lines up with the run's
        ``layers``)."""
        history = (self.meta.get("array_labels") or {}).get(probe, {}).get(name) or []
        found = None
        for since, labels in history:
            if step is None or since <= step:
                found = list(labels)
        return found

    def array_names(self, probe: str) -> list[str]:
        """The names of the arrays a probe stored."""
        return [r[0] for r in self._query("SELECT DISTINCT name FROM arrays WHERE probe = ?", (probe,))]

    def scalar_names(self, probe: str) -> list[str]:
        """The names of the scalars a probe stored."""
        return list(self._kept(("scalar_names", probe), lambda: self._scalar_names(probe)))

    def _scalar_names(self, probe: str) -> list[str]:
        logged = [n for _, n in self._step_records().present(probe)]
        stored = [r[0] for r in self._query("SELECT DISTINCT name FROM scalars WHERE probe = ?", (probe,))]
        return list(dict.fromkeys(logged + stored))

    def events(self) -> pd.DataFrame:
        """Events as a DataFrame with columns step, time, level, probe, message, traceback."""
        rows = self._query("SELECT step, time, level, probe, message, traceback FROM events ORDER BY rowid")
        return pd.DataFrame(rows, columns=["step", "time", "level", "probe", "message", "traceback"])

    def costs(self) -> pd.DataFrame:
        """What each probe cost the run (see :func:`costs_frame`), as the Lens last recorded it;
        the run's budget and wall time are in ``run.meta["costs"]``. Empty for a run written
        before costs were recorded."""
        return costs_frame(self.meta.get("costs"))

    def probes(self) -> list[str]:
        """Names of the probes that recorded anything, in the order they were attached."""
        return list(self._kept(("probes",), self._probes))

    def _probes(self) -> list[str]:
        seen = {r[0] for r in self._query("SELECT DISTINCT probe FROM scalars UNION SELECT DISTINCT probe FROM arrays")}
        seen |= {p for p, _ in self._step_records().present()}
        order = [p["name"] for p in self.meta.get("probes", [])]
        return [p for p in order if p in seen] + sorted(seen - set(order))

    @property
    def last_step(self) -> int:
        """The last step with any record (0 for a run that only measured its initial state)."""
        return self._kept(("last_step",), self._last_step)

    def _last_step(self) -> int:
        row = self._query("SELECT MAX(step) FROM scalars")
        stored = int(row[0][0]) if row and row[0][0] is not None else 0
        logged = self._step_records().records["step"]
        return max(stored, int(logged.max())) if len(logged) else stored

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def _repr_html_(self) -> str:
        """A small summary table for notebooks: name, steps, probes and the latest value of each
        scalar (every string escaped; the full report is ``dl.report(run)``)."""
        import html

        latest = self.scalars().groupby(["probe", "name"], sort=True).tail(1).sort_values(["probe", "name"])
        rows = list(zip(latest.probe, latest.name, latest.value, latest.step))
        cells = "".join(
            f"<tr><td>{html.escape(str(p))}</td><td>{html.escape(str(n))}</td>"
            f"<td>{float(v):.4g}</td><td>{int(s)}</td></tr>"
            for p, n, v, s in rows[:200])
        return (
            f"<div><strong>dynlens run {html.escape(self.name)}</strong> "
            f"<code>{html.escape(str(self.path))}</code><br>"
            f"status {html.escape(str(self.meta.get('status', 'unknown')))}, "
            f"{self.last_step} steps, probes: {html.escape(', '.join(self.probes()))}"
            "<table><tr><th>probe</th><th>scalar</th><th>latest</th><th>at step</th></tr>"
            f"{cells}</table></div>"
        )

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, name={self.name!r}, last_step={self.last_step})"


def load_run(path: str | os.PathLike[str]) -> Run:
    """Open a run directory (or its ``dynlens.sqlite``) for reading.

    Raises:
        RunError: the path holds no run, the database is damaged, or its schema is unknown.
    """
    return Run(path)
