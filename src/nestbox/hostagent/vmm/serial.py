"""The guest's serial console log, kept bounded: two parts, like logrotate's `copytruncate`.

QEMU appends to `serial.log` (`-chardev file,append=on`: every write goes to the current end,
so a truncation by us is seen at once and never leaves a sparse hole). A hostile guest can write
to its console as fast as QEMU emulates the UART, so the agent checks the size every
`CHECK_INTERVAL_S` (`QemuHypervisor.supervise`) and, once it is past a quarter of the cap,
copies its newest bytes (half the cap at most) to `serial.log.1` and truncates it to zero.
On disk at most: half the cap in `.1` + a quarter in `serial.log` + what the guest writes in one
interval (TCG's UART managed 150-250 KB/s here: ~125 KB; a faster UART under KVM overshoots
more). Bytes the guest writes between the copy and the truncation are lost (a few at most).

Readers never load the whole file: `tail` seeks to the end.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

CHECK_INTERVAL_S = 0.5


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def needs_rotation(path: Path, max_bytes: int) -> bool:
    """One `stat`: cheap enough for every running VM, every interval."""
    try:
        return os.stat(path).st_size > max_bytes // 4
    except FileNotFoundError:
        return False


def rotate(path: Path, max_bytes: int) -> None:
    """Move the newest bytes of `path` (half the cap at most) to `path.1`; truncate `path`."""
    keep = max_bytes // 2
    try:
        f = open(path, "r+b")  # noqa: SIM115 (closed below, before the slow part)
    except FileNotFoundError:
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - keep))
        newest = f.read(keep)
        f.truncate(0)
    old = rotated(path)
    tmp = old.with_name(old.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(newest)
    os.replace(tmp, old)


def tail(path: Path, n: int) -> bytes:
    """The last `n` bytes of the console (from `serial.log.1` too when `serial.log` was
    just rotated), never reading more than `n` bytes of either."""
    data = _tail(path, n)
    if len(data) < n:
        data = _tail(rotated(path), n - len(data)) + data
    return data


def _tail(path: Path, n: int) -> bytes:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read(n)
    return b""
