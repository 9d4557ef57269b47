"""The guest-image build's pure parts: kernel command line, TSC parsing, initramfs archive,
ELF checks, apt source parsing, root-tree writes, the command runner and the progress lines."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import sys
from pathlib import Path

import anyio
import pytest

from nestbox.hostagent.image import cmdline, initramfs, kernel, rootfs
from nestbox.hostagent.image.commands import run
from nestbox.hostagent.image.errors import ImageBuildError
from nestbox.hostagent.image.progress import Progress
from tests.conftest import eventually

# --- kernel command line ------------------------------------------------------------------


def test_cmdline_has_the_base_args_tsc_and_our_parameters() -> None:
    line = cmdline.kernel_cmdline(
        "169.254.0.21/30", "169.254.0.22", "cl-abc", "minimal", ["foo=1"], tsc_khz=2100000
    )
    assert line == (
        "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw quiet tsc=reliable nowatchdog "
        "tsc_early_khz=2100000 "
        "nestbox.guest_ip=169.254.0.21/30 nestbox.gw=169.254.0.22 "
        "nestbox.capsule_id=cl-abc nestbox.template_id=minimal foo=1"
    )


def test_cmdline_omits_empty_identity_and_rejects_whitespace() -> None:
    line = cmdline.kernel_cmdline("10.0.0.2/30", "10.0.0.1", "", "", tsc_khz=1)
    assert "capsule_id" not in line
    assert "template_id" not in line
    with pytest.raises(ValueError, match="capsule_id"):
        cmdline.kernel_cmdline("10.0.0.2/30", "10.0.0.1", "a b", "t", tsc_khz=1)
    with pytest.raises(ValueError, match="guest_ip"):
        cmdline.kernel_cmdline("", "10.0.0.1", "c", "t", tsc_khz=1)


def test_tsc_from_kernel_log_prefers_the_refined_value() -> None:
    log = (
        "6,1,0,-;tsc: Detected 2100.000 MHz processor\n"
        "6,90,1,-;tsc: Refined TSC clocksource calibration: 2099.998 MHz\n"
    )
    assert cmdline.parse_kernel_log(log) == 2099998
    assert cmdline.parse_kernel_log("tsc: Detected 2100.000 MHz processor") == 2100000
    assert cmdline.parse_kernel_log("nothing here") is None


def test_tsc_from_cpuinfo() -> None:
    assert cmdline.parse_cpuinfo("processor\t: 0\ncpu MHz\t\t: 2394.454\n") == 2394454
    assert cmdline.parse_cpuinfo("processor\t: 0\n") is None


def test_host_tsc_is_a_plausible_frequency() -> None:
    assert 100_000 < cmdline.host_tsc_khz() < 10_000_000  # 0.1 to 10 GHz


# --- initramfs ----------------------------------------------------------------------------


def elf64(program_types: list[int], *, size: int = 0x200) -> bytes:
    """A minimal 64-bit ELF: header, then one program header per type (each segment in-file)."""
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, len(program_types))
    table = bytearray()
    for p_type in program_types:
        ph = bytearray(56)
        struct.pack_into("<I", ph, 0, p_type)
        struct.pack_into("<Q", ph, 8, 0)  # p_offset
        struct.pack_into("<Q", ph, 32, 64)  # p_filesz
        table += ph
    data = bytes(header + table)
    return data + b"\0" * max(0, size - len(data))


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)) of a newc archive."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        body = data[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_initramfs_holds_init_busybox_console_and_modules_in_order(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf64([1]))
    mods = []
    for name in ("virtio_ring.ko", "virtio.ko"):
        mods.append(tmp_path / name)
        mods[-1].write_bytes(name.encode())
    archive = read_cpio(gzip.decompress(initramfs.build_initramfs(b"#!/bin/sh\n", mods, busybox)))
    assert archive["init"][1] == b"#!/bin/sh\n"
    assert archive["init"][0] & 0o777 == 0o755
    assert stat.S_ISCHR(archive["dev/console"][0])
    assert archive["dev/console"][2] == (5, 1)
    assert archive["modules.list"][1] == b"virtio_ring.ko\nvirtio.ko\n"
    assert archive["lib/modules/virtio.ko"][1] == b"virtio.ko"
    assert stat.S_ISLNK(archive["bin/switch_root"][0])
    assert archive["bin/switch_root"][1] == b"busybox"


def test_initramfs_is_reproducible(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf64([1]))
    assert initramfs.build_initramfs(b"x", [], busybox) == initramfs.build_initramfs(
        b"x", [], busybox
    )


def test_a_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf64([1, 3]))  # PT_INTERP
    with pytest.raises(ImageBuildError, match="busybox-static"):
        initramfs.build_initramfs(b"x", [], busybox)


# --- kernel extraction --------------------------------------------------------------------


def test_lz4_magic_offsets() -> None:
    data = b"xx" + kernel.LZ4_MAGIC + b"yyy" + kernel.LZ4_MAGIC
    assert kernel.lz4_offsets(data) == [2, 9]


def test_complete_elf_check(tmp_path: Path) -> None:
    good, truncated, text = tmp_path / "good", tmp_path / "short", tmp_path / "text"
    good.write_bytes(elf64([1]))
    truncated.write_bytes(elf64([1])[:100])
    text.write_bytes(b"not an elf at all" * 10)
    assert kernel.is_complete_elf(good)
    assert not kernel.is_complete_elf(truncated)
    assert not kernel.is_complete_elf(text)


# --- root tree ----------------------------------------------------------------------------


def test_apt_mirror_is_the_main_suite_source(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "google.list").write_text(
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
    )
    assert rootfs.apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"


def test_apt_mirror_one_line_format_and_missing(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    assert rootfs.apt_mirror("bookworm", tmp_path) == "http://m.example/debian"
    with pytest.raises(ImageBuildError, match="trixie"):
        rootfs.apt_mirror("trixie", tmp_path)


def test_write_new_never_writes_through_a_hard_link(tmp_path: Path) -> None:
    original = tmp_path / "tree" / "etc" / "hostname"
    original.parent.mkdir(parents=True)
    original.write_text("cached tree\n")
    staging = tmp_path / "staging"
    (staging / "etc").mkdir(parents=True)
    (staging / "etc" / "hostname").hardlink_to(original)
    rootfs.write_new(staging, "etc/hostname", b"new\n", 0o600)
    assert original.read_text() == "cached tree\n"
    assert (staging / "etc" / "hostname").read_text() == "new\n"
    assert (staging / "etc" / "hostname").stat().st_mode & 0o777 == 0o600


def test_write_new_refuses_symlinked_parents(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "sbin").symlink_to(outside)
    with pytest.raises(ImageBuildError, match="symlink"):
        rootfs.write_new(tmp_path / "root", "sbin/nestbox-init", b"x", 0o755)
    assert list(outside.iterdir()) == []


def test_image_size_has_headroom() -> None:
    assert rootfs.image_size_mib(100 * 2**20) == rootfs.MIN_SIZE_MIB
    assert rootfs.image_size_mib(4000 * 2**20) == 5000 + 256


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    (tmp_path / "b").hardlink_to(tmp_path / "a")
    single = rootfs.disk_usage(tmp_path)
    (tmp_path / "c").write_bytes(b"x" * 100_000)
    assert rootfs.disk_usage(tmp_path) > single >= 100_000


def test_the_guest_scripts_are_shipped() -> None:
    from nestbox.hostagent.image.inputs import guest_file

    init = guest_file("nestbox-init").decode()
    assert init.startswith("#!/bin/sh")
    assert "envd started" in init
    assert "python3 -m nestbox.envd --in-vm" in init
    assert "switch_root /newroot /sbin/nestbox-init" in guest_file("initramfs-init").decode()


# --- command runner -----------------------------------------------------------------------


async def test_run_captures_stdout() -> None:
    out = await run([sys.executable, "-c", "print('hello')"], capture=True)
    assert out == b"hello\n"


async def test_run_failure_carries_the_stderr_tail() -> None:
    code = (
        "import sys; print('early', file=sys.stderr); "
        "print('the cause', file=sys.stderr); sys.exit(3)"
    )
    with pytest.raises(ImageBuildError) as info:
        await run([sys.executable, "-c", code])
    assert info.value.returncode == 3
    assert info.value.output_tail.endswith("the cause")
    assert "the cause" in str(info.value)


async def test_run_missing_program() -> None:
    with pytest.raises(ImageBuildError, match="cannot run"):
        await run(["/nonexistent/program"])


async def test_cancelling_run_stops_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, [sys.executable, "-c", code])
        # Cancelled once the child runs (it wrote its pid), however long it took to start.
        text = await eventually(lambda: pidfile.exists() and pidfile.read_text(), what="the pid")
        started = _start_time(int(text))
        assert started is not None
        tg.cancel_scope.cancel()
    # A cancel that lands while asyncio still connects the pipes kills the child there, and it
    # is reaped a moment later: gone soon (or its pid taken by another process since).
    await eventually(lambda: _start_time(int(text)) != started, what="the process gone")


def _start_time(pid: int) -> int | None:
    """The start time of the process (or thread) `pid` now, None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


# --- progress -----------------------------------------------------------------------------


def test_progress_writes_one_line_per_finished_stage() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    with progress.stage("kernel") as report:
        report.status, report.detail = "cached", "/cache/kernels/abc"
    with pytest.raises(RuntimeError), progress.stage("tree"):
        raise RuntimeError("boom")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == ["kernel", "cached"]
    assert lines[0].endswith("/cache/kernels/abc")
    assert lines[1].split()[:2] == ["tree", "failed"]
    assert [r.status for r in progress.reports] == ["cached", "failed"]
