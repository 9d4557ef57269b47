"""Copy-on-write capsule disks: qcow2 overlays made and flattened with `qemu-img`.

A capsule's disk is a qcow2 overlay on its base: the image's raw root filesystem for a cold
boot, or a template's frozen overlay for a clone. Chains stay short (at most overlay → template
overlay → raw base) because a template made from a capsule is flattened (`qemu-img convert`)
rather than stacked. No device-mapper: these hosts have none.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from nestbox.hostagent.vmm.base import DiskFormat

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
FILE_MODE = 0o600
"""Disks hold the guest's data: owner (root) only."""


class StorageError(Exception):
    """A `qemu-img` command failed; `command`, `exit_code` and `stderr` say how."""

    def __init__(self, command: list[str], exit_code: int, stderr: str) -> None:
        super().__init__(f"{' '.join(command)!r} exited {exit_code}: {stderr.strip()[-800:]}")
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr


async def _qemu_img(*args: str) -> str:
    argv = [QEMU_IMG, *args]
    try:
        proc = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise StorageError(argv, -1, str(err)) from err
    if proc.returncode != 0:
        raise StorageError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout.decode(errors="replace")


async def create_overlay(base: Path, base_format: DiskFormat, overlay: Path) -> None:
    """Create `overlay` (qcow2) backed by `base`, an absolute path (stored in the overlay as
    is, so it must not depend on a working directory).

    Written here (`write_overlay`, well under a millisecond) rather than by `qemu-img create`
    (a process: several milliseconds on every clone's critical path); `qemu-img` remains the
    fallback for a base this writer does not cover.

    :raise StorageError: :raise OSError:
    """
    if not base.is_absolute():
        raise ValueError(f"backing file must be an absolute path: {base}")
    if await anyio.to_thread.run_sync(write_overlay, base, base_format, overlay):
        return
    await _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(overlay))
    await anyio.to_thread.run_sync(os.chmod, overlay, FILE_MODE)


# ── the qcow2 overlay writer ─────────────────────────────────────────────────────────────
# The file `qemu-img create -f qcow2 -b BASE -F FMT` (QEMU 7.2) writes, byte for byte: a v3
# header (refcount order 4, zlib) with the backing-format and feature-name extensions and the
# backing file name in cluster 0, the refcount table in cluster 1, one refcount block in
# cluster 2 (clusters 0-3 used once), the L1 table (all zero: nothing allocated) in cluster 3.
# A unit test compares it with qemu-img's output.

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_FEATURES = (
    (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
    (0, 3, b"compression type"), (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
)  # fmt: skip


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def _virtual_size(base: Path, base_format: DiskFormat) -> int | None:
    if base_format == "raw":
        return base.stat().st_size
    with base.open("rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return None
    return int(struct.unpack(">Q", head[24:32])[0])


def write_overlay(base: Path, base_format: DiskFormat, overlay: Path) -> bool:
    """Write `overlay` as `qemu-img create` would; False (nothing written) if this base is
    outside what the writer covers. :raise OSError:"""
    size = _virtual_size(base, base_format)
    name = str(base).encode()
    l2_bits = CLUSTER_BITS - 3  # 8-byte L2 entries
    if size is None or size % 512 or size <= 0:
        return False
    l1_size = -(-size // (1 << (CLUSTER_BITS + l2_bits)))
    extensions = (
        _extension(0xE2792ACA, base_format.encode())
        + _extension(0x6803F857, b"".join(struct.pack(">BB46s", t, b, n) for t, b, n in _FEATURES))
        + _extension(0, b"")
    )
    header_length = 112
    backing_offset = header_length + len(extensions)
    if l1_size * 8 > CLUSTER or backing_offset + len(name) > CLUSTER or len(name) > 1023:
        return False
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII8s",
        b"QFI\xfb", 3, backing_offset, len(name), CLUSTER_BITS, size, 0, l1_size, 3 * CLUSTER,
        CLUSTER, 1, 0, 0, 0, 0, 0, 4, header_length, b"",
    )  # fmt: skip
    fd = os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.pwrite(fd, header + extensions + name, 0)
        os.pwrite(fd, struct.pack(">Q", 2 * CLUSTER), CLUSTER)  # refcount table -> block
        os.pwrite(fd, struct.pack(">4H", 1, 1, 1, 1), 2 * CLUSTER)  # clusters 0-3
        os.ftruncate(fd, 3 * CLUSTER + l1_size * 8)
    except BaseException:
        os.close(fd)
        overlay.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


async def flatten(
    source: Path, dest: Path, *, backing: Path | None = None, backing_format: DiskFormat = "raw"
) -> None:
    """Merge `source`'s backing chain into one qcow2 `dest`: standalone, or (with `backing`)
    an overlay on `backing` holding only the clusters that differ from it, so a template made
    from a clone is one layer over the raw image instead of a chain of three.

    :raise StorageError:
    """
    extra = ["-B", str(backing), "-F", backing_format] if backing is not None else []
    await _qemu_img("convert", "-q", "-O", "qcow2", *extra, str(source), str(dest))
    await anyio.to_thread.run_sync(os.chmod, dest, FILE_MODE)


async def backing_chain(path: Path) -> list[Path]:
    """`path` followed by every backing file under it, top to bottom.

    :raise StorageError:
    """
    out = await _qemu_img("info", "--backing-chain", "--output=json", "-U", str(path))
    layers: list[dict[str, Any]] = json.loads(out)
    return [Path(layer["filename"]) for layer in layers]
