"""Atomic file writes: a reader sees the old bytes or the new, never a part.

One temp file in the target's directory (``.{name}.….tmp``, so directory listings that skip dot
files never see it), flushed and fsynced, then renamed into place; on any error the temp file is
removed and the error raised.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, text: bool = False, sync_dir: bool = False) -> Iterator[IO[Any]]:
    """Yield a file that replaces ``path`` when the block ends without error (binary, or UTF-8 text
    with untranslated newlines when ``text``); ``sync_dir`` also fsyncs the directory, so the rename
    survives a crash. Raises OSError from the file system."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb")) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        try:
            dir_fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, sync_dir=sync_dir) as fh:
        fh.write(data)
