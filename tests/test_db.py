"""The latency DB: refuses foreign files untouched, splits work, survives kill -9."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import signal
import sqlite3
import time
from functools import partial

import pytest

from dooly_fx.db import MAX_ATTEMPTS, LatencyDB, Timing, canonical_point, upgrade
from dooly_fx.errors import UserError

ENV = "env-fingerprint"
SIG = "a" * 64
POINTS = [canonical_point({"m": m}) for m in (1, 2, 4, 8, 16, 32, 64, 128)]


def _fresh(path) -> LatencyDB:
    db = LatencyDB.open(path)
    db.add_environment(ENV, "cpu", {"device": "cpu"})
    db.add_signatures([(SIG, "gemm", '{"kind":"gemm"}')])
    return db


def _timing(ms: float) -> Timing:
    return Timing(ms, ms, ms, ms, 0.0, 10, 0.01)


def test_new_db_is_wal_and_versioned(tmp_path):
    with _fresh(tmp_path / "lat.db") as db:
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(db.conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta == {"app": "dooly_fx latency db", "schema_version": "5"}


@pytest.mark.parametrize("content", [b"not a database at all\n" * 50, b"SQLite format 3\x00junk"])
def test_foreign_or_corrupt_file_is_refused_untouched(tmp_path, content):
    path = tmp_path / "x.db"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        LatencyDB.open(path)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == content
    assert not (tmp_path / "x.db-wal").exists()


def test_a_gzipped_db_opens_read_only_in_memory_and_bad_ones_are_one_line_errors(tmp_path):
    plain = tmp_path / "lat.db"
    with _fresh(plain) as db:
        run = db.start_run(ENV, "test")
        db.claim(ENV, SIG, POINTS[:1], run)
        db.record(ENV, SIG, [(POINTS[0], _timing(1.5))], run, 0.1)
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    packed = tmp_path / "lat.db.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    before = packed.read_bytes()
    with LatencyDB.open(packed, create=False, readonly=True) as db:
        assert db.ok_points(ENV, SIG) == [({"m": 1}, 1.5)]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.conn.execute("DELETE FROM points")
    with LatencyDB.open_existing_or_empty(packed) as db:  # plan's way in: it only reads
        assert db.ok_points(ENV, SIG) == [({"m": 1}, 1.5)]
    for write in (lambda: LatencyDB.open(packed, create=False), lambda: upgrade(packed)):
        with pytest.raises(UserError, match="compressed DB is read-only; gunzip it"):
            write()
    assert packed.read_bytes() == before
    for name, content, message in [
            ("junk.db.gz", b"not gzip", "not a gzip-compressed dooly_fx latency DB"),
            ("text.db.gz", gzip.compress(b"hello" * 9), "not an SQLite file"),
            ("none.db.gz", None, "no such latency DB")]:
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message) as err:
            LatencyDB.open(tmp_path / name, create=False, readonly=True)
        assert "\n" not in str(err.value)


def test_other_sqlite_and_older_schema_are_refused_untouched(tmp_path):
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    before = other.read_bytes()
    with pytest.raises(UserError, match="not a dooly_fx latency DB"):
        LatencyDB.open(other)
    assert other.read_bytes() == before

    old = tmp_path / "old.db"
    _fresh(old).close()
    conn = sqlite3.connect(old)
    conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = old.read_bytes()
    with pytest.raises(UserError, match="older latency DB schema"):
        LatencyDB.open(old)
    assert old.read_bytes() == before


def test_claim_record_and_retry_rules(tmp_path):
    with _fresh(tmp_path / "lat.db") as db:
        run = db.start_run(ENV, "test")
        assert db.claim(ENV, SIG, POINTS[:3], run) == POINTS[:3]
        db.record(ENV, SIG, [(POINTS[0], _timing(1.0)), (POINTS[1], "oom"),
                             (POINTS[2], "RuntimeError: boom")], run, device_seconds=0.5)
        # ok and oom are done; a failure is retried until MAX_ATTEMPTS.
        assert db.claim(ENV, SIG, POINTS[:3], run) == [POINTS[2]]
        for _ in range(MAX_ATTEMPTS - 1):
            db.record(ENV, SIG, [(POINTS[2], "RuntimeError: boom")], run, device_seconds=0.1)
            db.claim(ENV, SIG, POINTS[2:3], run)
        rows = db.point_status(ENV, SIG)
        assert rows[(SIG, POINTS[0])]["median_ms"] == 1.0
        assert rows[(SIG, POINTS[1])]["status"] == "oom"
        assert rows[(SIG, POINTS[2])]["attempts"] == MAX_ATTEMPTS
        assert db.claim(ENV, SIG, POINTS[2:3], run) == []
        assert db.device_seconds(ENV)[SIG] == pytest.approx(0.5 + 0.1 * (MAX_ATTEMPTS - 1))


def _worker(path: str, start, results) -> None:
    db = LatencyDB.open(path)
    run = db.start_run(ENV, f"worker {os.getpid()}")
    start.wait()
    done = []
    for point in POINTS:
        for got in db.claim(ENV, SIG, [point], run):
            time.sleep(0.02)  # measuring
            db.record(ENV, SIG, [(got, _timing(float(len(got))))], run, device_seconds=0.02)
            done.append(got)
    db.finish_run(run)
    results.put(done)


def test_two_writers_lose_nothing_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "lat.db")
    _fresh(path).close()
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    done = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(done[0] + done[1]) == sorted(POINTS)  # every point measured exactly once
    with LatencyDB.open(path) as db:
        rows = db.point_status(ENV, SIG)
        count = db.conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
    assert count == len(POINTS)
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in rows.values())


def _killed_worker(path: str, ready) -> None:
    db = LatencyDB.open(path)
    run = db.start_run(ENV, "killed")
    claimed = db.claim(ENV, SIG, POINTS, run)
    db.record(ENV, SIG, [(p, _timing(1.0)) for p in claimed[:3]], run, device_seconds=0.3)
    ready.set()
    time.sleep(600)  # killed here, holding claims on the other five points


def test_kill_9_then_rerun_finishes_only_what_is_missing(tmp_path):
    path = str(tmp_path / "lat.db")
    _fresh(path).close()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_killed_worker, args=(path, ready))
    proc.start()
    assert ready.wait(timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with LatencyDB.open(path) as db:
        run = db.start_run(ENV, "rerun")
        again = db.claim(ENV, SIG, POINTS, run)
        assert again == POINTS[3:]  # the dead profiler's claims are taken over, nothing else


_V1_MODELS = """
CREATE TABLE models (name TEXT NOT NULL, env TEXT NOT NULL, config TEXT NOT NULL,
                     updated_at REAL NOT NULL, PRIMARY KEY (name, env));
CREATE TABLE model_units (model TEXT NOT NULL, env TEXT NOT NULL, phase TEXT NOT NULL,
                          regime TEXT NOT NULL, role TEXT NOT NULL, signature TEXT NOT NULL,
                          count INTEGER NOT NULL,
                          PRIMARY KEY (model, env, phase, regime, role, signature));
"""


def _refused_then_upgraded(path) -> tuple[int, int]:
    """An older DB file is refused by `open`, untouched, then `upgrade` in place."""
    from dooly_fx.db import upgrade

    before = path.read_bytes()
    with pytest.raises(UserError, match="upgrade-db"):
        LatencyDB.open(path)
    assert path.read_bytes() == before
    return upgrade(path)


def test_v1_db_is_refused_then_upgraded_in_place(tmp_path):
    """v1 kept the engine profile in the environment fingerprint; v2 moves it to `models`, so
    two engines share their common points. The upgrade keeps every point and model row."""
    import json

    from dooly_fx.db import fingerprint

    path = tmp_path / "v1.db"
    info = {"device": "cpu", "engine": "padded|eager|bfloat16", "dtype": "bfloat16"}
    old_env = fingerprint(info)
    with LatencyDB.open(path) as db:
        db.add_environment(old_env, "cpu", info)
        db.add_signatures([(SIG, "gemm", '{"kind":"gemm"}')])
        run = db.start_run(old_env, "test")
        db.claim(old_env, SIG, POINTS[:2], run)
        db.record(old_env, SIG, [(p, _timing(1.0)) for p in POINTS[:2]], run, 0.5)
        db.conn.executescript("DROP TABLE model_units; DROP TABLE models; DROP TABLE fits;"
                              + _V1_MODELS)
        db.conn.execute("INSERT INTO models VALUES ('m', ?, '{}', 0)", (old_env,))
        db.conn.execute("INSERT INTO model_units VALUES ('m', ?, 'decode', '', 'q', ?, 3)",
                        (old_env, SIG))
        db.conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    assert _refused_then_upgraded(path) == (1, 5)
    new_env = fingerprint({"device": "cpu"})
    with LatencyDB.open(path) as db:
        assert [e["fingerprint"] for e in db.environments()] == [new_env]
        assert len(db.ok_points(new_env, SIG)) == 2
        assert db.models() == [{"name": "m", "env": new_env, "engine": "padded|eager|bfloat16",
                                "config": {}}]
        assert db.model_units("m", new_env, "padded|eager|bfloat16") == [
            {"phase": "decode", "regime": "", "role": "q", "signature": SIG, "count": 3,
             "binding": {}}]
        assert db.conn.execute("SELECT env FROM runs").fetchone()[0] == new_env
        assert json.loads(db.conn.execute("SELECT info FROM environments").fetchone()[0]) == \
            {"device": "cpu"}


def test_v3_db_upgrades_to_host_probes_and_refresh_sets_them(tmp_path):
    """v3 points had no host probe: the upgrade keeps them, with none; `set_host` gives
    measured points a new host time and probe in one go, and the environment's host speed
    is the median probe."""

    path = tmp_path / "v3.db"
    with _fresh(path) as db:
        run = db.start_run(ENV, "profile")
        db.claim(ENV, SIG, POINTS[:3], run)
        db.record(ENV, SIG, [(p, _timing(1.0)) for p in POINTS[:3]], run, 0.5)
        db.conn.execute("ALTER TABLE points DROP COLUMN host_probe_ms")
        db.conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    assert _refused_then_upgraded(path) == (3, 5)
    with LatencyDB.open(path) as db:
        assert db.host_points(ENV, SIG) == [(0.01, None)] * 3
        assert db.host_probe_ms(ENV) is None
        assert db.host_unprobed(ENV, SIG) == sorted(POINTS[:3])
        run = db.start_run(ENV, "refresh")
        db.set_host(ENV, SIG, [(POINTS[0], 0.02, 0.5), (POINTS[1], 0.03, 0.7)], run, 0.1)
        assert sorted(db.host_points(ENV, SIG)) == [(0.01, None), (0.02, 0.5), (0.03, 0.7)]
        assert db.host_probe_ms(ENV) == pytest.approx(0.6)
        assert db.host_unprobed(ENV, SIG) == []
        assert [m for _, m in db.ok_points(ENV, SIG)] == [1.0] * 3


def test_v4_db_upgrades_to_sustained_timings_claimed_once(tmp_path):
    """v5 adds the `sustained` table: a v4 DB is refused, then upgraded with none. A claim
    holds a signature until it is recorded; a failed one is claimed again, a done one never;
    only `ok` rows are timings."""

    path = tmp_path / "v4.db"
    with _fresh(path) as db:
        db.conn.execute("DROP TABLE sustained")
        db.conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    assert _refused_then_upgraded(path) == (4, 5)
    with LatencyDB.open(path) as db:
        assert db.sustained(ENV) == {} and db.sustained_done(ENV) == set()
        run = db.start_run(ENV, "profile")
        assert db.claim_sustained(ENV, SIG, run)
        db.record_sustained(ENV, SIG, "failed", POINTS[0], 1.0, None, "boom", run, 0.5)
        assert db.sustained(ENV) == {} and db.sustained_done(ENV) == set()
        assert db.claim_sustained(ENV, SIG, run)
        db.record_sustained(ENV, SIG, "ok", '{"m": 4096}', 0.5, 0.55, None, run, 0.75)
        assert not db.claim_sustained(ENV, SIG, run)
        assert db.sustained(ENV) == {SIG: {"point": {"m": 4096}, "burst_ms": 0.5,
                                           "sustained_ms": 0.55}}
        assert db.sustained_done(ENV) == {SIG}
        assert db.device_seconds(ENV) == {SIG: 1.25}


def test_a_db_file_another_profiler_is_still_creating_is_opened_not_refused(tmp_path):
    """Regression: two profilers started on a new DB at once; the second found the file with
    no tables yet (the first holding the write lock to create them) and refused it as 'not a
    dooly_fx latency DB'. It now waits for the lock and opens the finished DB."""
    path = tmp_path / "lat.db"
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    first.execute("PRAGMA journal_mode = WAL").fetchall()
    first.execute("BEGIN IMMEDIATE")

    def finish_creating() -> None:
        time.sleep(0.5)
        first.execute("COMMIT")

    import threading

    thread = threading.Thread(target=finish_creating)
    thread.start()
    with LatencyDB.open(path) as db:
        meta = dict(db.conn.execute("SELECT key, value FROM meta").fetchall())
    thread.join()
    first.close()
    assert meta["app"] == "dooly_fx latency db"


def test_an_interrupted_profile_keeps_the_old_timing_of_a_forgotten_point(tmp_path):
    with _fresh(tmp_path / "lat.db") as db:
        run = db.start_run(ENV, "test")
        db.claim(ENV, SIG, POINTS[:2], run)
        db.record(ENV, SIG, [(POINTS[0], _timing(1.5)), (POINTS[1], _timing(2.5))], run, 0.1)
        assert db.forget(ENV, [SIG], "lowering changed") == 2
        assert db.claim(ENV, SIG, POINTS[:3], run) == POINTS[:3]
        db.release(ENV, SIG, POINTS[:3])  # Ctrl-C before any was measured again
        rows = db.conn.execute("SELECT point, status, median_ms, attempts FROM points "
                               "ORDER BY point").fetchall()
        assert sorted(tuple(r) for r in rows) == sorted([
            (POINTS[0], "failed", 1.5, 0), (POINTS[1], "failed", 2.5, 0)])
        assert db.claim(ENV, SIG, POINTS[:3], run) == POINTS[:3]  # all still to measure


def test_folders_empty_files_and_bad_schema_versions_are_one_line_errors(tmp_path):
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "empty.db").write_bytes(b"")
    bad = tmp_path / "bad.db"
    _fresh(bad).close()
    with sqlite3.connect(bad) as conn:
        conn.execute("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'")
    before = bad.read_bytes()
    for name, message in [("folder.db", "a folder, not a latency DB"),
                          ("empty.db", "an empty file, not a latency DB"),
                          ("bad.db", "corrupt latency DB \\(schema version 'abc'\\)")]:
        for attempt in (partial(LatencyDB.open, create=False), upgrade):
            with pytest.raises(UserError, match=message) as err:
                attempt(tmp_path / name)
            assert "\n" not in str(err.value)
    assert bad.read_bytes() == before
