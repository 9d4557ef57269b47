"""`build_image`: build (or reuse) every stage of the guest image, under the cache lock.

Stages, in order, each reused when its key's directory exists (see `layout.py`):
kernel (Debian cloud kernel + initramfs), tree (debootstrap), deps (envd's Python
requirements), image (ext4 of tree + deps + envd's code + PID 1). Needs root.

With `with_base` two more stages follow for the `base` flavour (`basetree.py`): basetree (the
tree plus git, node, pip, a C toolchain, ...) and base image (the same final stage over that
tree), whose manifest names the flavour so `find_image` never returns it for `minimal`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.image import basetree, kernel, layout, pydeps, rootfs
from nestbox.hostagent.image.commands import require_tools
from nestbox.hostagent.image.errors import ImageBuildError
from nestbox.hostagent.image.inputs import (
    ImageInputs,
    KernelPackage,
    StageKeys,
    digest,
    envd_source_files,
    guest_file,
    hash_files,
    local_key,
    stage_keys,
)
from nestbox.hostagent.image.layout import CacheLayout, CacheLock, GuestImage
from nestbox.hostagent.image.progress import Progress, StageReport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.5
TOOLS = (
    "debootstrap",
    "chroot",
    "mkfs.ext4",
    "e2fsck",
    "cp",
    "apt-get",
    "apt-cache",
    "dpkg",
    "lz4",
)


def current_inputs() -> ImageInputs:
    """Digests of this checkout's local inputs (quick file reads; no apt, no network)."""
    return ImageInputs(
        kernel_recipe=kernel.recipe(),
        tree_recipe=rootfs.tree_recipe(),
        deps_recipe=pydeps.recipe(),
        init_script=digest(guest_file("nestbox-init")),
        envd_source=hash_files(envd_source_files()),
        image_recipe=rootfs.image_recipe(),
    )


def base_local_key(inputs: ImageInputs) -> str:
    """Names the `base` flavour's recipe (the minimal recipe plus the base packages)."""
    return digest("base", local_key(inputs), basetree.base_recipe())


async def build_image(
    settings: AgentSettings, progress: Progress | None = None, *, with_base: bool = False
) -> GuestImage:
    """Build the guest image for the current inputs, reusing every cached stage; with
    `with_base` also the `base` flavour's stages (the minimal image is returned all the same).

    :raise ImageBuildError: not root, a tool is missing, or a stage failed. A failed or
        cancelled build leaves no partial artifact in the cache.
    """
    images = await build_images(settings, progress, with_base=with_base)
    return images[0]


async def build_images(
    settings: AgentSettings, progress: Progress | None = None, *, with_base: bool = False
) -> tuple[GuestImage, GuestImage | None]:
    """(minimal image, base image or None): see `build_image`.

    The minimal stages and the base image's final stage run under the cache lock; the slow
    basetree stage (apt: minutes) runs between them under a lock of its own, in a temporary
    directory of its own, so other builds (an envd change: seconds) never wait for it.
    """
    if os.geteuid() != 0:
        raise ImageBuildError("building the guest image needs root (debootstrap, chroot, mkfs)")
    require_tools(*TOOLS)
    progress = progress or Progress(None)
    cache = CacheLayout(settings.images_dir)
    async with _locked(cache, progress, "lock"):
        image, keys, package = await _build_all(cache, progress)
    if not with_base:
        return image, None
    base_key = basetree.base_tree_key(keys.tree)
    async with _locked(cache, progress, "lock", base=True):
        base_tree_dir = await _stage(
            progress,
            "basetree",
            cache.tree(base_key),
            layout.META,
            lambda: basetree.build_base_tree(cache, base_key, cache.tree(keys.tree)),
        )
    inputs = await anyio.to_thread.run_sync(current_inputs)
    base_local = base_local_key(inputs)
    base_keys = StageKeys(
        kernel=keys.kernel, tree=base_key, deps=keys.deps, local=base_local,
        version=digest("image", base_local, keys.kernel),
    )  # fmt: skip
    async with _locked(cache, progress, "lock"):
        base_dir = await _stage(
            progress,
            "base",
            cache.guest(base_keys.version),
            layout.MANIFEST,
            lambda: _build_guest(
                cache, base_keys, package, cache.kernel(keys.kernel), base_tree_dir,
                cache.deps(keys.deps),
            ),
        )  # fmt: skip
    return image, layout.image_at(base_dir)


@contextlib.asynccontextmanager
async def _locked(
    cache: CacheLayout, progress: Progress, name: str, *, base: bool = False
) -> AsyncIterator[None]:
    """Hold the cache lock (or the basetree stage's own) and start from an empty temp dir."""
    lock = CacheLock(cache, base=base)
    with progress.stage(name) as report:
        await _acquire(lock, report)
    try:
        tmp = cache.tmp_base if base else cache.tmp
        await anyio.to_thread.run_sync(layout.clear_temp, cache, tmp)
        yield
    finally:
        lock.release()


async def _acquire(lock: CacheLock, report: StageReport) -> None:
    # Polled rather than a blocking flock in a thread: a cancelled wait must not leave a thread
    # behind that takes the lock later and never releases it.
    if lock.acquire(blocking=False):
        report.status, report.detail = "taken", str(lock.path)
        return
    log.info("another image build holds %s; waiting", lock.path)
    while not lock.acquire(blocking=False):  # noqa: ASYNC110 (another process: no Event)
        await anyio.sleep(LOCK_POLL_S)
    report.status, report.detail = "waited", "another build held the lock"


async def _build_stages(cache: CacheLayout, progress: Progress) -> GuestImage:
    image, _, _ = await _build_all(cache, progress)
    return image


async def _build_all(
    cache: CacheLayout, progress: Progress
) -> tuple[GuestImage, StageKeys, KernelPackage]:
    with progress.stage("inputs") as report:
        inputs = await anyio.to_thread.run_sync(current_inputs)
        package = await kernel.resolve_package()
        keys = stage_keys(inputs, package)
        report.status = "resolved"
        report.detail = f"version {keys.version}, kernel {package.name} {package.version}"
    kernel_dir = await _stage(
        progress,
        "kernel",
        cache.kernel(keys.kernel),
        layout.META,
        lambda: kernel.build_kernel(cache, keys.kernel, package),
    )
    tree_dir = await _stage(
        progress,
        "tree",
        cache.tree(keys.tree),
        layout.META,
        lambda: rootfs.build_tree(cache, keys.tree, rootfs.apt_mirror()),
    )
    deps_dir = await _stage(
        progress,
        "deps",
        cache.deps(keys.deps),
        layout.META,
        lambda: pydeps.build_deps(cache, keys.deps),
    )
    image_dir = await _stage(
        progress,
        "image",
        cache.guest(keys.version),
        layout.MANIFEST,
        lambda: _build_guest(cache, keys, package, kernel_dir, tree_dir, deps_dir),
    )
    return layout.image_at(image_dir), keys, package


async def _stage(
    progress: Progress, name: str, target: Path, marker: str, build: Callable[[], Awaitable[Path]]
) -> Path:
    with progress.stage(name) as report:
        report.detail = str(target)
        if (target / marker).is_file():
            report.status = "cached"
            return target
        log.info("building stage %s into %s", name, target)
        result = await build()
        report.status = "built"
        return result


async def _build_guest(
    cache: CacheLayout,
    keys: StageKeys,
    package: KernelPackage,
    kernel_dir: Path,
    tree_dir: Path,
    deps_dir: Path,
) -> Path:
    """The final stage: root directory → ext4, kernel files linked in, manifest last."""
    work = layout.make_temp(cache, "image")
    envd_files = await anyio.to_thread.run_sync(envd_source_files)
    try:
        staging = work / "root"
        await rootfs.assemble_root(
            staging, tree_dir, deps_dir, envd_files, guest_file("nestbox-init"), keys.version
        )
        size_mib = await rootfs.make_ext4(staging, work / layout.ROOTFS)
        await anyio.to_thread.run_sync(layout.remove_tree, staging)
        for name in (layout.VMLINUX, layout.INITRD):
            await anyio.to_thread.run_sync(_link_or_copy, kernel_dir / name, work / name)
        manifest = _manifest(keys, package, kernel_dir, size_mib, envd_files)
        await anyio.to_thread.run_sync(layout.write_json, work / layout.MANIFEST, manifest)
        target = cache.guest(keys.version)
        await anyio.to_thread.run_sync(layout.publish, work, target)
        return target
    finally:
        if work.exists():
            await anyio.to_thread.run_sync(layout.remove_tree, work)


def _manifest(
    keys: StageKeys,
    package: KernelPackage,
    kernel_dir: Path,
    size_mib: int,
    envd_files: list[tuple[str, Path]],
) -> dict[str, object]:
    kernel_meta = layout.read_json(kernel_dir / layout.META) or {}
    return {
        "version": keys.version,
        "local_key": keys.local,
        "stages": {"kernel": keys.kernel, "tree": keys.tree, "deps": keys.deps},
        "kernel": {
            "package": package.name,
            "version": package.version,
            "release": kernel_meta.get("release"),
        },
        "rootfs_size_mib": size_mib,
        "envd_files": len(envd_files),
        "built_at": time.time(),
    }


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
