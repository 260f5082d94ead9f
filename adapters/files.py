"""Runtime files (labels, spooled mail): written whole or not at all, readable by the owner only."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, before_rename: Callable[[], None] | None = None) -> Path:
    """Write `data` at `path` atomically (temp file beside it, fsync, rename, fsync the folder), mode 0600.

    Readers see no file or the whole one. A temp file left by an earlier write that was killed before its
    rename (they hold names and addresses) is removed once this write has landed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: 0600
    try:
        # Locked until renamed: a concurrent writer of the same path (two replays of one RMA both render its
        # label) must not take this live temp file for a killed writer's and remove it.
        with os.fdopen(fd, "wb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            if before_rename is not None:
                before_rename()
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        _remove_if_abandoned(stale)
    return path


def _remove_if_abandoned(stale: Path) -> None:
    """Remove a temp file no live writer holds (a killed process's locks are gone with it); an empty, young one
    may be a writer's between creating it and locking it."""
    try:
        with open(stale, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = os.fstat(fh.fileno())
            if info.st_size == 0 and time.time() - info.st_mtime < 5:
                return
            stale.unlink(missing_ok=True)
    except (BlockingIOError, FileNotFoundError):
        pass


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); best effort where a folder cannot be opened or synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)
