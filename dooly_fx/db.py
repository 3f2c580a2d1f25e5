"""The latency DB: one SQLite file (WAL mode), schema versioned. See `docs/latency_db.md`.

Rows are keyed by content hashes: a unit's signature (SHA-256 of its canonical JSON), an
environment's fingerprint (SHA-256 of device, driver, library versions and engine profile), and
a sweep point's canonical JSON. Coverage is per point: a point is `ok` only once a timing is
stored; `failed` and `oom` points are recorded as such (retried, or skipped as infeasible), and a
point being measured is `claimed` by one profiler process, so concurrent profilers split the work
and a killed profiler's claims are taken over.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import sqlite3
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dooly_fx.errors import UserError

APP_ID = "dooly_fx latency db"
SCHEMA_VERSION = 5
CLAIM_TIMEOUT_S = 600.0
"""A claim older than this, or held by a process that no longer exists, can be taken over."""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE environments (
    fingerprint TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    info TEXT NOT NULL,               -- JSON: device, capability, driver, cuda, versions
    created_at REAL NOT NULL
);
CREATE TABLE signatures (
    key TEXT PRIMARY KEY,             -- SHA-256 of canonical
    kind TEXT NOT NULL,
    canonical TEXT NOT NULL
);
CREATE TABLE models (               -- a model's units as captured with env's software
    name TEXT NOT NULL,
    env TEXT NOT NULL REFERENCES environments(fingerprint),
    engine TEXT NOT NULL,             -- engine profile label, e.g. padded|sdpa|bfloat16
    config TEXT NOT NULL,             -- JSON of the model's config fields
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, env, engine)
);
CREATE TABLE model_units (
    model TEXT NOT NULL,
    env TEXT NOT NULL REFERENCES environments(fingerprint),
    engine TEXT NOT NULL,
    phase TEXT NOT NULL,
    regime TEXT NOT NULL,
    role TEXT NOT NULL,
    signature TEXT NOT NULL REFERENCES signatures(key),
    count INTEGER NOT NULL,
    binding TEXT NOT NULL DEFAULT '{}', -- JSON: token variable -> request expression, {"m":"B*S"}
    PRIMARY KEY (model, env, engine, phase, regime, role, signature)
);
CREATE TABLE points (
    signature TEXT NOT NULL REFERENCES signatures(key),
    env TEXT NOT NULL REFERENCES environments(fingerprint),
    point TEXT NOT NULL,              -- canonical JSON of request values, e.g. {"m":512}
    status TEXT NOT NULL CHECK (status IN ('claimed', 'ok', 'failed', 'oom')),
    median_ms REAL, mean_ms REAL, min_ms REAL, max_ms REAL, std_ms REAL, n INTEGER,
    host_ms REAL,                     -- host time to issue the unit once (eager dispatch)
    host_probe_ms REAL,               -- the host probe beside it (hostinfo.host_probe_ms)
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    claimed_by TEXT,                  -- host:pid of the profiler holding the claim
    run_id INTEGER REFERENCES runs(id),
    updated_at REAL NOT NULL,
    PRIMARY KEY (signature, env, point)
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    env TEXT NOT NULL REFERENCES environments(fingerprint),
    command TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL              -- running | done | interrupted
);
CREATE TABLE run_signatures (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    signature TEXT NOT NULL REFERENCES signatures(key),
    device_seconds REAL NOT NULL,     -- wall time the device spent on this signature's points
    points INTEGER NOT NULL,
    PRIMARY KEY (run_id, signature)
);
CREATE TABLE fits (                 -- latency model of one signature in one environment
    signature TEXT NOT NULL REFERENCES signatures(key),
    env TEXT NOT NULL REFERENCES environments(fingerprint),
    method TEXT NOT NULL,             -- the candidate chosen by held-out error
    model TEXT NOT NULL,              -- JSON of the fitted LatencyModel
    cv_mape REAL,                     -- k-fold held-out MAPE of the chosen method (fraction)
    n_points INTEGER NOT NULL,
    points_digest TEXT NOT NULL,      -- SHA-256 of the ok points it was fitted on (staleness)
    fitted_at REAL NOT NULL,
    PRIMARY KEY (signature, env)
);
CREATE TABLE sustained (            -- one signature timed under sustained load (CUDA)
    signature TEXT NOT NULL REFERENCES signatures(key),
    env TEXT NOT NULL REFERENCES environments(fingerprint),
    status TEXT NOT NULL CHECK (status IN ('claimed', 'ok', 'short', 'failed', 'oom')),
    point TEXT,                       -- where: its measured point of most FLOPs
    burst_ms REAL,                    -- timed as its points are, after the GPU idled
    sustained_ms REAL,                -- timed after timing.SUSTAIN_WARMUP_MS back to back
    error TEXT,
    claimed_by TEXT,
    run_id INTEGER REFERENCES runs(id),
    updated_at REAL NOT NULL,
    PRIMARY KEY (signature, env)
);
CREATE INDEX points_env ON points (env, status);
"""

SHIPPED_DB = Path(__file__).parent / "data" / "h100.db.gz"
"""The H100 latency DB shipped with the package (profiles and fits; see data/README.md),
gzip-compressed: `LatencyDB.open` reads a `.gz` DB into memory, read-only."""

MAX_ATTEMPTS = 3
"""A point that failed this many times is not retried automatically."""


@dataclass(frozen=True)
class Timing:
    """Summary statistics of one measured point, in milliseconds."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    n: int
    host_ms: float | None = None
    host_probe_ms: float | None = None
    """How fast the host was while `host_ms` was measured (`hostinfo.host_probe_ms`)."""


TIMERS = ("stream", "do_bench")
"""`timing.measure`'s CUDA timers (see there). Each timer's samples have their own
environment: one profiled with a timer other than `UNNAMED_TIMER` names it in its info
(`timer`)."""
DEFAULT_TIMER = "stream"
"""The timer `profile` and `plan` use unless told."""
UNNAMED_TIMER = "do_bench"
"""The timer of an environment whose info names none (profiled before `stream` existed, or
with `--timer do_bench`)."""


def env_timer(info: dict) -> str:
    """The timer an environment's samples were taken with."""
    return info.get("timer", UNNAMED_TIMER)


DESCRIPTIVE_INFO = ("sms", "replay_overhead_us")
"""Environment info that follows from the rest (the device's multiprocessor count) or is
measured when it is first recorded (the timer's replay overhead, `timing.replay_overhead_ms`),
left out of the fingerprint so that it names the same environment every time."""


def fingerprint(info: dict) -> str:
    """An environment's fingerprint: SHA-256 of its info dict's canonical JSON (less
    `DESCRIPTIVE_INFO`)."""
    import hashlib

    text = json.dumps({k: v for k, v in info.items() if k not in DESCRIPTIVE_INFO},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_point(point: dict) -> str:
    """Canonical JSON of a sweep point (sorted keys, no spaces)."""
    return json.dumps(point, sort_keys=True, separators=(",", ":"))


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _held_by_another(row: sqlite3.Row, owner: str, now: float) -> bool:
    """Whether a claimed row is held by another profiler that is alive and within its
    claim's time (so not to be taken over)."""
    return row["status"] == "claimed" and row["claimed_by"] != owner and \
        _owner_alive(row["claimed_by"]) and now - row["updated_at"] < CLAIM_TIMEOUT_S


def _owner_alive(owner: str | None) -> bool:
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell; rely on the claim timeout
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class LatencyDB:
    """A connection to one latency DB file. Create with `LatencyDB.open(path)`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, create: bool = True, readonly: bool = False) -> LatencyDB:
        """Open (or create) a DB; a file that is not a current dooly_fx DB is a UserError.

        Nothing is written to a file that fails the check, nor to one opened `readonly` (the
        DB shipped with the package may sit in a read-only install). A gzip-compressed DB
        (`.gz`, as `SHIPPED_DB`) is read into memory; it opens only `readonly`.
        """
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path}: a folder, not a latency DB")
        if path.suffix == ".gz":
            if not readonly:
                _refuse_compressed(path)
            return cls(path, _open_compressed(path))
        exists = path.exists() and path.stat().st_size > 0
        if not exists and (not create or readonly):
            _require_file(path)  # says what is there instead
        if exists:
            _check_header(path)
        if readonly:
            conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro&immutable=1", uri=True)
        else:
            conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        with _closed_on_failure(conn, path):
            if readonly:
                _check_schema(conn, path)
                return cls(path, conn)
            conn.execute("PRAGMA busy_timeout = 60000")
            if exists and not _being_created(conn):
                _check_schema(conn, path)
                conn.execute("PRAGMA journal_mode = WAL").fetchall()  # finish: no open snapshot
            else:
                conn.execute("PRAGMA journal_mode = WAL").fetchall()  # finish: no open snapshot
                with _transaction(conn, immediate=True):
                    if not _has_table(conn, "meta"):  # another process may have just made it
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                            ("app", APP_ID), ("schema_version", str(SCHEMA_VERSION))])
            conn.execute("PRAGMA foreign_keys = ON")
        return cls(path, conn)

    @classmethod
    def open_existing_or_empty(cls, path: str | Path) -> LatencyDB:
        """The DB at `path` if there is one, else an empty in-memory DB: for read-only
        questions (`plan`) that must not create a file."""
        if Path(path).exists():
            return cls.open(path, create=False, readonly=Path(path).suffix == ".gz")
        return cls.open(":memory:")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> LatencyDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- environments, signatures, models ------------------------------------------------------

    def add_environment(self, fingerprint: str, device: str, info: dict) -> None:
        with _transaction(self.conn):
            self.conn.execute(
                "INSERT OR IGNORE INTO environments VALUES (?, ?, ?, ?)",
                (fingerprint, device, json.dumps(info, sort_keys=True), time.time()))

    def environments(self) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM environments ORDER BY created_at").fetchall()
        return [{"fingerprint": r["fingerprint"], "device": r["device"],
                 **json.loads(r["info"])} for r in rows]

    def add_signatures(self, signatures: Iterable[tuple[str, str, str]]) -> None:
        """Insert (key, kind, canonical JSON) rows; existing keys are left as they are."""
        with _transaction(self.conn):
            self.conn.executemany("INSERT OR IGNORE INTO signatures VALUES (?, ?, ?)",
                                  list(signatures))

    def signature(self, key: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM signatures WHERE key = ?", (key,)).fetchone()
        return None if row is None else {"key": row["key"], "kind": row["kind"],
                                         "canonical": json.loads(row["canonical"])}

    def set_model(self, name: str, env: str, engine: str, config: dict,
                  units: Sequence[tuple[str, str, str, str, int, dict]]) -> None:
        """Replace a model's units as captured in `env` for one engine profile: rows of (phase,
        regime, role, signature, count, binding). The units a model runs depend on the engine's
        library versions, so later stages read them from here rather than capturing again."""
        with _transaction(self.conn, immediate=True):
            self.conn.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                              (name, env, engine,
                               json.dumps(config, sort_keys=True, default=str), time.time()))
            self.conn.execute("DELETE FROM model_units WHERE model = ? AND env = ? AND engine = ?",
                              (name, env, engine))
            self.conn.executemany(
                "INSERT INTO model_units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(name, env, engine, *u[:5], json.dumps(u[5] if len(u) > 5 else {},
                                                        sort_keys=True)) for u in units])

    def model_units(self, name: str, env: str, engine: str) -> list[dict]:
        """A model's recorded units in `env` under `engine` (empty if never profiled there)."""
        rows = self.conn.execute(
            "SELECT phase, regime, role, signature, count, binding FROM model_units "
            "WHERE model = ? AND env = ? AND engine = ? ORDER BY phase, regime, role",
            (name, env, engine))
        return [{**dict(r), "binding": json.loads(r["binding"])} for r in rows]

    def models(self, env: str | None = None, engine: str | None = None) -> list[dict]:
        """Recorded (name, env, engine, config) rows, optionally of one environment/engine."""
        rows = self.conn.execute(
            "SELECT name, env, engine, config FROM models WHERE (? IS NULL OR env = ?) "
            "AND (? IS NULL OR engine = ?) ORDER BY name, engine", (env, env, engine, engine))
        return [{**dict(r), "config": json.loads(r["config"])} for r in rows]

    # --- points --------------------------------------------------------------------------------

    def point_status(self, env: str, signature: str | None = None) -> dict[tuple[str, str], dict]:
        """(signature, point) -> row for every recorded point of `env` (optionally one sig)."""
        query = "SELECT * FROM points WHERE env = ?"
        args: tuple = (env,)
        if signature is not None:
            query += " AND signature = ?"
            args = (env, signature)
        return {(r["signature"], r["point"]): dict(r) for r in self.conn.execute(query, args)}

    def claim(self, env: str, signature: str, points: Sequence[str], run_id: int) -> list[str]:
        """Claim the points not yet done for this process; returns the ones it got.

        A point is claimable when it has no row, failed fewer than MAX_ATTEMPTS times, or is
        claimed by a process that is gone or whose claim timed out.
        """
        owner, now = _owner(), time.time()
        got: list[str] = []
        with _transaction(self.conn, immediate=True):
            for point in points:
                row = self.conn.execute(
                    "SELECT status, attempts, claimed_by, updated_at FROM points "
                    "WHERE signature = ? AND env = ? AND point = ?",
                    (signature, env, point)).fetchone()
                if row is not None:
                    if row["status"] in ("ok", "oom"):
                        continue
                    if row["status"] == "failed" and row["attempts"] >= MAX_ATTEMPTS:
                        continue
                    if _held_by_another(row, owner, now):
                        continue
                self.conn.execute(
                    "INSERT INTO points (signature, env, point, status, attempts, claimed_by, "
                    "run_id, updated_at) VALUES (?, ?, ?, 'claimed', 0, ?, ?, ?) "
                    "ON CONFLICT (signature, env, point) DO UPDATE SET status = 'claimed', "
                    "claimed_by = excluded.claimed_by, run_id = excluded.run_id, "
                    "updated_at = excluded.updated_at",
                    (signature, env, point, owner, run_id, now))
                got.append(point)
        return got

    def record(self, env: str, signature: str, results: Sequence[tuple[str, Timing | str]],
               run_id: int, device_seconds: float) -> None:
        """Store a batch of results in one transaction: a Timing, 'oom', or an error message."""
        now = time.time()
        with _transaction(self.conn, immediate=True):
            for point, result in results:
                if isinstance(result, Timing):
                    self.conn.execute(
                        "UPDATE points SET status = 'ok', median_ms = ?, mean_ms = ?, "
                        "min_ms = ?, max_ms = ?, std_ms = ?, n = ?, host_ms = ?, "
                        "host_probe_ms = ?, error = NULL, attempts = attempts + 1, "
                        "claimed_by = NULL, run_id = ?, updated_at = ? "
                        "WHERE signature = ? AND env = ? AND point = ?",
                        (result.median_ms, result.mean_ms, result.min_ms, result.max_ms,
                         result.std_ms, result.n, result.host_ms, result.host_probe_ms,
                         run_id, now,
                         signature, env, point))
                else:
                    status = "oom" if result == "oom" else "failed"
                    self.conn.execute(
                        "UPDATE points SET status = ?, error = ?, attempts = attempts + 1, "
                        "claimed_by = NULL, run_id = ?, updated_at = ? "
                        "WHERE signature = ? AND env = ? AND point = ?",
                        (status, result, run_id, now, signature, env, point))
            self._add_run_seconds(run_id, signature, device_seconds, len(results))

    def forget(self, env: str, signatures: Sequence[str], why: str) -> int:
        """Mark the measured points of `signatures` in `env` to be measured again (a changed
        lowering times them differently): they become failed with no attempts, so fits skip
        them and the next profile claims them; their old timings stay until then. Returns the
        number of points marked."""
        with _transaction(self.conn, immediate=True):
            return sum(self.conn.execute(
                "UPDATE points SET status = 'failed', attempts = 0, error = ? WHERE env = ? "
                "AND signature = ? AND status IN ('ok', 'oom')", (why, env, sig)).rowcount
                for sig in signatures)

    def release(self, env: str, signature: str, points: Sequence[str]) -> None:
        """Give back claims this process did not finish (an interrupted profile): a point
        never measured goes; one with an earlier timing (`forget`) keeps it, to be measured
        again."""
        with _transaction(self.conn, immediate=True):
            self.conn.executemany(
                "DELETE FROM points WHERE signature = ? AND env = ? AND point = ? "
                "AND status = 'claimed' AND claimed_by = ? AND attempts = 0 "
                "AND median_ms IS NULL", [(signature, env, p, _owner()) for p in points])
            self.conn.executemany(
                "UPDATE points SET status = 'failed', claimed_by = NULL "
                "WHERE signature = ? AND env = ? AND point = ? AND status = 'claimed' "
                "AND claimed_by = ?", [(signature, env, p, _owner()) for p in points])

    def ok_points(self, env: str, signature: str) -> list[tuple[dict, float]]:
        """(point, median ms) of every measured point of one signature, in point order."""
        rows = self.conn.execute(
            "SELECT point, median_ms FROM points WHERE env = ? AND signature = ? "
            "AND status = 'ok' ORDER BY point", (env, signature))
        return [(json.loads(r["point"]), r["median_ms"]) for r in rows]

    def _host_rows(self, env: str, signature: str) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT point, host_ms, host_probe_ms FROM points WHERE env = ? AND signature = ? "
            "AND status = 'ok' AND host_ms IS NOT NULL ORDER BY point",
            (env, signature)).fetchall()

    def host_points(self, env: str, signature: str) -> list[tuple[float, float | None]]:
        """(host ms, host probe ms or None) of every measured point of one signature that
        has a host time, in point order."""
        return [(r["host_ms"], r["host_probe_ms"]) for r in self._host_rows(env, signature)]

    def host_samples(self, env: str) -> list[tuple[str, list[tuple[float, float]]]]:
        """(kind, [(host ms, host probe ms), ...]) per signature: every measured point of
        the environment with both, in signature and point order."""
        rows = self.conn.execute(
            "SELECT p.signature, s.kind, p.host_ms, p.host_probe_ms FROM points p "
            "JOIN signatures s ON s.key = p.signature WHERE p.env = ? AND p.status = 'ok' "
            "AND p.host_ms IS NOT NULL AND p.host_probe_ms IS NOT NULL "
            "ORDER BY p.signature, p.point", (env,))
        out: dict[str, tuple[str, list[tuple[float, float]]]] = {}
        for r in rows:
            out.setdefault(r["signature"], (r["kind"], []))[1].append(
                (r["host_ms"], r["host_probe_ms"]))
        return list(out.values())

    def host_unprobed(self, env: str, signature: str) -> list[str]:
        """Measured points of one signature recorded without a host probe, in point order;
        none once any of its points has one."""
        rows = self._host_rows(env, signature)
        if any(r["host_probe_ms"] is not None for r in rows):
            return []
        return [r["point"] for r in rows]

    def host_probe_ms(self, env: str) -> float | None:
        """The environment's host speed: the median host probe of its points (None before
        any point recorded one)."""
        probes = [r[0] for r in self.conn.execute(
            "SELECT host_probe_ms FROM points WHERE env = ? AND status = 'ok' "
            "AND host_probe_ms IS NOT NULL", (env,))]
        return statistics.median(probes) if probes else None

    def set_host(self, env: str, signature: str, rows: Sequence[tuple[str, float, float]],
                 run_id: int, device_seconds: float) -> None:
        """Store (point, host ms, host probe ms) re-measured for measured points of one
        signature (`profile --refresh-host`), in one transaction; their GPU times stay."""
        with _transaction(self.conn, immediate=True):
            self.conn.executemany(
                "UPDATE points SET host_ms = ?, host_probe_ms = ? "
                "WHERE signature = ? AND env = ? AND point = ? AND status = 'ok'",
                [(host, probe, signature, env, point) for point, host, probe in rows])
            self._add_run_seconds(run_id, signature, device_seconds, len(rows))

    def _add_run_seconds(self, run_id: int, signature: str, seconds: float, points: int) -> None:
        self.conn.execute(
            "INSERT INTO run_signatures VALUES (?, ?, ?, ?) ON CONFLICT (run_id, signature) "
            "DO UPDATE SET device_seconds = device_seconds + excluded.device_seconds, "
            "points = points + excluded.points", (run_id, signature, seconds, points))

    # --- sustained load -------------------------------------------------------------------------

    def claim_sustained(self, env: str, signature: str, run_id: int) -> bool:
        """Claim the sustained-load timing of one signature for this process; False when it
        is done (ok, short, oom) or held by another live profiler."""
        owner, now = _owner(), time.time()
        with _transaction(self.conn, immediate=True):
            row = self.conn.execute(
                "SELECT status, claimed_by, updated_at FROM sustained WHERE signature = ? "
                "AND env = ?", (signature, env)).fetchone()
            if row is not None and (row["status"] in ("ok", "short", "oom")
                                    or _held_by_another(row, owner, now)):
                return False
            self.conn.execute(
                "INSERT OR REPLACE INTO sustained (signature, env, status, claimed_by, run_id, "
                "updated_at) VALUES (?, ?, 'claimed', ?, ?, ?)",
                (signature, env, owner, run_id, now))
        return True

    def record_sustained(self, env: str, signature: str, status: str, point: str | None,
                         burst_ms: float | None, sustained_ms: float | None,
                         error: str | None, run_id: int, device_seconds: float) -> None:
        """Store a claimed signature's sustained-load timing: `ok` with both times, `short`
        (its largest point is too short to heat the GPU; `burst_ms` is that point's time),
        `oom` or `failed` (with `error`)."""
        with _transaction(self.conn, immediate=True):
            self.conn.execute(
                "UPDATE sustained SET status = ?, point = ?, burst_ms = ?, sustained_ms = ?, "
                "error = ?, claimed_by = NULL, run_id = ?, updated_at = ? "
                "WHERE signature = ? AND env = ?",
                (status, point, burst_ms, sustained_ms, error, run_id, time.time(),
                 signature, env))
            self._add_run_seconds(run_id, signature, device_seconds, 0)

    def sustained(self, env: str) -> dict[str, dict]:
        """signature -> {point (dict), burst_ms, sustained_ms} of every signature timed
        under sustained load (status ok) in `env`."""
        rows = self.conn.execute(
            "SELECT signature, point, burst_ms, sustained_ms FROM sustained WHERE env = ? "
            "AND status = 'ok'", (env,))
        return {r["signature"]: {"point": json.loads(r["point"]), "burst_ms": r["burst_ms"],
                                 "sustained_ms": r["sustained_ms"]} for r in rows}

    def sustained_done(self, env: str) -> set[str]:
        """Signatures whose sustained-load timing is settled in `env` (ok, short or oom)."""
        return {r[0] for r in self.conn.execute(
            "SELECT signature FROM sustained WHERE env = ? AND status IN ('ok', 'short', "
            "'oom')", (env,))}

    # --- fits ----------------------------------------------------------------------------------

    def save_fits(self, env: str, rows: Sequence[tuple[str, str, dict, float | None, int, str]]
                  ) -> None:
        """Store (signature, method, model JSON, cv_mape, n_points, points digest) rows."""
        now = time.time()
        with _transaction(self.conn, immediate=True):
            self.conn.executemany(
                "INSERT OR REPLACE INTO fits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(sig, env, method, json.dumps(model, sort_keys=True), cv, n, digest, now)
                 for sig, method, model, cv, n, digest in rows])

    def fits(self, env: str) -> dict[str, dict]:
        """signature -> {method, model (JSON dict), cv_mape, n_points, points_digest}."""
        rows = self.conn.execute("SELECT * FROM fits WHERE env = ?", (env,))
        return {r["signature"]: {"method": r["method"], "model": json.loads(r["model"]),
                                 "cv_mape": r["cv_mape"], "n_points": r["n_points"],
                                 "points_digest": r["points_digest"]} for r in rows}

    # --- runs ----------------------------------------------------------------------------------

    def start_run(self, env: str, command: str) -> int:
        with _transaction(self.conn):
            cur = self.conn.execute(
                "INSERT INTO runs (env, command, started_at, status) VALUES (?, ?, ?, 'running')",
                (env, command, time.time()))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str = "done") -> None:
        with _transaction(self.conn):
            self.conn.execute("UPDATE runs SET finished_at = ?, status = ? WHERE id = ?",
                              (time.time(), status, run_id))

    def device_seconds(self, env: str | None = None) -> dict[str, float]:
        """Device seconds spent per signature over all runs (of one environment)."""
        query = ("SELECT rs.signature, SUM(rs.device_seconds) AS s FROM run_signatures rs "
                 "JOIN runs r ON r.id = rs.run_id")
        args: tuple = ()
        if env is not None:
            query += " WHERE r.env = ?"
            args = (env,)
        query += " GROUP BY rs.signature"
        return {r["signature"]: r["s"] for r in self.conn.execute(query, args)}


@contextmanager
def _transaction(conn: sqlite3.Connection, immediate: bool = False) -> Iterator[None]:
    """One SQLite transaction; IMMEDIATE takes the write lock up front (no upgrade deadlock)."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _being_created(conn: sqlite3.Connection) -> bool:
    """An SQLite file with no tables yet: another profiler has just made it and holds the
    write lock while it creates the schema (the create path waits for that, then sees it)."""
    try:
        # fetchall: finish the statement, so no read snapshot outlives this check
        return conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()[0][0] == 0
    except sqlite3.DatabaseError:
        return False  # not readable as SQLite: the schema check says why


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (name,)).fetchone()
    return row is not None


def _require_file(path: Path) -> None:
    """A UserError unless `path` is a file with something in it (a DB to open, not make)."""
    if not path.exists():
        raise UserError(f"{path}: no such latency DB")
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a latency DB")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: an empty file, not a latency DB")


def _refuse_compressed(path: Path) -> None:
    """A gzip-compressed DB (`.gz`) is only ever read: writing to one is a UserError."""
    raise UserError(f"{path}: a compressed DB is read-only; gunzip it to write to it")


def _open_compressed(path: Path) -> sqlite3.Connection:
    """A read-only in-memory connection to the gzip-compressed DB at `path`."""
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: no such latency DB") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: not a gzip-compressed dooly_fx latency DB ({exc})") from None
    _check_header(path, data[:16])
    # Bytes 18-19 of the header are 2 in a WAL DB, which memory cannot hold: as rollback.
    data = data[:18] + b"\x01\x01" + data[20:]
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    with _closed_on_failure(conn, path):
        conn.deserialize(data)
        conn.execute("PRAGMA query_only = ON")
        _check_schema(conn, path)
    return conn


@contextmanager
def _closed_on_failure(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """Close `conn` when opening it fails; an SQLite error becomes a one-line UserError."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise UserError(f"{path}: not a usable dooly_fx latency DB ({exc})") from exc
    except UserError:
        conn.close()
        raise


def _check_header(path: Path, header: bytes | None = None) -> None:
    if header is None:
        with path.open("rb") as fh:
            header = fh.read(16)
    if header != b"SQLite format 3\x00":
        raise UserError(f"{path}: not a dooly_fx latency DB (not an SQLite file)")


def _check_schema(conn: sqlite3.Connection, path: Path,
                  versions: tuple[int, ...] = (SCHEMA_VERSION,)) -> int:
    """Refuse foreign, older, newer or corrupt files without writing to them; returns the
    schema version (one of `versions`)."""
    try:
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise UserError(f"{path}: corrupt latency DB ({ok})")
        if not _has_table(conn, "meta"):
            raise UserError(f"{path}: an SQLite file, but not a dooly_fx latency DB")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: corrupt latency DB ({exc})") from exc
    if meta.get("app") != APP_ID:
        raise UserError(f"{path}: an SQLite file, but not a dooly_fx latency DB")
    try:
        version = int(meta.get("schema_version", 0))
    except ValueError:
        raise UserError(f"{path}: corrupt latency DB (schema version "
                        f"{meta['schema_version']!r})") from None
    if version not in versions:
        if version in _UPGRADES:
            raise UserError(f"{path}: an older latency DB schema (v{version}); upgrade it with "
                            f"`python -m dooly_fx upgrade-db {path}`")
        older = "an older" if version < SCHEMA_VERSION else "a newer"
        raise UserError(f"{path}: {older} latency DB schema (v{version}; this dooly_fx reads "
                        f"v{SCHEMA_VERSION}); profile into a new file")
    return version


# --- upgrades ------------------------------------------------------------------------------------


def _upgrade_1(conn: sqlite3.Connection) -> None:
    """v1 -> v2: the engine profile leaves the environment fingerprint (a unit's signature
    already names its kernels and dtypes, so sdpa and eager profiles share every non-attention
    point) and moves to `models`/`model_units`; a `fits` table is added."""
    engines: dict[str, str] = {}
    for row in conn.execute("SELECT * FROM environments").fetchall():
        info = json.loads(row["info"])
        engines[row["fingerprint"]] = info.pop("engine", "padded|sdpa|bfloat16")
        info.pop("dtype", None)
        new = fingerprint(info)
        conn.execute("INSERT OR IGNORE INTO environments VALUES (?, ?, ?, ?)",
                     (new, row["device"], json.dumps(info, sort_keys=True), row["created_at"]))
        if new == row["fingerprint"]:
            continue
        conn.execute("UPDATE OR IGNORE points SET env = ? WHERE env = ?", (new, row["fingerprint"]))
        conn.execute("DELETE FROM points WHERE env = ?", (row["fingerprint"],))
        conn.execute("UPDATE runs SET env = ? WHERE env = ?", (new, row["fingerprint"]))
        engines[new] = engines[row["fingerprint"]]
    models = conn.execute("SELECT * FROM models").fetchall()
    units = conn.execute("SELECT * FROM model_units").fetchall()
    old_envs = set(engines)
    conn.execute("DROP TABLE model_units")
    conn.execute("DROP TABLE models")
    for statement in _SCHEMA.split(";"):
        if any(f"CREATE TABLE {t} " in statement for t in ("models", "model_units", "fits")):
            conn.execute(statement)
    new_env = {old: fingerprint({k: v for k, v in json.loads(info).items()
                                 if k not in ("engine", "dtype")})
               for old, info in conn.execute("SELECT fingerprint, info FROM environments")}
    conn.executemany("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                     [(r["name"], new_env[r["env"]], engines[r["env"]], r["config"],
                       r["updated_at"]) for r in models])
    conn.executemany("INSERT OR REPLACE INTO model_units (model, env, engine, phase, regime, "
                     "role, signature, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     [(r["model"], new_env[r["env"]], engines[r["env"]], r["phase"], r["regime"],
                       r["role"], r["signature"], r["count"]) for r in units])
    stale = [fp for fp in old_envs if fp not in set(new_env.values())]
    conn.executemany("DELETE FROM environments WHERE fingerprint = ?", [(fp,) for fp in stale])


def _upgrade_2(conn: sqlite3.Connection) -> None:
    """v2 -> v3: `model_units.binding`, what a unit's token variable stands for. Rows from v2
    get `{}` (re-running `profile` for the model records it)."""
    columns = {r["name"] for r in conn.execute("PRAGMA table_info(model_units)")}
    if "binding" not in columns:  # v1 -> v2 already made the table in its current form
        conn.execute("ALTER TABLE model_units ADD COLUMN binding TEXT NOT NULL DEFAULT '{}'")


def _upgrade_3(conn: sqlite3.Connection) -> None:
    """v3 -> v4: `points.host_probe_ms`, how fast the host was while a point's host time was
    measured. Points from v3 get NULL (`profile --refresh-host` measures it)."""
    if "host_probe_ms" not in {r["name"] for r in conn.execute("PRAGMA table_info(points)")}:
        conn.execute("ALTER TABLE points ADD COLUMN host_probe_ms REAL")


def _upgrade_4(conn: sqlite3.Connection) -> None:
    """v4 -> v5: the `sustained` table, each signature timed under sustained load. A v4 DB
    has none (`profile` on the GPU times them; predictions without one are at boost clock)."""
    if not _has_table(conn, "sustained"):
        conn.execute(next(s for s in _SCHEMA.split(";") if "CREATE TABLE sustained " in s))


_UPGRADES = {1: _upgrade_1, 2: _upgrade_2, 3: _upgrade_3, 4: _upgrade_4}
"""schema version -> function that upgrades it by one version, inside one transaction."""


def upgrade(path: str | Path) -> tuple[int, int]:
    """Upgrade a DB file in place to the current schema, in one transaction (all or nothing).
    Returns (from version, to version)."""
    path = Path(path)
    _require_file(path)
    if path.suffix == ".gz":
        _refuse_compressed(path)
    _check_header(path)
    conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        start = version = _check_schema(conn, path, (*_UPGRADES, SCHEMA_VERSION))
        conn.execute("PRAGMA foreign_keys = OFF")
        with _transaction(conn, immediate=True):
            while version != SCHEMA_VERSION:
                _UPGRADES[version](conn)
                version += 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                         (str(version),))
    finally:
        conn.close()
    return start, version
