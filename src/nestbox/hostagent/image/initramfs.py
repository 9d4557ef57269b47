"""The guest's initramfs: busybox-static, the virtio modules and `guest/initramfs-init`.

Written as a newc cpio archive directly from Python (no `find | cpio` pipeline, no root needed
for the /dev/console node), gzip'ed with a fixed mtime so the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from nestbox.hostagent.image.errors import ImageBuildError

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "mount", "umount", "switch_root", "insmod", "mkdir", "cat", "sleep", "echo", "ls")
DIRS = ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")
_PT_INTERP = 3


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def build_initramfs(init: bytes, modules: list[Path], busybox: Path = BUSYBOX) -> bytes:
    """The gzip'ed cpio archive; `modules` are loaded in the given order.

    :raise ImageBuildError: busybox is missing or not statically linked.
    """
    entries = [Entry(d, stat.S_IFDIR | 0o755) for d in DIRS]
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, _static_busybox(busybox)))
    entries += [Entry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    entries += [
        Entry(f"lib/modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()) for m in modules
    ]
    order = "".join(f"{m.name}\n" for m in modules).encode()
    entries.append(Entry("modules.list", stat.S_IFREG | 0o644, order))
    entries.append(Entry("init", stat.S_IFREG | 0o755, init))
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)


def cpio_newc(entries: list[Entry]) -> bytes:
    """A "newc" (SVR4, no CRC) cpio archive of `entries`, as the kernel unpacks it."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + name
        out += b"\0" * (-len(out) % 4)
        out += e.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _static_busybox(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageBuildError(f"{path} missing: install busybox-static") from err
    if _has_interpreter(data):
        raise ImageBuildError(f"{path} is dynamically linked: install busybox-static")
    return data


def _has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF asks for a dynamic loader (has PT_INTERP)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ImageBuildError("busybox is not a 64-bit ELF executable")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(
        struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == _PT_INTERP for i in range(phnum)
    )
