"""The app's durable job store: one SQLite file (WAL), one row per job.

Every state change is one transaction, taken with ``BEGIN IMMEDIATE`` so two threads (or two
processes sharing the file) can never both claim a job. A running job holds a lease that its
runner extends every few seconds; a row found ``running`` with an expired lease, or owned by a
process of this host that is gone, was interrupted (server restart, SIGKILL, OOM kill): it is
queued again once, in its original place, and fails with ``WORKER_CRASHED`` the second time
(Celery's ``acks_late``, with our stricter retry rule). Rows are never deleted: an ended job's
results expire (``expired``) but the row keeps counting in the usage statistics.

Schema (``PRAGMA application_id`` marks the file as ours, ``user_version`` is the schema):
``jobs(seq, id, state, request, attempts, owner, lease_until, created, started, finished,
step, fraction, ok, code, message, outcome, seconds, user_hash, seg_source, nsm, retained)``;
times are UNIX seconds, ``request``/``outcome`` the JSON of ``records``' dataclasses.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import ErrorCode, PipelineError

from .records import DONE, FAILED, QUEUED, REFUSED, RUNNING, AnalysisRequest, JobOutcome

log = logging.getLogger(__name__)

APPLICATION_ID = 0x4B4E4545  # "KNEE"
SCHEMA_VERSION = 1
MAX_ATTEMPTS = 2  # a job interrupted this many times fails with WORKER_CRASHED
RECENT_N = 20  # finished jobs averaged for ETAs and the typical run time

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'refused', 'failed',
                                         'expired')),
    request TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step TEXT NOT NULL DEFAULT '',
    fraction REAL NOT NULL DEFAULT 0,
    ok INTEGER,
    code TEXT,
    message TEXT NOT NULL DEFAULT '',
    outcome TEXT,
    seconds REAL,
    user_hash TEXT,
    seg_source TEXT,
    nsm TEXT,
    retained INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass
class JobRow:
    """One row of the store, decoded."""

    seq: int
    id: str
    state: str
    request: AnalysisRequest | None
    attempts: int
    owner: str | None
    lease_until: float | None
    created: float
    started: float | None
    finished: float | None
    step: str
    fraction: float
    ok: bool | None
    code: str | None
    message: str
    outcome: JobOutcome | None
    seconds: float | None

    @property
    def ended(self) -> bool:
        return self.state not in (QUEUED, RUNNING)


def _row(r: sqlite3.Row) -> JobRow:
    return JobRow(
        seq=r["seq"], id=r["id"], state=r["state"],
        request=AnalysisRequest.from_json(r["request"]) if r["request"] else None,
        attempts=r["attempts"], owner=r["owner"], lease_until=r["lease_until"],
        created=r["created"], started=r["started"], finished=r["finished"], step=r["step"],
        fraction=r["fraction"], ok=None if r["ok"] is None else bool(r["ok"]), code=r["code"],
        message=r["message"], outcome=JobOutcome.from_json(r["outcome"]) if r["outcome"] else None,
        seconds=r["seconds"])


def utc_iso(t: float | None) -> str | None:
    """UNIX seconds as an ISO-8601 UTC string (None stays None)."""
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def new_owner() -> str:
    """This process's lease-holder name: host, pid and a random token (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def owner_gone(owner: str | None, me: str) -> bool:
    """Whether the process named ``owner`` is certainly dead: it ran on this host and its pid
    is not alive, or is this very process's pid under another token (a container restarted
    with the same pid). Another host's owner is only known dead when its lease expires."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, token = rest.partition(":")
    my_host, my_pid, my_token = me.split(":")
    if host != my_host or not pid_text.isdigit():
        return False
    if pid_text == my_pid:
        return token != my_token
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobStore:
    """Thread-safe access to the job store file (one connection per thread, one writer)."""

    def __init__(self, path: str | os.PathLike, lease_s: float = 30.0):
        self.path = Path(path)
        self.lease_s = float(lease_s)
        self._local = threading.local()
        self._write = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_checked()

    # ------------------------------------------------------------------ opening

    def _open_checked(self) -> None:
        """Create the schema, or refuse a file that is corrupt or not a job store (never
        deleting it: it may be somebody's data)."""
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            con = self._con()
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if existed and (app_id != APPLICATION_ID and tables - {"sqlite_sequence"}):
                raise PipelineError(
                    ErrorCode.JOB_STORE_INVALID,
                    f"{self.path} is an SQLite file of another application (tables: "
                    f"{', '.join(sorted(tables))}); set KNEE_JOBS_DB to another path.")
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise PipelineError(ErrorCode.JOB_STORE_INVALID,
                                    f"{self.path} is corrupt ({check}); move it away or set "
                                    "KNEE_JOBS_DB to another path.")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise PipelineError(
                    ErrorCode.JOB_STORE_INVALID,
                    f"{self.path} was written by a newer version of the app (schema {version} "
                    f"> {SCHEMA_VERSION}); upgrade the app or set KNEE_JOBS_DB.")
            con.execute("PRAGMA journal_mode = WAL")
            with self._write:
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise PipelineError(ErrorCode.JOB_STORE_INVALID,
                                f"{self.path} is not a usable job store ({exc}); move it away "
                                "or set KNEE_JOBS_DB to another path.") from None
        except PipelineError:
            self.close()
            raise

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # Autocommit: each write below opens its own BEGIN IMMEDIATE transaction.
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                  check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 30000")
            con.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at each checkpoint
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def _transaction(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` in one write transaction (all or nothing)."""
        with self._write:
            con = self._con()
            con.execute("BEGIN IMMEDIATE")
            try:
                value = fn(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            return value

    # ------------------------------------------------------------------ writes

    def add(self, job_id: str, request: AnalysisRequest, *, queue_max: int | None = None,
            nsm: str | None = None) -> JobRow:
        """Queue a job; QUEUE_FULL when ``queue_max`` jobs already wait."""
        def insert(con: sqlite3.Connection) -> None:
            if queue_max is not None:
                waiting = con.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'"
                                      ).fetchone()[0]
                if waiting >= queue_max:
                    raise PipelineError(ErrorCode.QUEUE_FULL, str(waiting))
            con.execute(
                "INSERT INTO jobs (id, state, request, created, user_hash, seg_source, nsm) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, request.to_json(), time.time(), request.user_hash, request.seg_source,
                 nsm or request.shape_model))
        self._transaction(insert)
        return self.get(job_id)

    def add_refusal(self, job_id: str, code: str, message: str, *, user_hash: str | None,
                    seg_source: str | None, nsm: str | None) -> None:
        """A request refused before it was queued (counted in the statistics)."""
        now = time.time()
        outcome = JobOutcome(REFUSED, code=code, message=message)
        self._transaction(lambda con: con.execute(
            "INSERT INTO jobs (id, state, created, finished, ok, code, message, outcome, seconds,"
            " user_hash, seg_source, nsm) VALUES (?, 'refused', ?, ?, 0, ?, ?, ?, 0, ?, ?, ?)",
            (job_id, now, now, code, message, outcome.to_json(), user_hash, seg_source, nsm)))

    def claim(self, owner: str) -> JobRow | None:
        """The next queued job (submission order), now running under ``owner``'s lease."""
        def take(con: sqlite3.Connection) -> str | None:
            r = con.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
                            ).fetchone()
            if r is None:
                return None
            now = time.time()
            con.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, owner = ?, "
                "lease_until = ?, started = ?, step = 'Starting', fraction = 0 WHERE id = ?",
                (owner, now + self.lease_s, now, r["id"]))
            return r["id"]
        job_id = self._transaction(take)
        return self.get(job_id) if job_id else None

    def heartbeat(self, job_ids: list[str], owner: str) -> None:
        """Extend the leases ``owner`` holds on ``job_ids``."""
        if not job_ids:
            return
        until = time.time() + self.lease_s
        marks = ",".join("?" * len(job_ids))
        self._transaction(lambda con: con.execute(
            f"UPDATE jobs SET lease_until = ? WHERE owner = ? AND state = 'running' "
            f"AND id IN ({marks})", (until, owner, *job_ids)))

    def progress(self, job_id: str, owner: str, step: str, fraction: float) -> None:
        self._transaction(lambda con: con.execute(
            "UPDATE jobs SET step = ?, fraction = ? WHERE id = ? AND owner = ? "
            "AND state = 'running'", (step, float(fraction), job_id, owner)))

    def finish(self, job_id: str, owner: str, outcome: JobOutcome) -> bool:
        """End a running job with ``outcome`` (its files are already in place); False when
        the job is no longer ``owner``'s (its lease expired and someone else took it)."""
        now = time.time()

        def end(con: sqlite3.Connection) -> bool:
            cur = con.execute(
                "UPDATE jobs SET state = ?, finished = ?, ok = ?, code = ?, message = ?, "
                "outcome = ?, seconds = ?, retained = ?, owner = NULL, lease_until = NULL "
                "WHERE id = ? AND owner = ? AND state = 'running'",
                (outcome.state, now, int(outcome.state == DONE), outcome.code,
                 outcome.message, outcome.to_json(), outcome.seconds, int(outcome.retained),
                 job_id, owner))
            return cur.rowcount == 1
        return self._transaction(end)

    def interrupted(self, job_id: str, owner: str | None, message: str) -> str:
        """A run that ended without an outcome (its worker died): queued again in its place,
        or failed with WORKER_CRASHED after ``MAX_ATTEMPTS``. Returns the new state."""
        return self._transaction(lambda con: self._interrupt(con, job_id, owner, message))

    def _interrupt(self, con: sqlite3.Connection, job_id: str, owner: str | None,
                   message: str) -> str:
        r = con.execute("SELECT attempts FROM jobs WHERE id = ? AND state = 'running'"
                        + (" AND owner = ?" if owner else ""),
                        (job_id, owner) if owner else (job_id,)).fetchone()
        if r is None:
            return ""
        if r["attempts"] < MAX_ATTEMPTS:
            con.execute("UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL, "
                        "step = '', fraction = 0 WHERE id = ?", (job_id,))
            return QUEUED
        now = time.time()
        text = f"{message} It was interrupted {r['attempts']} times and is not run again."
        outcome = JobOutcome(FAILED, code=ErrorCode.WORKER_CRASHED.value, message=text)
        con.execute(
            "UPDATE jobs SET state = 'failed', finished = ?, ok = 0, code = ?, message = ?, "
            "outcome = ?, seconds = ? - started, owner = NULL, lease_until = NULL WHERE id = ?",
            (now, outcome.code, text, outcome.to_json(), now, job_id))
        return FAILED

    def recover(self, me: str, running_here: set[str]) -> dict[str, str]:
        """Rows ``running`` whose lease expired or whose owner is gone (``me``'s own rows that
        are not in ``running_here`` included): queued again or failed (see ``interrupted``).
        Returns ``{job id: new state}``."""
        now = time.time()

        def sweep(con: sqlite3.Connection) -> dict[str, str]:
            found = {}
            for r in con.execute("SELECT id, owner, lease_until FROM jobs "
                                 "WHERE state = 'running'").fetchall():
                if r["owner"] == me and r["id"] in running_here:
                    continue
                if (r["owner"] == me or (r["lease_until"] or 0) < now
                        or owner_gone(r["owner"], me)):
                    found[r["id"]] = self._interrupt(
                        con, r["id"], None,
                        "The server stopped while the job ran (restart, crash or out of "
                        "memory); please submit it again, or report it if it happens again.")
            return found
        return self._transaction(sweep)

    def expire(self, ttl_s: float) -> list[str]:
        """Ended jobs finished more than ``ttl_s`` ago become ``expired``; returns their ids
        (their folders are the caller's to delete)."""
        cutoff = time.time() - ttl_s

        def sweep(con: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in con.execute(
                "SELECT id FROM jobs WHERE state IN ('done', 'refused', 'failed') "
                "AND finished < ?", (cutoff,))]
            con.executemany("UPDATE jobs SET state = 'expired' WHERE id = ?",
                            [(i,) for i in ids])
            return ids
        return self._transaction(sweep)

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> JobRow | None:
        r = self._con().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(r) if r is not None else None

    def active(self) -> list[JobRow]:
        """Queued and running jobs, in submission order."""
        return [_row(r) for r in self._con().execute(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq")]

    def ids_in(self, states: tuple[str, ...]) -> set[str]:
        marks = ",".join("?" * len(states))
        return {r[0] for r in self._con().execute(
            f"SELECT id FROM jobs WHERE state IN ({marks})", states)}

    def position(self, seq: int) -> int:
        """1 for the next queued job to run, 2 after it, ...; 0 when not queued."""
        r = self._con().execute(
            "SELECT state, (SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq <= ?) "
            "FROM jobs WHERE seq = ?", (seq, seq)).fetchone()
        return int(r[1]) if r is not None and r[0] == QUEUED else 0

    def counts(self) -> dict[str, Any]:
        """Queued and running counts and the oldest queued job's age (s)."""
        r = self._con().execute(
            "SELECT COALESCE(SUM(state = 'queued'), 0), COALESCE(SUM(state = 'running'), 0), "
            "MIN(CASE WHEN state = 'queued' THEN created END) FROM jobs").fetchone()
        oldest = None if r[2] is None else round(time.time() - r[2], 1)
        return {"queued": int(r[0]), "running": int(r[1]), "oldest_queued_age_s": oldest}

    def mean_seconds(self) -> float | None:
        """Mean run time of the last ``RECENT_N`` successful jobs."""
        rows = [r[0] for r in self._con().execute(
            "SELECT seconds FROM jobs WHERE ok = 1 AND seconds IS NOT NULL "
            "ORDER BY finished DESC LIMIT ?", (RECENT_N,))]
        return sum(rows) / len(rows) if rows else None

    def summary(self) -> dict[str, Any]:
        """Usage totals for ``/stats``: each job counts once, however often it was run."""
        start = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        con = self._con()
        ok_total, ok_today, failed_total, users = con.execute(
            "SELECT COALESCE(SUM(ok = 1), 0), COALESCE(SUM(ok = 1 AND created >= ?), 0), "
            "COALESCE(SUM(ok = 0), 0), COUNT(DISTINCT user_hash) FROM jobs",
            (start.timestamp(),)).fetchone()
        by_code = dict(con.execute(
            "SELECT COALESCE(code, 'INTERNAL'), COUNT(*) FROM jobs WHERE ok = 0 "
            "GROUP BY 1 ORDER BY 1").fetchall())
        mean = self.mean_seconds()
        return {
            "total_processed": int(ok_total),
            "processed_today": int(ok_today),
            "failed_total": int(failed_total),
            "failures_by_code": {str(k): int(v) for k, v in by_code.items()},
            "avg_seconds_last_20": round(mean, 1) if mean is not None else None,
            "unique_users": int(users),
        }

