"""The `base` flavour's extra stage: the guest tree plus what an agent's code expects.

`minimal` has bash, python3 and sudo and little else. The `base` template adds git, curl,
wget, pip and venv, node and npm, a C toolchain, unzip, jq, less and procps, from Debian's
packages (bookworm main, the mirror the tree was bootstrapped from). The stage is keyed on the
tree's key and its own package list, so it is rebuilt only when either changes, and it is
built only when someone asks for `base` (`nestbox-agent image build --with-base`, or the first
capsule made from `base`): `make test` never pays for it unless a test asks.

Built as root: a full copy of the cached tree (not a hard-link copy: dpkg's maintainer scripts
may edit files in place, which would write through into the cached tree), the host's
resolv.conf for apt's downloads, `/proc` mounted for the maintainer scripts, `apt-get install
--no-install-recommends`, then the tree's own config files back and apt's caches dropped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.image import layout
from nestbox.hostagent.image.commands import run
from nestbox.hostagent.image.inputs import digest
from nestbox.hostagent.image.rootfs import configure_tree, write_new

if TYPE_CHECKING:
    from nestbox.hostagent.image.layout import CacheLayout

BASE_PACKAGES = (
    "git",
    "curl",
    "wget",
    "ca-certificates",
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "build-essential",
    "unzip",
    "jq",
    "less",
    "procps",
)
BASE_RECIPE = "base-1"
FLAVOUR = "base"
HOST_RESOLV = Path("/etc/resolv.conf")
APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
}


def base_recipe() -> str:
    return digest(BASE_RECIPE, *BASE_PACKAGES)


def base_tree_key(tree_key: str) -> str:
    """The stage's key: the tree it starts from and its package list."""
    return digest("basetree", tree_key, base_recipe())


async def build_base_tree(cache: CacheLayout, key: str, tree_dir: Path) -> Path:
    """Copy `tree_dir`'s root, install `BASE_PACKAGES` into it; returns `trees/<key>`.

    :raise ImageBuildError: a copy, a mount or apt failed (nothing is left in the cache).
    """
    work = layout.make_temp(cache, "basetree", base=True)
    try:
        root = work / "root"
        await run(["cp", "-a", tree_dir / "root", root])
        resolv = await anyio.to_thread.run_sync(HOST_RESOLV.read_bytes)
        await anyio.to_thread.run_sync(write_new, root, "etc/resolv.conf", resolv, 0o644)
        proc = root / "proc"
        await run(["mount", "-t", "proc", "proc", proc])
        try:
            env = {**os.environ, **APT_ENV}
            await run(["chroot", root, "apt-get", "update", "-q"], env=env)
            await run(
                ["chroot", root, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                 *BASE_PACKAGES],
                env=env,
            )  # fmt: skip
            await run(["chroot", root, "apt-get", "clean"], env=env)
        finally:
            with anyio.CancelScope(shield=True):
                await run(["umount", "--lazy", proc])
        await anyio.to_thread.run_sync(configure_tree, root)
        meta = {
            "from_tree": tree_dir.name,
            "packages": list(BASE_PACKAGES),
            "built_at": time.time(),
        }
        await anyio.to_thread.run_sync(layout.write_json, work / layout.META, meta)
        target = cache.tree(key)
        await anyio.to_thread.run_sync(layout.publish, work, target)
        return target
    finally:
        if work.exists():
            await anyio.to_thread.run_sync(layout.remove_tree, work)
