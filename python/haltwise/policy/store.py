"""The policy's state in SQLite: WAL journal, one transaction per public
call, so a process killed at any instant restarts exactly at the last call
that returned, and nothing acknowledged (a call that returned) is lost.

Opening
-------
A database is created only where no file exists. An existing file is used
only once it has been checked: a SQLite file (not empty), SQLite's quick
integrity check passes, every table below is there and ``meta.schema`` is
SCHEMA_VERSION. Anything else raises :class:`PolicyDatabaseError` naming the
path and what was found, and the file is left as it was (no schema written,
journal mode unchanged). ``readonly=True`` opens it read-only (a
``mode=ro`` URI): it works on a read-only file and while another process
writes (WAL readers never wait for the writer).

Tables
------
meta      key -> JSON value: schema version, config, request counter, load state
buckets   name -> BucketState JSON (thresholds in force, counters) and its grid
requests  one row per planned request: its plan, what was served, its labels
traces    per request and trace: answer, tokens, reason, shadow data, and the
          policy signal (float16 bytes) of warm-up and control traces, which
          the test replays
evidence  (bucket, request): the control requests each bucket's test may use
feedback  every acknowledged feedback call, append-only
audit     every change of a value in force: time, request counter, bucket,
          field, old and new value, the evidence and the reason
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

SCHEMA_VERSION = 2
TABLES = ("meta", "buckets", "requests", "traces", "evidence", "feedback", "audit")
_SQLITE_HEADER = b"SQLite format 3\x00"


class PolicyDatabaseError(ValueError):
    """A file that is not a usable haltwise policy database (empty, not
    SQLite, another program's database, another schema version, damaged),
    or a write through a read-only opening."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, state TEXT NOT NULL, grid TEXT);
CREATE TABLE IF NOT EXISTS requests (
    request_id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    bucket TEXT NOT NULL,
    kind TEXT NOT NULL,
    source TEXT,
    how TEXT NOT NULL,
    traces INTEGER NOT NULL,
    threshold REAL,
    grid_index INTEGER NOT NULL,
    strategy INTEGER NOT NULL DEFAULT 0,
    overload INTEGER NOT NULL,
    shadow INTEGER NOT NULL,
    sliced TEXT NOT NULL,
    observed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    served_answer INTEGER,
    tokens INTEGER,
    cut_traces INTEGER,
    would_answer INTEGER,
    would_tokens INTEGER,
    label INTEGER,
    reference INTEGER,
    user_bad REAL NOT NULL DEFAULT 0,
    user_good REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_seq ON requests(seq);
CREATE TABLE IF NOT EXISTS traces (
    request_id INTEGER NOT NULL,
    k INTEGER NOT NULL,
    answer INTEGER,
    num_tokens INTEGER NOT NULL,
    reason INTEGER NOT NULL,
    mean_logprob REAL,
    would_stop_step INTEGER NOT NULL,
    would_stop_reason INTEGER,
    signal BLOB,
    PRIMARY KEY (request_id, k)
);
CREATE TABLE IF NOT EXISTS evidence (
    bucket TEXT NOT NULL,
    request_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (bucket, request_id)
);
CREATE INDEX IF NOT EXISTS evidence_seq ON evidence(bucket, seq);
CREATE INDEX IF NOT EXISTS evidence_request ON evidence(request_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    source TEXT NOT NULL,
    weight REAL NOT NULL,
    reference INTEGER,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    seq INTEGER NOT NULL,
    bucket TEXT NOT NULL,
    field TEXT NOT NULL,
    old TEXT,
    new TEXT,
    evidence TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


class Store:
    """One SQLite connection (``path`` or ":memory:").

    path: where no file exists, a new database is created (its folder too);
        an existing file must be a haltwise policy database (module
        docstring), else PolicyDatabaseError.
    readonly: open an existing database read-only; writes raise
        PolicyDatabaseError.
    on_create: called with the store inside the transaction that creates a
        new database (the caller's initial rows).

    Several processes may open one database: every write is one
    ``BEGIN IMMEDIATE`` transaction, and :meth:`changed_elsewhere` tells a
    caller holding state in memory that another connection committed since
    its last look."""

    def __init__(self, path: str | os.PathLike = ":memory:", *, synchronous: str = "FULL", clock=time.time,
                 readonly: bool = False, on_create: Callable[["Store"], None] | None = None):
        self.path = str(path)
        self.readonly = bool(readonly)
        self.clock = clock
        self._depth = 0
        memory = self.path == ":memory:"
        if self.readonly and (memory or not Path(self.path).exists()):
            raise PolicyDatabaseError(f"policy database {self.path} does not exist (read-only opening)")
        create = memory or not Path(self.path).exists()
        if create:
            if not memory:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        else:
            _check_file(self.path)
            uri = Path(self.path).resolve().as_uri() + ("?mode=ro" if self.readonly else "?mode=rw")
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per public call
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA busy_timeout=5000")
            if create:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute(f"PRAGMA synchronous={synchronous}")
                with self.transaction():
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.set_meta("schema", SCHEMA_VERSION)
                    if on_create is not None:
                        on_create(self)
            else:
                _check_contents(self.conn, self.path)
                if not self.readonly:
                    self.conn.execute("PRAGMA journal_mode=WAL")
                    self.conn.execute(f"PRAGMA synchronous={synchronous}")
                    self._add_missing_indexes()
        except BaseException:
            self.conn.close()
            raise
        self._data_version = self._read_data_version()

    def _add_missing_indexes(self) -> None:
        """Indexes added since the file was made (same tables, same schema
        version); writes only when one is missing."""
        have = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        missing = [statement for statement in _SCHEMA.split(";")
                   if statement.strip().startswith("CREATE INDEX IF NOT EXISTS")
                   and statement.split("EXISTS")[1].split()[0] not in have]
        if missing:
            with self.transaction():
                for statement in missing:
                    self.conn.execute(statement)

    def set_synchronous(self, synchronous: str) -> None:
        if not self.readonly:
            self.conn.execute(f"PRAGMA synchronous={synchronous}")

    def _read_data_version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def changed_elsewhere(self) -> bool:
        """Whether another connection (another process) committed since the
        last call; call it inside a transaction to rebuild state it derives."""
        version = self._read_data_version()
        changed = version != self._data_version
        self._data_version = version
        return changed

    @property
    def journal_mode(self) -> str:
        return self.conn.execute("PRAGMA journal_mode").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception); nests as one."""
        if self.readonly:
            raise PolicyDatabaseError(f"policy database {self.path} is open read-only; this call writes")
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.conn
        except BaseException:
            self._depth = 0
            self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # ---- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                          (key, json.dumps(value, sort_keys=True)))

    # ---- buckets ------------------------------------------------------------------------

    def put_bucket(self, name: str, state: dict) -> None:
        self.conn.execute("INSERT INTO buckets(name, state) VALUES(?, ?) "
                          "ON CONFLICT(name) DO UPDATE SET state=excluded.state", (name, json.dumps(state)))

    def put_grid(self, name: str, grid: list[float]) -> None:
        """A bucket's candidate thresholds, written once when its warm-up ends."""
        self.conn.execute("UPDATE buckets SET grid = ? WHERE name = ?", (json.dumps(grid), name))

    def buckets(self) -> dict[str, dict]:
        out = {}
        for name, state, grid in self.conn.execute("SELECT name, state, grid FROM buckets"):
            out[name] = json.loads(state)
            out[name]["grid"] = None if grid is None else json.loads(grid)
        return out

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, row: dict) -> None:
        cols = ", ".join(row)
        self.conn.execute(f"INSERT INTO requests({cols}) VALUES({', '.join('?' for _ in row)})", tuple(row.values()))

    def add_to_request(self, request_id: int, column: str, amount: float) -> None:
        """column += amount, in SQL: no update from another process is lost."""
        if column not in ("user_bad", "user_good"):
            raise ValueError(f"add_to_request: column must be user_bad or user_good, got {column!r}")
        self.conn.execute(f"UPDATE requests SET {column} = {column} + ? WHERE request_id = ?", (amount, request_id))

    def update_request(self, request_id: int, **values) -> None:
        sets = ", ".join(f"{name} = ?" for name in values)
        self.conn.execute(f"UPDATE requests SET {sets} WHERE request_id = ?", (*values.values(), request_id))

    def request(self, request_id: int) -> dict | None:
        cur = self.conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def requests_where(self, where: str, params: tuple = ()) -> list[dict]:
        cur = self.conn.execute(f"SELECT * FROM requests WHERE {where}", params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # ---- traces -------------------------------------------------------------------------

    def add_traces(self, request_id: int, rows: list[dict]) -> None:
        self.conn.executemany(
            "INSERT INTO traces(request_id, k, answer, num_tokens, reason, mean_logprob, would_stop_step, "
            "would_stop_reason, signal) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(request_id, k, r["answer"], r["num_tokens"], r["reason"], r["mean_logprob"], r["would_stop_step"],
              r["would_stop_reason"], None if r["signal"] is None else np.asarray(r["signal"], np.float16).tobytes())
             for k, r in enumerate(rows)])

    def traces(self, request_id: int) -> list[dict]:
        cur = self.conn.execute("SELECT k, answer, num_tokens, reason, mean_logprob, would_stop_step, "
                                "would_stop_reason, signal FROM traces WHERE request_id = ? ORDER BY k", (request_id,))
        out = []
        for k, answer, n, reason, mlp, wss, wsr, blob in cur.fetchall():
            out.append({"k": k, "answer": answer, "num_tokens": n, "reason": reason,
                        "mean_logprob": float("nan") if mlp is None else mlp, "would_stop_step": wss,
                        "would_stop_reason": wsr,
                        "signal": None if blob is None else np.frombuffer(blob, dtype=np.float16).astype(np.float32)})
        return out

    # ---- evidence -----------------------------------------------------------------------

    def add_evidence(self, bucket: str, request_id: int, seq: int) -> None:
        self.conn.execute("INSERT INTO evidence(bucket, request_id, seq) VALUES(?, ?, ?)", (bucket, request_id, seq))

    def evidence_window(self, bucket: str, limit: int) -> list[int]:
        """The bucket's `limit` most recent observed control requests (by plan order), oldest first."""
        rows = self.conn.execute(
            "SELECT e.request_id FROM evidence e JOIN requests r ON r.request_id = e.request_id "
            "WHERE e.bucket = ? AND r.observed = 1 AND r.cancelled = 0 ORDER BY e.seq DESC LIMIT ?",
            (bucket, limit)).fetchall()
        return [r[0] for r in reversed(rows)]

    def remove_evidence(self, request_id: int) -> None:
        """The request counts for no bucket's test (its traces cannot be replayed)."""
        self.conn.execute("DELETE FROM evidence WHERE request_id = ?", (request_id,))

    def evidence_buckets(self, request_id: int) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT bucket FROM evidence WHERE request_id = ?", (request_id,))]

    # ---- retention ----------------------------------------------------------------------

    def prune(self, before_seq: int, keep: Iterable[int]) -> dict[str, int]:
        """Deletes the request, trace and evidence rows of the finished requests
        (observed or cancelled) planned before `before_seq` (plan order), except
        the request ids in `keep`. Feedback and audit rows stay: they are the
        append-only record. Returns the rows deleted per table."""
        conn = self.conn
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS prune_keep (request_id INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM prune_keep")
        conn.executemany("INSERT OR IGNORE INTO prune_keep(request_id) VALUES(?)", ((int(r),) for r in keep))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS prune_doomed (request_id INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM prune_doomed")
        conn.execute("INSERT INTO prune_doomed(request_id) SELECT request_id FROM requests WHERE seq < ? AND "
                     "(observed = 1 OR cancelled = 1) AND request_id NOT IN (SELECT request_id FROM prune_keep)",
                     (int(before_seq),))
        deleted = {table: conn.execute(f"DELETE FROM {table} WHERE request_id IN "
                                       f"(SELECT request_id FROM prune_doomed)").rowcount
                   for table in ("traces", "evidence", "requests")}
        conn.execute("DELETE FROM prune_keep")
        conn.execute("DELETE FROM prune_doomed")
        return deleted

    def vacuum(self) -> None:
        """Gives the pages freed by prune back to the disk (outside any transaction)."""
        if self.readonly:
            raise PolicyDatabaseError(f"policy database {self.path} is open read-only; VACUUM writes")
        self.conn.execute("VACUUM")

    def count(self, table: str) -> int:
        """Rows in one of TABLES."""
        if table not in TABLES:
            raise ValueError(f"count: table must be one of {TABLES}, got {table!r}")
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    # ---- feedback and audit -------------------------------------------------------------

    def add_feedback(self, request_id: int, correct: bool, source: str, weight: float, reference: int | None) -> int:
        cur = self.conn.execute("INSERT INTO feedback(request_id, correct, source, weight, reference, at) "
                                "VALUES(?, ?, ?, ?, ?, ?)",
                                (request_id, int(correct), source, weight, reference, self.clock()))
        return int(cur.lastrowid)

    def feedback_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    def feedback_rows(self) -> list[dict]:
        cur = self.conn.execute("SELECT id, request_id, correct, source, weight, reference FROM feedback ORDER BY id")
        return [dict(zip(("id", "request_id", "correct", "source", "weight", "reference"), r)) for r in cur]

    def add_audit(self, seq: int, bucket: str, field: str, old, new, evidence: dict, reason: str) -> None:
        self.conn.execute("INSERT INTO audit(at, seq, bucket, field, old, new, evidence, reason) "
                          "VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                          (self.clock(), seq, bucket, field, json.dumps(old), json.dumps(new),
                           json.dumps(evidence, sort_keys=True), reason))

    def audit(self, last: int | None = None) -> list[dict]:
        sql = "SELECT id, at, seq, bucket, field, old, new, evidence, reason FROM audit ORDER BY id DESC"
        rows = self.conn.execute(sql + (" LIMIT ?" if last is not None else ""),
                                 (last,) if last is not None else ()).fetchall()
        out = [dict(id=r[0], at=r[1], seq=r[2], bucket=r[3], field=r[4], old=json.loads(r[5]),
                    new=json.loads(r[6]), evidence=json.loads(r[7]), reason=r[8]) for r in rows]
        return list(reversed(out))


def _check_file(path: str) -> None:
    """What can be told from the bytes: not empty, a SQLite file."""
    p = Path(path)
    if p.is_dir():
        raise PolicyDatabaseError(f"policy database {path} is a directory, expected a SQLite file")
    with open(p, "rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if not header:
        wal = Path(path + "-wal")
        if not (wal.exists() and wal.stat().st_size):
            raise PolicyDatabaseError(
                f"policy database {path} is an empty file (0 bytes), not a haltwise policy database; a new "
                f"database is created only where no file exists")
    elif header != _SQLITE_HEADER:
        raise PolicyDatabaseError(f"policy database {path} is not a SQLite database (it starts with {header!r})")


def _check_contents(conn: sqlite3.Connection, path: str) -> None:
    """SQLite's quick integrity check, then the tables and the schema version. Writes nothing."""
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:
        raise PolicyDatabaseError(f"policy database {path} fails SQLite's integrity check: {e}") from None
    if problems != ["ok"]:
        lines = [line.strip() for p in problems for line in str(p).splitlines()
                 if line.strip() and not line.startswith("***")]
        raise PolicyDatabaseError(f"policy database {path} fails SQLite's integrity check (quick_check): "
                                  f"{'; '.join(lines[:3])}{'; ...' if len(lines) > 3 else ''}")
    try:
        tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                        if not row[0].startswith("sqlite_"))
    except sqlite3.DatabaseError as e:
        raise PolicyDatabaseError(f"policy database {path} cannot be read: {e}") from None
    missing = [t for t in TABLES if t not in tables]
    if "meta" in missing:
        found = f"its tables are {tables}" if tables else "it has no tables"
        raise PolicyDatabaseError(f"policy database {path} is a SQLite database but not a haltwise policy database "
                                  f"({found}; expected {list(TABLES)})")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    try:
        version = None if row is None else json.loads(row[0])
    except ValueError:
        version = row[0]
    if version != SCHEMA_VERSION:
        found = "no schema version" if row is None else f"schema version {version!r}"
        raise PolicyDatabaseError(f"policy database {path} has {found}; this haltwise reads schema version "
                                  f"{SCHEMA_VERSION}")
    if missing:
        raise PolicyDatabaseError(f"policy database {path} lacks the tables {missing} of schema version "
                                  f"{SCHEMA_VERSION}")
