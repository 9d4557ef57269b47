"""The build archive check (`services/archive.py`) on raw archive bytes: tar, tar.gz and zip
made here entry by entry (names and link targets a normal archiver would never write), each
refused for the reason it should be, with accepted archives as positive controls."""

from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
import zipfile
from typing import TYPE_CHECKING

import pytest

from nestbox.controlplane.services.archive import (
    ArchiveRefused,
    check_archive,
    detect,
    extract_command,
)

if TYPE_CHECKING:
    from pathlib import Path

Entry = tuple[str, str, str]
"""(name, kind: file | dir | symlink | hardlink | fifo, content or link target)"""


def tar_bytes(entries: list[Entry], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = value.encode()
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, value
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


def zip_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, kind, value in entries:
            info = zipfile.ZipInfo(name)
            if kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            elif kind == "dir":
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, value)
    return buf.getvalue()


def check(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "archive"
    path.write_bytes(data)
    return check_archive(path)


GOOD: list[Entry] = [("app/", "dir", ""), ("app/main.py", "file", "print(1)\n"),
                     ("app/link", "symlink", "main.py"), ("app/up", "symlink", "../README"),
                     ("README", "file", "hi"), ("app/hard", "hardlink", "README"),
                     ("./dot/x", "file", "x")]  # fmt: skip


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_a_well_formed_tar_passes(tmp_path: Path, kind: str) -> None:
    assert check(tmp_path, tar_bytes(GOOD, gz=kind == "tar.gz")) == kind


def test_a_well_formed_zip_passes(tmp_path: Path) -> None:
    entries = [e for e in GOOD if e[1] != "hardlink"]
    assert check(tmp_path, zip_bytes(entries)) == "zip"


BAD: list[tuple[str, list[Entry], str]] = [
    ("dotdot", [("../x", "file", "evil")], "'..'"),
    ("dotdot-inside", [("a/../../x", "file", "evil")], "'..'"),
    ("dotdot-dir", [("a/..", "dir", "")], "'..'"),
    ("absolute", [("/etc/passwd", "file", "evil")], "absolute"),
    ("backslash", [("..\\x", "file", "evil")], "backslash"),
    ("symlink-absolute", [("l", "symlink", "/etc")], "absolute"),
    ("symlink-climbs", [("a/l", "symlink", "../../etc")], "outside"),
    ("symlink-dotdot", [("l", "symlink", "..")], "outside"),
    ("through-link", [("s", "symlink", "."), ("s/s/t", "file", "x")], "below a symbolic link"),
    ("through-link-later", [("s/t", "file", "x"), ("s", "symlink", "sub")],
     "below a symbolic link"),
]  # fmt: skip


@pytest.mark.parametrize(("why", "entries", "says"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_escaping_entries_are_refused(
    tmp_path: Path, kind: str, why: str, entries: list[Entry], says: str
) -> None:
    data = zip_bytes(entries) if kind == "zip" else tar_bytes(entries, gz=kind == "tar.gz")
    with pytest.raises(ArchiveRefused, match=re.escape(says)):
        check(tmp_path, data)


@pytest.mark.parametrize(("entries", "says"), [
    ([("x", "file", ""), ("h", "hardlink", "../etc/shadow")], "hard link"),
    ([("h", "hardlink", "/etc/shadow")], "hard link"),
    ([("p", "fifo", "")], "FIFO"),
])  # fmt: skip
def test_tar_only_entries_are_refused(tmp_path: Path, entries: list[Entry], says: str) -> None:
    with pytest.raises(ArchiveRefused, match=re.escape(says)):
        check(tmp_path, tar_bytes(entries))


def test_raw_tar_header_with_traversal_is_refused(tmp_path: Path) -> None:
    """A ustar header written byte by byte (no library normalising the name)."""
    name = b"../../root/.ssh/authorized_keys"
    header = bytearray(512)
    header[: len(name)] = name
    header[100:108] = b"0000644\x00"
    header[108:116] = header[116:124] = b"0000000\x00"
    header[124:136] = b"00000000004\x00"
    header[136:148] = b"00000000000\x00"
    header[156:157] = b"0"
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    data = bytes(header) + b"evil".ljust(512, b"\x00") + b"\x00" * 1024
    assert detect(data[:512]) == "tar"
    with pytest.raises(ArchiveRefused, match=re.escape("'..'")):
        check(tmp_path, data)


def test_garbage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveRefused, match="not a readable"):
        check(tmp_path, b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(ArchiveRefused, match="not a readable"):
        check(tmp_path, b"PK\x03\x04" + b"\x00" * 40)


def test_kinds_by_magic() -> None:
    assert detect(b"\x1f\x8b\x08") == "tar.gz"
    assert detect(b"PK\x03\x04rest") == "zip"
    assert detect(b"PK\x05\x06") == "zip"
    assert detect(b"\x00" * 257 + b"ustar") == "tar"


def test_extract_commands_quote_their_paths() -> None:
    cmd = extract_command("tar.gz", "/tmp/build files.tgz", "/tmp/build-files")
    assert "tar -xzf '/tmp/build files.tgz' -C /tmp/build-files --no-same-owner" in cmd
    assert "chmod -R a+rX /tmp/build-files" in cmd
    assert "zipfile" in extract_command("zip", "/tmp/a.zip", "/tmp/b")
