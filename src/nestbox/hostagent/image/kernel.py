"""The guest kernel stage: Debian's cloud kernel as an uncompressed ELF, plus its initramfs.

microvm boots the kernel's PVH ELF entry (a bzImage through its option ROM hangs), so the ELF
`vmlinux` is cut out of the package's bzImage. The package is only unpacked into the stage's
work directory (`dpkg -x`), never installed on the host.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import time
from pathlib import Path

import anyio

from nestbox.hostagent.image import initramfs, layout
from nestbox.hostagent.image.commands import require_tools, run
from nestbox.hostagent.image.errors import ImageBuildError
from nestbox.hostagent.image.inputs import KernelPackage, digest, guest_file

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-cloud-amd64"
MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/char/hw_random/virtio-rng.ko",
)
"""Loaded in this order: each one's dependencies come before it (there is no modprobe)."""
OPTIONAL_MODULES = (
    "lib/crc16.ko",
    "crypto/crc32c_generic.ko",
    "fs/mbcache.ko",
    "fs/jbd2/jbd2.ko",
    "fs/ext4/ext4.ko",
)
"""ext4 and its dependencies, for kernels that build it as a module (cloud 6.1 has it built in)."""
RECIPE = "kernel-1"
"""Bump when this module or `initramfs.py` changes what the stage produces."""
LZ4_MAGIC = b"\x02\x21\x4c\x18"  # LZ4 legacy frame, what the 6.1 bzImage payload uses


def recipe() -> str:
    """Digest of the stage's local inputs (the kernel version is resolved separately)."""
    return digest(RECIPE, META_PACKAGE, *MODULES, *OPTIONAL_MODULES, guest_file("initramfs-init"))


async def resolve_package() -> KernelPackage:
    """The versioned kernel package apt's meta-package points at now.

    :raise ImageBuildError: apt does not know the meta-package (try `apt-get update`).
    """
    require_tools("apt-cache", "apt-get", "dpkg", "lz4")
    show = await run(["apt-cache", "show", "--no-all-versions", META_PACKAGE], capture=True)
    m = re.search(
        r"^Depends:.*?\b(linux-image-[\w.+-]+)\s*\(=\s*([^)\s]+)\)", show.decode(), re.MULTILINE
    )
    if m is None:
        raise ImageBuildError(f"cannot find the kernel package {META_PACKAGE} depends on")
    return KernelPackage(name=m.group(1), version=m.group(2))


async def build_kernel(cache: layout.CacheLayout, key: str, package: KernelPackage) -> Path:
    """Build the kernel stage into `kernels/<key>/` and return that directory.

    :raise ImageBuildError: a download, unpack or check failed.
    """
    work = layout.make_temp(cache, "kernel")
    try:
        meta = await _build_into(work, package)
        await anyio.to_thread.run_sync(layout.write_json, work / layout.META, meta)
        target = cache.kernel(key)
        await anyio.to_thread.run_sync(layout.publish, work, target)
        return target
    finally:
        if work.exists():
            await anyio.to_thread.run_sync(layout.remove_tree, work)


async def _build_into(work: Path, package: KernelPackage) -> dict[str, object]:
    deb = await _download(work, package)
    unpacked = work / "pkg"
    await run(["dpkg", "-x", deb, unpacked])
    release = _kernel_release(unpacked)
    await extract_vmlinux(unpacked / "boot" / f"vmlinuz-{release}", work / layout.VMLINUX)
    modules = _module_files(unpacked / "lib" / "modules" / release / "kernel")
    image = await anyio.to_thread.run_sync(
        initramfs.build_initramfs, guest_file("initramfs-init"), modules
    )
    await anyio.Path(work / layout.INITRD).write_bytes(image)
    await anyio.to_thread.run_sync(layout.remove_tree, unpacked)
    deb.unlink()
    return {
        "package": package.name,
        "version": package.version,
        "release": release,
        "modules": [m.name for m in modules],
        "built_at": time.time(),
    }


async def _download(work: Path, package: KernelPackage) -> Path:
    # As root apt warns that it downloads unsandboxed (its _apt user cannot write `work`): fine.
    await run(["apt-get", "download", "-q", f"{package.name}={package.version}"], cwd=work)
    debs = [Path(p) async for p in anyio.Path(work).glob(f"{package.name}_*.deb")]
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download left {len(debs)} .deb files for {package.name}")
    return debs[0]


def _kernel_release(unpacked: Path) -> str:
    releases = [p.name for p in (unpacked / "lib" / "modules").iterdir()]
    if len(releases) != 1:
        raise ImageBuildError(f"expected one kernel release in the package, found {releases}")
    return releases[0]


def _module_files(kernel_dir: Path) -> list[Path]:
    missing = [m for m in MODULES if not (kernel_dir / m).is_file()]
    if missing:
        raise ImageBuildError(f"kernel package lacks modules: {', '.join(missing)}")
    # ext4 and its dependencies, when they are modules, load first: the root disk needs them.
    optional = [m for m in OPTIONAL_MODULES if (kernel_dir / m).is_file()]
    return [kernel_dir / m for m in (*optional, *MODULES)]


async def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF kernel inside `bzimage` (an LZ4 payload) to `out`.

    lz4 exits non-zero on the bytes after the payload, so success is judged by the result: an
    ELF whose segments all fit in the file. Every magic offset is tried, first to last.

    :raise ImageBuildError: no offset yields a valid ELF.
    """
    data = await anyio.Path(bzimage).read_bytes()
    payload = out.with_suffix(".lz4")
    for offset in lz4_offsets(data):
        await anyio.Path(payload).write_bytes(data[offset:])
        with contextlib.suppress(ImageBuildError):  # judged by the result, below
            await run(["lz4", "-d", "-f", "-q", payload, out])
        if await anyio.Path(out).exists() and await anyio.to_thread.run_sync(is_complete_elf, out):
            payload.unlink()
            return
    payload.unlink(missing_ok=True)
    raise ImageBuildError(f"no LZ4-compressed ELF kernel found in {bzimage.name}")


def lz4_offsets(data: bytes) -> list[int]:
    """Every offset of the LZ4 legacy-frame magic in `data`."""
    return [m.start() for m in re.finditer(re.escape(LZ4_MAGIC), data)]


def is_complete_elf(path: Path) -> bool:
    """A 64-bit ELF executable whose program segments all lie within the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    if phnum == 0 or len(table) < phentsize * phnum:
        return False
    for i in range(phnum):
        (p_offset,) = struct.unpack_from("<Q", table, i * phentsize + 8)
        (p_filesz,) = struct.unpack_from("<Q", table, i * phentsize + 32)
        if p_offset + p_filesz > size:
            return False
    return True
