"""Where the image cache keeps what, and the two rules that keep it consistent.

    <images_dir>/
      .lock                  flock'ed by a build while it builds in tmp/: one at a time
      .lock-base             flock'ed while the basetree stage builds in tmp-base/
      tmp/<stage>-<random>/  a stage being built; removed on failure and by the next build
      tmp-base/              the same for the (slow) basetree stage
      debs/                  debootstrap's .deb cache (speeds up a tree rebuild)
      kernels/<key>/         vmlinux, initramfs.cpio.gz, meta.json
      trees/<key>/           root/ (debootstrap tree + users + config), meta.json; also the
                             `base` flavour's tree (the tree plus its packages)
      deps/<key>/            lib/ (envd's pinned Python dependencies), meta.json
      guest/<version>/       rootfs.ext4, vmlinux, initramfs.cpio.gz (hard links), manifest.json

Rule 1: a stage is built in `tmp/` and renamed into place, so anything under kernels/, trees/,
deps/ or guest/ is complete. Rule 2: keys and versions are content hashes of the stage's inputs
(see `inputs.py`), so an existing directory is reused as is and never modified.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestbox.hostagent.durable import fsync_path

MANIFEST = "manifest.json"
META = "meta.json"
VMLINUX = "vmlinux"
INITRD = "initramfs.cpio.gz"
ROOTFS = "rootfs.ext4"
_MNT_DETACH = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A complete guest image: what a VM boots. `version` names it in the cache."""

    version: str
    kernel: Path
    initrd: Path
    rootfs: Path


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Paths inside one image cache directory."""

    root: Path

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def tmp_base(self) -> Path:
        return self.root / "tmp-base"

    @property
    def debs(self) -> Path:
        return self.root / "debs"

    def kernel(self, key: str) -> Path:
        return self.root / "kernels" / key

    def tree(self, key: str) -> Path:
        return self.root / "trees" / key

    def deps(self, key: str) -> Path:
        return self.root / "deps" / key

    def guest(self, version: str) -> Path:
        return self.root / "guest" / version

    def guest_dirs(self) -> list[Path]:
        base = self.root / "guest"
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def image_at(directory: Path) -> GuestImage:
    """The `GuestImage` whose files are in `directory` (a `guest/<version>/`)."""
    return GuestImage(
        version=directory.name,
        kernel=directory / VMLINUX,
        initrd=directory / INITRD,
        rootfs=directory / ROOTFS,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None if it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` and fsync it: it is the last file of a stage, written just before publish."""
    with path.open("w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def make_temp(layout: CacheLayout, stage: str, *, base: bool = False) -> Path:
    """A fresh directory under `tmp/` (`tmp-base/` for the basetree stage) for building
    `stage` (same file system as its target)."""
    tmp = layout.tmp_base if base else layout.tmp
    tmp.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=tmp))
    path.chmod(0o755)  # mkdtemp's 0700 would stay on the published stage
    return path


def publish(work: Path, target: Path) -> bool:
    """Atomically rename the finished stage `work` to `target`.

    Returns False (and removes `work`) if `target` already exists: content-hashed, so it holds
    the same thing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        work.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        remove_tree(work)
        return False
    fsync_path(target.parent)
    return True


def remove_tree(path: Path) -> None:
    """Delete a (temporary) tree, first lazily unmounting anything mounted below it (an
    interrupted debootstrap can leave proc/sys mounted in its target)."""
    for mount_point in sorted(_mounts_below(path), key=len, reverse=True):
        _umount_lazy(mount_point)
    if still := _mounts_below(path):
        # Never recurse into a live mount (a bind-mounted /dev would lose its files).
        log.warning("not removing %s: still mounted below it: %s", path, ", ".join(still))
        return
    shutil.rmtree(path, ignore_errors=True)


def clear_temp(layout: CacheLayout, tmp: Path | None = None) -> None:
    """Remove everything an interrupted build left in `tmp/` (or `tmp`; call with the lock
    that guards it held)."""
    tmp = tmp or layout.tmp
    if tmp.is_dir():
        for entry in tmp.iterdir():
            remove_tree(entry)


class CacheLock:
    """An exclusive `flock` on `<images_dir>/.lock`, held until `release()` (or process exit).

    Async code polls `acquire(blocking=False)`; `acquire()` blocks, for synchronous callers.
    """

    def __init__(self, layout: CacheLayout, *, base: bool = False) -> None:
        self.path = layout.root / ".lock-base" if base else layout.lock_file
        self._fd: int | None = None

    def acquire(self, *, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [_unescape(line.split()[4]) for line in lines if len(line.split()) > 4]
    return [p for p in points if p.startswith(prefix)]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape")


def _umount_lazy(mount_point: str) -> None:
    # umount2(MNT_DETACH) directly: no `umount` process, and it works on a busy mount.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(mount_point.encode(), _MNT_DETACH)
