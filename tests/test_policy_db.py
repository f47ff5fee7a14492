"""Opening a policy database: only a haltwise policy database is used (schema
and version checked, a quick integrity check run), a new one is created only
where no file exists, `policy show` reads without writing, and two processes
on one database lose no update."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from haltwise.policy import Policy, PolicyConfig, TraceOutcome
from haltwise.policy.cli import main
from haltwise.policy import PolicyDatabaseError
from haltwise.policy.store import SCHEMA_VERSION
from haltwise.scheduler import StopReason

CONFIG = PolicyConfig(traces=2, warmup_requests=2, window=4, min_new_tokens=2)


def _policy_db(path: Path, requests: int = 30) -> Path:
    """A real policy database with plans, observations and feedback."""
    with Policy(CONFIG, db=path) as policy:
        rng = np.random.default_rng(0)
        for rid in range(requests):
            plan = policy.plan(rid, "k")
            outcomes = [TraceOutcome(1, 8, int(StopReason.EOS),
                                     signal=rng.normal(size=8).astype(np.float32) if plan.control else None)
                        for _ in range(plan.traces)]
            policy.observe(rid, outcomes)
            policy.feedback(rid, True)
    return path


def _show(path, capsys) -> tuple[int, str, str]:
    code = main(["policy", "show", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(path, capsys, *needles):
    """Policy(), Policy.open() and `policy show` all refuse the file with one clear line."""
    for opener in (lambda: Policy(db=path), lambda: Policy.open(path)):
        with pytest.raises(PolicyDatabaseError) as info:
            opener()
        for needle in (str(path), *needles):
            assert needle in str(info.value)
    code, out, err = _show(path, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in (str(path), *needles):
        assert needle in err


def test_an_empty_file_is_refused_and_stays_empty(tmp_path, capsys):
    path = tmp_path / "p.db"
    path.touch()
    _refused(path, capsys, "empty")
    assert path.stat().st_size == 0 and not Path(f"{path}-wal").exists()


def test_a_file_that_is_not_sqlite_is_refused(tmp_path, capsys):
    path = tmp_path / "p.db"
    path.write_text("just some text, long enough to have a header" * 4)
    before = path.read_bytes()
    _refused(path, capsys, "not a SQLite database")
    assert path.read_bytes() == before


def test_a_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path, capsys):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users(name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    _refused(path, capsys, "not a haltwise policy database", "users")
    assert path.read_bytes() == before
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    conn.close()


def test_another_schema_version_is_refused(tmp_path, capsys):
    path = _policy_db(tmp_path / "p.db", requests=3)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    _refused(path, capsys, "schema version 99", str(SCHEMA_VERSION))


def test_corrupt_pages_are_refused_and_not_written(tmp_path, capsys):
    path = _policy_db(tmp_path / "p.db", requests=60)
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'requests'").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    start = (root - 1) * page_size
    data[start + 8: start + page_size] = os.urandom(page_size - 8)  # keep the page header, scramble its cells
    path.write_bytes(bytes(data))
    conn = sqlite3.connect(path)
    try:
        check = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        check = [str(e)]
    conn.close()
    assert check != ["ok"]  # the damage is real
    damaged = path.read_bytes()
    _refused(path, capsys, "integrity")
    assert path.read_bytes() == damaged


def test_a_new_database_is_created_only_where_no_file_exists(tmp_path):
    path = tmp_path / "sub" / "new.db"
    with Policy(CONFIG, db=path) as policy:
        policy.plan(0, "k")
    with Policy.open(path) as again:
        assert again.config == CONFIG and again.state()["seq"] == 1
        assert again.store.journal_mode == "wal"


def _hold_write_lock(path):
    """Another connection in the middle of a write transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO feedback(request_id, correct, source, weight, at) VALUES (0, 1, 'label', 1, 0)")
    return conn


def test_policy_show_reads_while_another_process_writes(tmp_path, capsys):
    path = _policy_db(tmp_path / "p.db")
    writer = _hold_write_lock(path)
    try:
        t0 = time.monotonic()
        code, out, err = _show(path, capsys)
        assert code == 0, err
        assert "policy: 30 requests" in out and time.monotonic() - t0 < 4.0  # no wait for the lock
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@contextlib.contextmanager
def _read_only(path: Path):
    """The file read-only, for root too (the immutable attribute)."""
    os.chmod(path, 0o444)
    immutable = False
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            os.chmod(path, 0o644)
            pytest.skip("cannot make a file read-only for root here (chattr +i failed)")
        immutable = True
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        os.chmod(path, 0o644)


def test_policy_show_works_on_a_read_only_file(tmp_path, capsys):
    path = _policy_db(tmp_path / "p.db")
    before = path.read_bytes()
    with _read_only(path):
        code, out, err = _show(path, capsys)
        assert code == 0, err
        assert "policy: 30 requests" in out
        with Policy.open(path, readonly=True) as policy:
            assert policy.report()["requests"] == 30
            with pytest.raises(PolicyDatabaseError, match="read-only"):
                policy.plan(1000, "k")
    assert path.read_bytes() == before


# ---- two processes on one database ---------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from haltwise.policy import Policy
    db, me, reports = sys.argv[1], sys.argv[2], int(sys.argv[3])
    policy = Policy.open(db)
    Path(db + ".ready" + me).touch()
    while not Path(db + ".go").exists():
        time.sleep(0.005)
    for i in range(reports):
        policy.feedback(0, False, source="user", weight=1.0)
        policy.feedback(1 + i % 3, i % 2 == 0)
    policy.close()
""")


def test_two_processes_lose_no_update(tmp_path):
    path = tmp_path / "p.db"
    with Policy(PolicyConfig(traces=1, warmup_requests=100), db=path) as policy:
        for rid in range(4):
            policy.plan(rid, "k")
            policy.observe(rid, [TraceOutcome(1, 8, int(StopReason.EOS), signal=np.zeros(8, np.float32))])
    reports = 150
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(i), str(reports)],
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{path}.ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        Path(f"{path}.go").touch()
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()
    with Policy.open(path) as policy:
        assert policy.store.feedback_count() == 4 * reports
        assert policy.store.request(0)["user_bad"] == 2 * reports  # every report counted, none overwritten
        # the counters the policy keeps per bucket saw every report too
        slices = policy.state()["buckets"]["k"]["slices"]
        assert slices["uncut_bad"] == 2 * reports
