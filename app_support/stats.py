"""Usage statistics in SQLite: one row per job, no file names, no e-mail addresses.

An optional e-mail is stored only as an HMAC-SHA256 with a secret salt, so unique users can be
counted but not identified. The salt comes from ``KNEE_STATS_SALT`` or is generated once and
kept next to the database (mode 0600); without it the hashes could be brute-forced from a list
of addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_utc TEXT NOT NULL,
    finished_utc TEXT NOT NULL,
    seconds REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error_code TEXT,
    user_hash TEXT,
    seg_source TEXT,
    nsm TEXT,
    retained INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_started ON jobs (started_utc);
"""
RECENT_N = 20  # jobs averaged for the typical run time


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StatsDB:
    """Append-only job log with summary queries; safe to share between threads."""

    def __init__(self, path: str | Path, salt: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # SQLite serialises writers; this avoids busy errors
        with closing(self._connect()) as con, con:
            con.executescript(_SCHEMA)
        self._salt = (salt or self._stored_salt()).encode()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def _stored_salt(self) -> str:
        salt_file = self.path.with_name(self.path.name + ".salt")
        if salt_file.exists():
            return salt_file.read_text().strip()
        salt = secrets.token_hex(32)
        # O_EXCL: if two processes start together, one wins and the other reads its salt.
        try:
            fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return salt_file.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(salt)
        return salt

    def user_hash(self, email: str | None) -> str | None:
        """Salted hash of a normalised e-mail address, or None when none was given."""
        email = (email or "").strip().lower()
        if not email:
            return None
        return hmac.new(self._salt, email.encode(), hashlib.sha256).hexdigest()

    def record(
        self,
        *,
        started: datetime,
        seconds: float,
        ok: bool,
        error_code: str | None = None,
        user_hash: str | None = None,
        seg_source: str | None = None,
        nsm: str | None = None,
        retained: bool = False,
    ) -> None:
        """Log one finished job (success or failure)."""
        row = (
            started.astimezone(timezone.utc).isoformat(), _utcnow().isoformat(), float(seconds),
            "ok" if ok else "failed", error_code, user_hash, seg_source, nsm, int(retained),
        )
        with self._lock, closing(self._connect()) as con, con:
            con.execute(
                "INSERT INTO jobs (started_utc, finished_utc, seconds, status, error_code, "
                "user_hash, seg_source, nsm, retained) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def summary(self) -> dict:
        """Totals for ``/stats`` and the footer."""
        today = _utcnow().date().isoformat()
        with closing(self._connect()) as con:
            ok_total, ok_today, failed_total, users = con.execute(
                "SELECT "
                "COALESCE(SUM(status = 'ok'), 0), "
                "COALESCE(SUM(status = 'ok' AND substr(started_utc, 1, 10) = ?), 0), "
                "COALESCE(SUM(status = 'failed'), 0), "
                "COUNT(DISTINCT user_hash) FROM jobs",
                (today,),
            ).fetchone()
            recent = [r[0] for r in con.execute(
                "SELECT seconds FROM jobs WHERE status = 'ok' ORDER BY id DESC LIMIT ?",
                (RECENT_N,),
            )]
            by_code = dict(con.execute(
                "SELECT COALESCE(error_code, 'INTERNAL'), COUNT(*) FROM jobs "
                "WHERE status = 'failed' GROUP BY 1 ORDER BY 1"
            ).fetchall())
        return {
            "total_processed": int(ok_total),
            "processed_today": int(ok_today),
            "failed_total": int(failed_total),
            "failures_by_code": {str(k): int(v) for k, v in by_code.items()},
            "avg_seconds_last_20": round(sum(recent) / len(recent), 1) if recent else None,
            "unique_users": int(users),
        }


def footer_markdown(summary: dict) -> str:
    """One line of usage figures for the bottom of the page."""
    avg = summary.get("avg_seconds_last_20")
    avg_txt = f"{avg:.0f} s" if avg is not None else "n/a"
    return (
        f"**Usage:** {summary['total_processed']} analyses processed "
        f"({summary['processed_today']} today, UTC) · typical run time {avg_txt} "
        f"(last {RECENT_N}) · {summary['failed_total']} failed"
    )
