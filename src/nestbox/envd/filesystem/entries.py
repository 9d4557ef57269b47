"""`EntryInfo` for a path, and the directory walk behind `ListDir`.

Fields follow E2B's envd, which fills them from Go's `os.Lstat`:

* `type` is FILE or DIRECTORY; a symlink reports its target's type (SYMLINK only when the
  target is missing), and sets `is_symlink` and `symlink_target` (the fully resolved target).
* `mode` is the permission bits only, `st_mode & 0o777` (Go's `FileMode.Perm()`), taken from the
  target for a symlink. Type, setuid/setgid and sticky bits show in `permissions`.
* `permissions` is Go's `FileMode.String()` of the entry itself: `-rw-r--r--`, `drwxr-xr-x`,
  `Lrwxrwxrwx` (symlink), `dtrwxrwxrwx` (sticky dir), `Dcrw-rw-rw-` (character device).
* `owner` / `group` are names, or the numeric id when the guest has no such user or group.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from nestbox.protocol.gen.filesystem.filesystem_pb import EntryInfo, FileType

if TYPE_CHECKING:
    from collections.abc import Callable


class OwnerNames:
    """uid/gid → name look-ups, cached for the life of one request or one watch (a ListDir of
    10,000 entries asks about the same few ids)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = str(uid)
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = str(gid)
        return self._groups[gid]


def entry_info(path: Path, names: OwnerNames | None = None) -> EntryInfo:
    """The entry for `path` itself (symlinks are not followed).

    :raise OSError: `path` cannot be stat'ed.
    """
    return entry_from_stat(path, os.lstat(path), names or OwnerNames())


def entry_from_stat(path: Path, st: os.stat_result, names: OwnerNames) -> EntryInfo:
    """The entry for `path`, whose `lstat` result is `st`."""
    kind = _file_type(st.st_mode)
    mode = st.st_mode & 0o777
    target: str | None = None
    if stat.S_ISLNK(st.st_mode):
        target = _symlink_target(path)
        try:
            target_st = os.stat(path)
        except OSError:  # dangling or looping link
            kind, mode = FileType.SYMLINK, 0
        else:
            kind, mode = _file_type(target_st.st_mode), target_st.st_mode & 0o777
    return EntryInfo(
        name=path.name or str(path),
        type=kind,
        path=str(path),
        size=st.st_size,
        mode=mode,
        permissions=go_mode_string(st.st_mode),
        owner=names.user(st.st_uid),
        group=names.group(st.st_gid),
        modified_time=Timestamp.from_nanos(st.st_mtime_ns),
        symlink_target=target,
        is_symlink=target is not None,
    )


def _file_type(st_mode: int) -> FileType:
    if stat.S_ISREG(st_mode):
        return FileType.FILE
    if stat.S_ISDIR(st_mode):
        return FileType.DIRECTORY
    if stat.S_ISLNK(st_mode):
        return FileType.SYMLINK
    return FileType.UNSPECIFIED  # devices, sockets, FIFOs: E2B reports them as unknown


def _symlink_target(path: Path) -> str:
    """The fully resolved target (Go's `filepath.EvalSymlinks`); the raw link text when the
    chain cannot be resolved."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        try:
            return os.readlink(path)
        except OSError:
            return str(path)


def go_mode_string(st_mode: int) -> str:
    """Go's `os.FileMode.String()` for a Linux `st_mode`: type letters in Go's order
    (d, L, D, p, S, u, g, c, t), or `-`, then `rwxrwxrwx` with `-` for unset bits."""
    fmt = stat.S_IFMT(st_mode)
    letters = [
        ("d", fmt == stat.S_IFDIR),
        ("L", fmt == stat.S_IFLNK),
        ("D", fmt in (stat.S_IFBLK, stat.S_IFCHR)),
        ("p", fmt == stat.S_IFIFO),
        ("S", fmt == stat.S_IFSOCK),
        ("u", bool(st_mode & stat.S_ISUID)),
        ("g", bool(st_mode & stat.S_ISGID)),
        ("c", fmt == stat.S_IFCHR),
        ("t", bool(st_mode & stat.S_ISVTX)),
    ]
    prefix = "".join(letter for letter, present in letters if present) or "-"
    rwx = "".join(c if st_mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return prefix + rwx


def walk(
    directory: Path, shown_as: Path, depth: int, may_enter: Callable[[Path], bool]
) -> list[EntryInfo]:
    """Entries under `directory`, `depth` levels deep (1 = its own entries), sorted by name,
    each directory followed by its contents, as Go's `filepath.WalkDir`. Symlinked directories
    are listed, not entered. Paths are reported under `shown_as`, the path the client asked
    for (which may be a symlink to `directory`).

    Subdirectories that vanish, cannot be read, or that `may_enter` refuses are listed but not
    entered.

    :raise OSError: `directory` itself cannot be read.
    """
    names = OwnerNames()
    out: list[EntryInfo] = []

    def visit(real: Path, shown: Path, level: int, top: bool) -> None:
        try:
            with os.scandir(real) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            if top:
                raise
            return
        for child in children:
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed while we were listing
                continue
            entry_path = shown / child.name
            out.append(entry_from_stat(entry_path, st, names))
            if level < depth and stat.S_ISDIR(st.st_mode) and may_enter(Path(child.path)):
                visit(Path(child.path), entry_path, level + 1, top=False)

    visit(directory, shown_as, 1, top=True)
    return out
