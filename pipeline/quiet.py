"""The one native-output silencer: ``with silenced(): ...`` mutes C-level stdout (meshfix's
progress, VTK's 'INTERSECTION IS', nnU-Net's device note), Python prints and library warnings.

File descriptor 1, ``sys.stdout`` and the warning filters belong to the whole process, so two
threads that each saved and restored them would restore each other's replacement and lose
stdout for good. Here the first thread in mutes, the last one out restores; in between, other
threads' prints are muted too (a few seconds per mesh), which is the price of muting C code.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout

_lock = threading.Lock()
_depth = 0
_restore: ExitStack | None = None


@contextmanager
def silenced() -> Iterator[None]:
    """Mute stdout (fd 1 and ``sys.stdout``) and warnings while any caller is inside."""
    _enter()
    try:
        yield
    finally:
        _exit()


def _enter() -> None:
    global _depth, _restore
    with _lock:
        _depth += 1
        if _depth > 1:
            return
        stack = ExitStack()
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        stack.callback(_restore_fd1, saved)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(redirect_stdout(io.StringIO()))
        _restore = stack


def _exit() -> None:
    global _depth, _restore
    with _lock:
        _depth -= 1
        if _depth == 0 and _restore is not None:
            stack, _restore = _restore, None
            stack.close()


def _restore_fd1(saved: int) -> None:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)
