"""Usage statistics: no file names, no e-mail addresses.

The figures come from the job store (``store.JobStore.summary``: one row per job, however often
it ran). An optional e-mail is stored there only as an HMAC-SHA256 with a secret salt, so unique
users can be counted but not identified. The salt comes from ``KNEE_STATS_SALT`` or is generated
once and kept next to the job store (mode 0600); without it the hashes could be brute-forced
from a list of addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .store import RECENT_N


class UserHasher:
    """Salted hashes of e-mail addresses; the salt survives restarts."""

    def __init__(self, salt_file: str | Path, salt: str | None = None):
        self.salt_file = Path(salt_file)
        self._salt = (salt or self._stored_salt()).encode()

    def _stored_salt(self) -> str:
        if self.salt_file.exists():
            return self.salt_file.read_text().strip()
        self.salt_file.parent.mkdir(parents=True, exist_ok=True)
        salt = secrets.token_hex(32)
        # O_EXCL: if two processes start together, one wins and the other reads its salt.
        try:
            fd = os.open(self.salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self.salt_file.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(salt)
        return salt

    def __call__(self, email: str | None) -> str | None:
        """Salted hash of a normalised e-mail address, or None when none was given."""
        email = (email or "").strip().lower()
        if not email:
            return None
        return hmac.new(self._salt, email.encode(), hashlib.sha256).hexdigest()


def salt_file_of(jobs_db: str | Path) -> Path:
    """Where the generated salt is kept: ``<jobs db>.salt``."""
    db = Path(jobs_db)
    return db.with_name(db.name + ".salt")


def footer_markdown(summary: dict) -> str:
    """One line of usage figures for the bottom of the page."""
    avg = summary.get("avg_seconds_last_20")
    avg_txt = f"{avg:.0f} s" if avg is not None else "n/a"
    return (
        f"**Usage:** {summary['total_processed']} analyses processed "
        f"({summary['processed_today']} today, UTC) · typical run time {avg_txt} "
        f"(last {RECENT_N}) · {summary['failed_total']} failed"
    )
