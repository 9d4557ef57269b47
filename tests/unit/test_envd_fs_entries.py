"""EntryInfo fields (E2B's Go semantics) and the ListDir walk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nestbox.envd.filesystem.entries import entry_info, go_mode_string, walk
from nestbox.protocol.gen.filesystem.filesystem_pb import FileType


@pytest.mark.parametrize(
    ("st_mode", "expected"),
    [
        (stat.S_IFREG | 0o644, "-rw-r--r--"),
        (stat.S_IFDIR | 0o755, "drwxr-xr-x"),
        (stat.S_IFLNK | 0o777, "Lrwxrwxrwx"),
        (stat.S_IFDIR | stat.S_ISVTX | 0o777, "dtrwxrwxrwx"),
        (stat.S_IFCHR | 0o666, "Dcrw-rw-rw-"),
        (stat.S_IFBLK | 0o660, "Drw-rw----"),
        (stat.S_IFIFO | 0o600, "prw-------"),
        (stat.S_IFSOCK | 0o755, "Srwxr-xr-x"),
        (stat.S_IFREG | stat.S_ISUID | 0o755, "urwxr-xr-x"),
        (stat.S_IFREG | stat.S_ISGID | 0o2755, "grwxr-xr-x"),
        (stat.S_IFREG, "----------"),
    ],
)
def test_go_mode_string(st_mode: int, expected: str) -> None:
    assert go_mode_string(st_mode) == expected


def test_file_dir_and_symlinks(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_bytes(b"12345")
    f.chmod(0o640)
    os.utime(f, ns=(0, 1_700_000_000_123_456_789))

    e = entry_info(f)
    assert (e.name, e.type, e.path, e.size, e.mode) == ("f.txt", FileType.FILE, str(f), 5, 0o640)
    assert e.permissions == "-rw-r-----"
    assert e.modified_time is not None
    assert (e.modified_time.seconds, e.modified_time.nanos) == (1_700_000_000, 123_456_789)
    assert not e.is_symlink
    assert not e.has_field("symlink_target")

    d = entry_info(tmp_path)
    assert (d.type, d.permissions[0]) == (FileType.DIRECTORY, "d")

    link = tmp_path / "link"
    link.symlink_to("f.txt")
    e = entry_info(link)
    assert (e.type, e.mode, e.is_symlink, e.symlink_target) == (FileType.FILE, 0o640, True, str(f))
    assert e.permissions == "Lrwxrwxrwx"

    dangling = tmp_path / "dangling"
    dangling.symlink_to("nowhere")
    e = entry_info(dangling)
    assert (e.type, e.mode, e.symlink_target) == (FileType.SYMLINK, 0, "nowhere")


def test_unknown_owner_is_numeric(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to an unknown uid needs root")
    f = tmp_path / "f"
    f.touch()
    os.chown(f, 54321, 54321)
    e = entry_info(f)
    assert (e.owner, e.group) == ("54321", "54321")


def test_walk_depth_order_and_symlinked_dirs(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "deep").touch()
    (tmp_path / "b" / "z").touch()
    (tmp_path / "a").touch()
    (tmp_path / "ln").symlink_to(tmp_path / "b")

    def rel(depth: int, shown: Path = tmp_path) -> list[str]:
        return [e.path.removeprefix(str(shown) + "/") for e in walk(tmp_path, shown, depth, _yes)]

    assert rel(1) == ["a", "b", "ln"]
    assert rel(2) == ["a", "b", "b/c", "b/z", "ln"]  # the symlinked dir is not entered
    assert rel(3) == ["a", "b", "b/c", "b/c/deep", "b/z", "ln"]
    shown = Path("/requested/alias")
    assert rel(1, shown) == ["a", "b", "ln"]
    assert walk(tmp_path, tmp_path, 5, lambda p: p.name != "b")[1].name == "b"
    assert [e.name for e in walk(tmp_path, tmp_path, 5, lambda p: p.name != "b")] == [
        "a", "b", "ln"
    ]  # fmt: skip


def test_walk_of_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        walk(tmp_path / "missing", tmp_path, 1, _yes)


def _yes(_: Path) -> bool:
    return True
