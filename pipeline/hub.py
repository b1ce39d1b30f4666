"""The one way weights come from the Hugging Face Hub: cache first, then the network.

A cached snapshot is used without a network round trip (and works with ``HF_HUB_OFFLINE=1``);
only when the cache lacks the files, and downloading is allowed, is the Hub asked. ``HF_TOKEN``
from the environment is passed for gated or private repos. Callers turn ``HubUnavailable``
into their own MODEL_UNAVAILABLE message (what the files are, how to provide them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path


class HubUnavailable(Exception):
    """The files could not be had from the cache or the Hub; ``str()`` says why, in a line."""


def snapshot(
    repo_id: str,
    *,
    allow_patterns: Sequence[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    complete: Callable[[Path], bool] = lambda _: True,
) -> Path:
    """Local snapshot folder of ``repo_id`` holding ``allow_patterns``, for which ``complete``
    is true: the cached one if it is complete, else (``download``) a fresh download."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubUnavailable("huggingface_hub is not installed") from None
    kwargs = dict(revision=revision, allow_patterns=list(allow_patterns or []) or None,
                  cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                  token=os.environ.get("HF_TOKEN") or None)
    reasons: list[str] = []
    for local_only in (True, False) if download else (True,):
        try:
            path = Path(snapshot_download(repo_id=repo_id, local_files_only=local_only, **kwargs))
        except Exception as exc:  # network, auth, gating, offline: all mean "not available"
            first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
            reasons.append(f"{type(exc).__name__}: {first}")
            continue
        if complete(path):
            return path
        reasons.append(f"files missing from {'the cache' if local_only else 'the repo'}")
    raise HubUnavailable(reasons[-1] if reasons else "not cached")


def commit_of(snapshot_dir: Path) -> str | None:
    """The commit hash a Hub snapshot folder is named after (None for other folders)."""
    name = Path(snapshot_dir).name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None
