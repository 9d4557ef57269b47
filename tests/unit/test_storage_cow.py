"""The qcow2 overlay writer: the very bytes `qemu-img create` writes, or nothing at all."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from nestbox.hostagent.storage import cow

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.vmm.base import DiskFormat

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")


def qemu_img_overlay(base: Path, fmt: str, out: Path) -> bytes:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(out)],
        check=True,
    )
    return out.read_bytes()


@needs_qemu_img
@pytest.mark.parametrize("size", [64 << 20, (2 << 30) + 512, 5 << 30])
def test_overlay_on_a_raw_base_is_what_qemu_img_writes(tmp_path: Path, size: int) -> None:
    base = tmp_path / "rootfs.ext4"
    with base.open("wb") as f:
        f.truncate(size)
    assert cow.write_overlay(base, "raw", tmp_path / "ours.qcow2")
    assert (tmp_path / "ours.qcow2").read_bytes() == qemu_img_overlay(
        base, "raw", tmp_path / "theirs.qcow2"
    )


@needs_qemu_img
async def test_overlay_on_a_qcow2_base_is_what_qemu_img_writes(tmp_path: Path) -> None:
    raw = tmp_path / "rootfs.ext4"
    with raw.open("wb") as f:
        f.truncate(256 << 20)
    template = tmp_path / "template-disk.qcow2"
    await cow.create_overlay(raw, "raw", template)
    await cow.create_overlay(template, "qcow2", tmp_path / "ours.qcow2")
    assert (tmp_path / "ours.qcow2").read_bytes() == qemu_img_overlay(
        template, "qcow2", tmp_path / "theirs.qcow2"
    )
    chain = await cow.backing_chain(tmp_path / "ours.qcow2")
    assert chain == [tmp_path / "ours.qcow2", template, raw]


@pytest.mark.parametrize(("size", "fmt"), [(1000, "raw"), (0, "raw"), (64, "qcow2")])
def test_bases_it_does_not_cover_are_left_to_qemu_img(
    tmp_path: Path, size: int, fmt: DiskFormat
) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"x" * size)  # not a multiple of 512, empty, not qcow2
    assert not cow.write_overlay(base, fmt, tmp_path / "overlay.qcow2")
    assert not (tmp_path / "overlay.qcow2").exists()


def test_an_existing_overlay_is_never_overwritten(tmp_path: Path) -> None:
    base = tmp_path / "base"
    with base.open("wb") as f:
        f.truncate(1 << 20)
    (tmp_path / "overlay.qcow2").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        cow.write_overlay(base, "raw", tmp_path / "overlay.qcow2")
    assert (tmp_path / "overlay.qcow2").read_bytes() == b"keep"
