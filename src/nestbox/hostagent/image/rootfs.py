"""The guest's root file system: the debootstrap tree stage and the final ext4 image.

The tree (Debian minbase + our packages, users and config) is the slow stage (about a minute)
and is cached on its recipe alone. The final image is cheap: a hard-link copy of the tree, plus
the dependency layer, envd's code and our PID 1, turned into ext4 by `mkfs.ext4 -d` (no mount,
no loop device). Files added to the hard-link copy always replace a path (unlink, then write),
so the cached tree is never written through a link.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.image import layout
from nestbox.hostagent.image.commands import run
from nestbox.hostagent.image.errors import ImageBuildError
from nestbox.hostagent.image.inputs import GUEST_PYTHON, digest

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

SUITE = "bookworm"
PACKAGES = ("python3", "socat", "iproute2", "procps", "sudo", "ca-certificates")
"""On top of minbase: envd's interpreter, socat for its port forwarding, `ip` for PID 1, ps
for users, sudo for the non-root user, CA certificates for capsules given egress."""
GUEST_USER = ("user", 1000)
CONFIG_FILES: dict[str, tuple[str, int]] = {
    "etc/hostname": ("nestbox\n", 0o644),
    "etc/hosts": (
        "127.0.0.1\tlocalhost\n127.0.1.1\tnestbox\n::1\tlocalhost ip6-localhost\n",
        0o644,
    ),
    "etc/resolv.conf": (
        "# Nestbox: capsules have no egress, hence no DNS, unless it is turned on for them.\n"
        "nameserver 127.0.0.1\n",
        0o644,
    ),
    "etc/nestbox-guest": ("Nestbox guest image: envd runs in in-VM mode here.\n", 0o644),
    "etc/sudoers.d/nestbox-user": ("user ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440),
}
TREE_RECIPE = "tree-1"
IMAGE_RECIPE = "image-1"
MIN_SIZE_MIB = 2048
"""The ext4 file is sparse: its size is the guest's disk size, not what it costs on the host."""
INIT_PATH = "usr/sbin/nestbox-init"  # /sbin is a symlink to usr/sbin (merged /usr)
LIB_PATH = "opt/nestbox/lib"


def tree_recipe() -> str:
    config = [x for k, (text, mode) in sorted(CONFIG_FILES.items()) for x in (k, text, str(mode))]
    return digest(TREE_RECIPE, SUITE, *PACKAGES, *map(str, GUEST_USER), *config)


RESOLV_CONF = (
    "# Nestbox: the agent's DNS forwarder, on the guest's gateway (tap0 in the slot's netns).\n"
    "# It answers only capsules that have egress; without egress nothing resolves.\n"
    "nameserver 169.254.0.22\n"
    "options timeout:2 attempts:2\n"
)
"""Written by the image stage over the tree's (a tree rebuild costs minutes; this, seconds)."""


def image_recipe() -> str:
    return digest(IMAGE_RECIPE, str(MIN_SIZE_MIB), INIT_PATH, LIB_PATH, RESOLV_CONF)


# ---------------------------------------------------------------------------------------------
# The tree stage


async def build_tree(cache: layout.CacheLayout, key: str, mirror: str) -> Path:
    """debootstrap + users + config into `trees/<key>/root`; returns `trees/<key>`.

    :raise ImageBuildError: debootstrap or the set-up failed.
    """
    work = layout.make_temp(cache, "tree")
    try:
        root = work / "root"
        cache.debs.mkdir(parents=True, exist_ok=True)
        await run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--cache-dir={cache.debs}",
                SUITE,
                root,
                mirror,
            ],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        await _set_up_tree(root)
        meta = {
            "suite": SUITE,
            "mirror": mirror,
            "packages": list(PACKAGES),
            "built_at": time.time(),
        }
        await anyio.to_thread.run_sync(layout.write_json, work / layout.META, meta)
        target = cache.tree(key)
        await anyio.to_thread.run_sync(layout.publish, work, target)
        return target
    finally:
        if work.exists():
            await anyio.to_thread.run_sync(layout.remove_tree, work)


async def _set_up_tree(root: Path) -> None:
    name, uid = GUEST_USER
    useradd = ["chroot", str(root), "useradd", "--create-home", "--uid", str(uid),
               "--user-group", "--shell", "/bin/bash", "--groups", "sudo", name]  # fmt: skip
    await run(useradd)
    await anyio.to_thread.run_sync(configure_tree, root)


def configure_tree(root: Path) -> None:
    """Write our config files, then drop apt's downloads and indexes (useless offline)."""
    for rel, (text, mode) in CONFIG_FILES.items():
        write_new(root, rel, text.encode(), mode)
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*_*",
        "var/log/*.log",
        "var/cache/debconf/*-old",
    ):
        for path in root.glob(pattern):
            path.unlink()


def apt_mirror(suite: str = SUITE, etc: Path = Path("/etc/apt")) -> str:
    """The mirror the host's apt uses for `suite` main (the only one this machine may reach).

    :raise ImageBuildError: no apt source carries `suite` main.
    """
    for types, uris, suites, components in _apt_sources(etc):
        if "deb" in types and suite in suites and "main" in components and uris:
            return uris[0]
    raise ImageBuildError(f"no apt source for '{suite} main' in {etc}")


Source = tuple[list[str], list[str], list[str], list[str]]


def _apt_sources(etc: Path) -> Iterable[Source]:
    files = [etc / "sources.list"]
    if (etc / "sources.list.d").is_dir():
        files += sorted((etc / "sources.list.d").iterdir())
    for f in files:
        if not f.is_file():
            continue
        if f.suffix == ".sources":
            yield from _deb822(f.read_text())
        elif f.suffix == ".list":
            yield from _one_line(f.read_text())


def _deb822(text: str) -> Iterable[Source]:
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        for line in para.splitlines():
            if ":" in line and not line.startswith(("#", " ", "\t")):
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.split()
        if fields.get("enabled", ["yes"]) != ["no"]:
            yield (
                fields.get("types", []),
                fields.get("uris", []),
                fields.get("suites", []),
                fields.get("components", []),
            )


def _one_line(text: str) -> Iterable[Source]:
    for raw in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()  # drop [options]
        if len(words) >= 4:
            yield ([words[0]], [words[1]], [words[2]], words[3:])


# ---------------------------------------------------------------------------------------------
# The final image


async def assemble_root(
    staging: Path,
    tree: Path,
    deps: Path,
    envd_files: list[tuple[str, Path]],
    init: bytes,
    version: str,
) -> None:
    """Build the guest's root directory in `staging` (which must not exist yet)."""
    await run(["cp", "-a", "--link", tree / "root", staging])
    lib = staging / LIB_PATH
    await anyio.to_thread.run_sync(_real_dir, staging, Path(LIB_PATH).parent.as_posix())
    await run(["cp", "-a", "--link", deps / "lib", lib])
    await anyio.to_thread.run_sync(_add_our_files, staging, envd_files, init, version)
    if sys.version_info[:2] == tuple(map(int, GUEST_PYTHON.split("."))):
        # Same ABI as the guest's python3: ship bytecode, so the first boot skips compiling.
        await run(
            [sys.executable, "-m", "compileall", "-q", "-s", staging, "-p", "/", lib / "nestbox"]
        )


async def make_ext4(staging: Path, out: Path) -> int:
    """`mkfs.ext4 -d` of `staging` into the sparse file `out`, checked with e2fsck.

    Returns the size in MiB.
    """
    used = await anyio.to_thread.run_sync(disk_usage, staging)
    size_mib = image_size_mib(used)
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "nestbox-root", "-m", "0", "-d", str(staging),
            str(out), f"{size_mib}M"]  # fmt: skip
    await run(mkfs)
    await run(["e2fsck", "-f", "-n", out])
    return size_mib


def image_size_mib(used_bytes: int) -> int:
    """The tree plus a quarter and 256 MiB of headroom, at least `MIN_SIZE_MIB`."""
    return max(MIN_SIZE_MIB, math.ceil((used_bytes * 1.25) / 2**20) + 256)


def disk_usage(root: Path) -> int:
    """Bytes allocated below `root`, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def write_new(root: Path, rel: str, data: bytes, mode: int) -> None:
    """Write `root/rel` as a new file (replacing any old one, never writing through it).

    :raise ImageBuildError: a parent of `rel` is a symlink: it could point out of the tree.
    """
    path = root / rel
    _real_dir(root, Path(rel).parent.as_posix())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # not filtered by the umask


def _real_dir(root: Path, rel: str) -> None:
    """Create `root/rel` as real directories, refusing symlinks on the way."""
    path = root
    for part in Path(rel).parts:
        path = path / part
        if path.is_symlink():
            raise ImageBuildError(f"{path} is a symlink; refusing to write through it")
        path.mkdir(mode=0o755, exist_ok=True)


def _add_our_files(
    staging: Path, envd_files: list[tuple[str, Path]], init: bytes, version: str
) -> None:
    """envd's code layer, our PID 1 and the image version, as new files in `staging`."""
    for rel, source in envd_files:
        dest = f"{LIB_PATH}/{rel}"
        _real_dir(staging, Path(dest).parent.as_posix())
        (staging / dest).unlink(missing_ok=True)
        shutil.copy2(source, staging / dest)  # keeps the mtime the .pyc files are checked by
    write_new(staging, INIT_PATH, init, 0o755)
    write_new(staging, "etc/resolv.conf", RESOLV_CONF.encode(), 0o644)
    write_new(staging, "opt/nestbox/image-version", f"{version}\n".encode(), 0o644)
