"""The build archive check: an uploaded tar, tar.gz or zip is read through once, on the
control plane, before any of it reaches a guest, and refused (`ArchiveRefused`) if any entry
could land outside the directory it is unpacked into:

- a name that is absolute, has a `..` component, a NUL or a backslash;
- a symbolic link whose target is absolute or climbs out of the archive from where it sits;
- a hard link to an absolute or climbing name;
- an entry below a path that the archive itself makes a symbolic link (a link to `.` can
  make a lexically harmless `../` point anywhere, so paths through links are refused whole);
- devices and FIFOs; more than `MAX_ENTRIES` entries or `MAX_EXPANDED_BYTES` unpacked.

The kind is told by magic bytes (Wrenn's rule): gzip `1f 8b` is tar.gz, `PK\\x03\\x04` (or an
empty zip's `PK\\x05\\x06`) zip, `ustar` at offset 257 tar; anything else is tried as a plain
tar. Reading is streamed (tar) or by the zip's central directory, never the whole file in
memory. Blocking: call it in a worker thread.
"""

from __future__ import annotations

import posixpath
import shlex
import stat
import tarfile
import zipfile
import zlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pathlib import Path

ArchiveKind = Literal["tar", "tar.gz", "zip"]
MAX_ENTRIES = 100_000
MAX_EXPANDED_BYTES = 4 * 1024**3
MAX_LINK_TARGET = 4096


class ArchiveRefused(ValueError):
    """The archive is not one we unpack (the message says which entry and why)."""


def detect(head: bytes) -> ArchiveKind:
    """The archive's kind from its first 512 bytes."""
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    return "tar"


def check_archive(path: Path) -> ArchiveKind:
    """Read the archive at `path` through; its kind. :raise ArchiveRefused:"""
    with path.open("rb") as f:
        kind = detect(f.read(512))
    checker = _Checker()
    if kind == "zip":
        _check_zip(path, checker)
    else:
        _check_tar(path, kind, checker)
    checker.finish()
    return kind


class _Checker:
    """The rules, entry by entry, and the ones that need every entry (`finish`)."""

    def __init__(self) -> None:
        self.entries = 0
        self.expanded = 0
        self.links: set[str] = set()
        self.names: list[str] = []

    def name(self, raw: str) -> str:
        """`raw` as a clean relative name. :raise ArchiveRefused:"""
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise ArchiveRefused(f"the archive has more than {MAX_ENTRIES} entries")
        shown = ascii(raw)[:120]
        if "\x00" in raw or "\\" in raw:
            raise ArchiveRefused(f"entry {shown}: a NUL or backslash in its name")
        if raw.startswith("/"):
            raise ArchiveRefused(f"entry {shown}: an absolute path")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ArchiveRefused(f"entry {shown}: a '..' component (it could leave the archive)")
        clean = "/".join(parts)
        self.names.append(clean)
        return clean

    def size(self, n: int) -> None:
        self.expanded += max(n, 0)
        if self.expanded > MAX_EXPANDED_BYTES:
            raise ArchiveRefused(f"the archive unpacks to more than "
                                 f"{MAX_EXPANDED_BYTES // 1024**3} GiB")  # fmt: skip

    def symlink(self, name: str, target: str) -> None:
        shown = ascii(name)[:120]
        if not target or "\x00" in target or len(target) > MAX_LINK_TARGET:
            raise ArchiveRefused(f"symbolic link {shown}: an empty or malformed target")
        if target.startswith("/"):
            raise ArchiveRefused(f"symbolic link {shown}: points to an absolute path")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            raise ArchiveRefused(f"symbolic link {shown}: points outside the archive")
        self.links.add(name)

    def hardlink(self, name: str, target: str) -> None:
        shown = ascii(name)[:120]
        if not target or target.startswith("/") or "\x00" in target:
            raise ArchiveRefused(f"hard link {shown}: points to an absolute or empty path")
        resolved = posixpath.normpath(target)
        if resolved == ".." or resolved.startswith("../"):
            raise ArchiveRefused(f"hard link {shown}: points outside the archive")

    def finish(self) -> None:
        """No entry may sit below a path the archive makes a symbolic link."""
        if not self.links:
            return
        for name in self.names:
            parts = name.split("/")
            for depth in range(1, len(parts)):
                if "/".join(parts[:depth]) in self.links:
                    raise ArchiveRefused(f"entry {ascii(name)[:120]}: lies below a symbolic "
                                         "link of the archive")  # fmt: skip


def _check_tar(path: Path, kind: ArchiveKind, checker: _Checker) -> None:
    mode = "r|gz" if kind == "tar.gz" else "r|"
    try:
        with tarfile.open(path, mode=mode) as tar:  # type: ignore[call-overload]  # a stream mode
            for member in tar:
                _tar_member(member, checker)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ArchiveRefused(f"not a readable tar, tar.gz or zip archive ({err})") from None


def _tar_member(member: tarfile.TarInfo, checker: _Checker) -> None:
    name = checker.name(member.name)
    if member.issym():
        checker.symlink(name, member.linkname)
    elif member.islnk():
        checker.hardlink(name, member.linkname)
    elif member.isdev() or member.isfifo():
        raise ArchiveRefused(f"entry {ascii(member.name)[:120]}: a device or FIFO")
    elif member.isfile():
        checker.size(member.size)
    elif not member.isdir():
        raise ArchiveRefused(f"entry {ascii(member.name)[:120]}: an unsupported entry type")


def _check_zip(path: Path, checker: _Checker) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = checker.name(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    if info.file_size > MAX_LINK_TARGET:
                        raise ArchiveRefused(f"symbolic link {ascii(name)[:120]}: a malformed "
                                             "target")  # fmt: skip
                    target = zf.read(info).decode("utf-8", "replace")
                    checker.symlink(name, target)
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    raise ArchiveRefused(f"entry {ascii(name)[:120]}: a device or FIFO")
                else:
                    checker.size(info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ArchiveRefused(f"not a readable zip archive ({err})") from None


def extract_command(kind: ArchiveKind, archive: str, into: str) -> str:
    """The guest's shell command that unpacks a checked archive (as root) and makes it
    readable to every user (`chmod -R a+rX`, Wrenn's)."""
    a, d = shlex.quote(archive), shlex.quote(into)
    if kind == "zip":  # no unzip in the guest image; python3 is always there
        unpack = (f"python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall("
                  f"sys.argv[2])' {a} {d}")  # fmt: skip
    else:
        flag = "-xzf" if kind == "tar.gz" else "-xf"
        unpack = f"tar {flag} {a} -C {d} --no-same-owner"
    return f"set -e; rm -rf {d}; mkdir -p {d}; {unpack}; chmod -R a+rX {d}; rm -f {a}"
