"""Copy-on-write capsule disks: qcow2 overlays made and flattened with `qemu-img`.

A capsule's disk is a qcow2 overlay on its base: the image's raw root filesystem for a cold
boot, or a template's frozen overlay for a clone. Chains stay short (at most overlay → template
overlay → raw base) because a template made from a capsule is flattened (`qemu-img convert`)
rather than stacked. No device-mapper: these hosts have none.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from nestbox.hostagent.vmm.base import DiskFormat

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"


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
    is, so it must not depend on a working directory). Takes a few milliseconds.

    :raise StorageError:
    """
    if not base.is_absolute():
        raise ValueError(f"backing file must be an absolute path: {base}")
    await _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(overlay))


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


async def backing_chain(path: Path) -> list[Path]:
    """`path` followed by every backing file under it, top to bottom.

    :raise StorageError:
    """
    out = await _qemu_img("info", "--backing-chain", "--output=json", "-U", str(path))
    layers: list[dict[str, Any]] = json.loads(out)
    return [Path(layer["filename"]) for layer in layers]
