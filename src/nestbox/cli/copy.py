"""`nestbox cp`, docker's way: `CAPSULE:PATH` names the capsule's side, the other side is
local; files and whole directories, both ways. A directory copied onto an existing directory
goes inside it (as `cp -r`); large files show a progress bar on a terminal."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from nestbox.cli import output
from nestbox.sdk import InvalidRequest, NotFound

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.sdk import Capsule, Nestbox

REMOTE = re.compile(r"^(?P<capsule>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<path>.*)$")
PROGRESS_FROM = 8 * 1024 * 1024
"""Files from this size up get a progress bar (on a terminal)."""


@dataclass(frozen=True)
class Spec:
    capsule: str | None
    path: str


def parse(spec: str) -> Spec:
    """`CAPSULE:PATH` (the part before the colon has no slash), else a local path."""
    match = REMOTE.match(spec)
    if match is None:
        return Spec(None, spec)
    return Spec(match["capsule"], match["path"] or ".")


def copy(nb: Nestbox, src: Spec, dst: Spec) -> int:
    """Copy; the number of files copied."""
    if (src.capsule is None) == (dst.capsule is None):
        raise InvalidRequest("invalid_request", "one side must be CAPSULE:PATH, the other local")
    if src.capsule is None:
        assert dst.capsule is not None
        return _upload(nb.capsules.get(dst.capsule), Path(src.path), dst.path)
    return _download(nb.capsules.get(src.capsule), src.path, Path(dst.path))


def _upload(capsule: Capsule, src: Path, dst: str) -> int:
    if not src.exists():
        raise NotFound("not_found", f"{src}: no such file or directory")
    target = dst
    try:
        entry = capsule.files.stat(dst)
        if entry.type == "directory" or dst.endswith("/"):
            target = posixpath.join(dst, src.name)
    except NotFound:
        pass
    if src.is_file():
        _send(capsule, src, target)
        return 1
    count = 0
    capsule.files.mkdir(target)
    for root, dirs, files in os.walk(src):
        here = Path(root)
        rel = here.relative_to(src).as_posix()
        base = target if rel == "." else posixpath.join(target, rel)
        for name in sorted(dirs):
            capsule.files.mkdir(posixpath.join(base, name))
        for name in sorted(files):
            if (here / name).is_file():
                _send(capsule, here / name, posixpath.join(base, name))
                count += 1
    return count


def _download(capsule: Capsule, src: str, dst: Path) -> int:
    entry = capsule.files.stat(src)
    target = dst / posixpath.basename(src.rstrip("/")) if dst.is_dir() else dst
    if entry.type != "directory":
        _receive(capsule, src, target, entry.size)
        return 1
    count = 0
    pending = [(src, target)]
    while pending:
        remote, local = pending.pop()
        local.mkdir(parents=True, exist_ok=True)
        for item in capsule.files.list(remote):
            if item.type == "directory":
                pending.append((item.path, local / item.name))
            elif item.type == "file":
                _receive(capsule, item.path, local / item.name, item.size)
                count += 1
    return count


def _send(capsule: Capsule, src: Path, dst: str) -> None:
    size = src.stat().st_size
    with _bar(f"{src.name}", size) as advance:
        capsule.files.upload(dst, src, on_progress=advance)


def _receive(capsule: Capsule, src: str, dst: Path, size: int) -> None:
    with _bar(posixpath.basename(src), size) as advance:
        capsule.files.download(src, dst, on_progress=advance)


class _bar:
    """A progress bar for one large file on a terminal; otherwise nothing."""

    def __init__(self, name: str, size: int) -> None:
        self.show = size >= PROGRESS_FROM and output.err.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=output.err, transient=True,
        ) if self.show else None  # fmt: skip
        self.name, self.size = name, size

    def __enter__(self) -> Callable[[int], object]:
        if self.progress is None:
            return lambda done: None
        self.progress.start()
        task = self.progress.add_task(self.name, total=self.size)
        progress = self.progress
        return lambda done: progress.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
