"""The real guest image (root): built once per machine into the shared image cache, inspected
without mounting (debugfs), and booted once under QEMU to see our PID 1 start envd.

The cache is `$NESTBOX_IMAGE_CACHE`, default /var/lib/nestbox/images, so only the first run on
a machine pays for the build (about 70 s cold); later runs reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from nestbox.hostagent.image import layout, rootfs
from nestbox.hostagent.image.cache import GuestImage, ensure_image, find_image
from nestbox.hostagent.image.cmdline import kernel_cmdline
from nestbox.hostagent.settings import AgentSettings

IMAGE_CACHE = Path(os.environ.get("NESTBOX_IMAGE_CACHE", "/var/lib/nestbox/images"))
TOOLS = ("debootstrap", "mkfs.ext4", "debugfs", "lz4", "qemu-system-x86_64", "qemu-img")
BOOT_DEADLINE_S = 120.0  # TCG on a busy 2-core host; an idle one takes about 5 s


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: debootstrap, chroot and mkfs build the guest image"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (run 'make system-deps')"
    return None


pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
    pytest.mark.timeout(1800),  # a cold build downloads a kernel and runs debootstrap
]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> AgentSettings:
    return AgentSettings(data_dir=tmp_path_factory.mktemp("nestbox"), image_cache=IMAGE_CACHE)


@pytest.fixture(scope="module")
def image(settings: AgentSettings) -> GuestImage:
    return anyio.run(ensure_image, settings)


def debugfs_stat(rootfs_image: Path, path: str) -> str:
    """`debugfs -R 'stat PATH'` of the image (read-only; nothing is mounted)."""
    result = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(rootfs_image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_artifacts_exist(image: GuestImage) -> None:
    assert image.kernel.read_bytes()[:4] == b"\x7fELF"
    assert image.initrd.read_bytes()[:2] == b"\x1f\x8b"
    assert image.rootfs.stat().st_size >= rootfs.MIN_SIZE_MIB * 2**20
    manifest = layout.read_json(image.rootfs.parent / layout.MANIFEST)
    assert manifest is not None
    assert manifest["version"] == image.version


def test_version_is_stable(settings: AgentSettings, image: GuestImage) -> None:
    assert find_image(settings) == image
    assert find_image(settings) == image


@pytest.mark.parametrize(
    ("path", "kind", "mode"),
    [
        ("/sbin/nestbox-init", "regular", "0755"),
        ("/etc/nestbox-guest", "regular", "0644"),
        ("/opt/nestbox/lib/nestbox/envd", "directory", "0755"),
        ("/opt/nestbox/lib/nestbox/envd/__main__.py", "regular", "0644"),
        ("/opt/nestbox/lib/pydantic", "directory", "0755"),
        ("/etc/sudoers.d/nestbox-user", "regular", "0440"),
        ("/usr/bin/sudo", "regular", "04755"),
        ("/usr/bin/python3.11", "regular", "0755"),
    ],
)
def test_rootfs_contains(image: GuestImage, path: str, kind: str, mode: str) -> None:
    stat = debugfs_stat(image.rootfs, path)
    assert f"Type: {kind}" in stat
    assert f"Mode:  {mode}" in stat


def test_rootfs_has_the_user_and_no_host_code(image: GuestImage) -> None:
    assert "User:  1000   Group:  1000" in debugfs_stat(image.rootfs, "/home/user")
    assert "Type:" not in debugfs_stat(image.rootfs, "/opt/nestbox/lib/nestbox/hostagent")
    assert "Type:" not in debugfs_stat(image.rootfs, "/opt/nestbox/lib/nestbox/controlplane")


def test_boots_to_envd(image: GuestImage, tmp_path: Path) -> None:
    """Cold-boot the image (no network device) and wait for PID 1 to report envd started."""
    overlay, serial, stderr = (tmp_path / n for n in ("overlay.qcow2", "serial.log", "stderr"))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.rootfs), "-F", "raw",
         str(overlay)],
        check=True,
    )  # fmt: skip
    cmdline = kernel_cmdline("169.254.0.21/30", "169.254.0.22", "cl-imagetest", "minimal")
    with stderr.open("wb") as err:  # the child keeps its own copy of the descriptor
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off", "-accel", "tcg",
             "-cpu", "max", "-smp", "1", "-m", "256M", "-nodefaults", "-no-user-config",
             "-nographic", "-display", "none", "-kernel", str(image.kernel),
             "-initrd", str(image.initrd), "-append", cmdline, "-serial", f"file:{serial}",
             "-drive", f"id=root,file={overlay},format=qcow2,if=none,cache=unsafe",
             "-device", "virtio-blk-device,drive=root", "-device", "virtio-rng-device"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    try:
        log = _wait_for(serial, "nestbox-init: envd started", qemu, stderr)
    finally:
        qemu.kill()
        qemu.wait()
    assert "initramfs: " not in log  # no failed insmod, the root disk mounted
    print(log)


def _wait_for(serial: Path, needle: str, qemu: subprocess.Popen[bytes], stderr: Path) -> str:
    deadline, log = time.monotonic() + BOOT_DEADLINE_S, ""
    while time.monotonic() < deadline:
        log = serial.read_text(errors="replace") if serial.exists() else ""
        if needle in log:
            return log
        if qemu.poll() is not None:
            pytest.fail(f"QEMU exited with {qemu.returncode}: {stderr.read_text()}\n{log}")
        time.sleep(0.2)
    pytest.fail(f"no {needle!r} within {BOOT_DEADLINE_S} s; serial log:\n{log}")
