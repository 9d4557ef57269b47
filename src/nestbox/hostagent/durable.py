"""Durable file writes for the agent's state: records, metadata, snapshots, template versions.

One place for the crash rule every writer follows: a file is replaced by writing a temporary
file beside it, fsyncing it, renaming it over the target and fsyncing the directory, so a crash
leaves the old file or the new one, never a mix. Blocking: call from a worker thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` durably (see the module docstring)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # a temporary file an older run left keeps its mode otherwise
        with os.fdopen(fd, "w", closefd=False) as f:
            f.write(text)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file (its data) or a directory (its entries: creations, renames, removals)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2
"""<linux/fs.h>: start writeback of the range's dirty pages, do not wait for it."""


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int]:
    func = ctypes.CDLL(None, use_errno=True).sync_file_range
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", func)


def start_writeback(fd: int) -> None:
    """Send the file's dirty pages so far to the disk without waiting for them
    (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later fsync has only the rest to wait
    for. Makes nothing durable by itself. Blocks only while the device's queue is full.

    :raise OSError:
    """
    if _sync_file_range()(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
