"""Finding a built guest image, and `ensure_image` (find, else build).

`find_image` reads only local inputs and the cache, never apt, so it is quick and works
offline: among the complete images built from this checkout's recipe (whatever kernel version
apt offered when each was built) it returns the newest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.image import layout
from nestbox.hostagent.image.build import base_local_key, build_images, current_inputs
from nestbox.hostagent.image.inputs import local_key
from nestbox.hostagent.image.layout import CacheLayout, GuestImage

if TYPE_CHECKING:
    from nestbox.hostagent.image.progress import Progress
    from nestbox.hostagent.settings import AgentSettings

__all__ = [
    "GuestImage",
    "ensure_base_image",
    "ensure_image",
    "find_base_image",
    "find_image",
    "find_in",
]

log = logging.getLogger(__name__)


def find_image(settings: AgentSettings) -> GuestImage | None:
    """The newest complete cached image matching the current local inputs, or None.

    Blocking file reads (a few milliseconds): from async code prefer `ensure_image`, or call it
    through `anyio.to_thread.run_sync`.
    """
    return find_in(CacheLayout(settings.images_dir), local_key(current_inputs()))


def find_base_image(settings: AgentSettings) -> GuestImage | None:
    """The newest cached image of the `base` flavour for the current inputs, or None
    (blocking file reads, as `find_image`)."""
    return find_in(CacheLayout(settings.images_dir), base_local_key(current_inputs()))


def find_in(cache: CacheLayout, key: str) -> GuestImage | None:
    """The newest complete image in `cache` whose manifest has `local_key == key`."""
    best: tuple[float, GuestImage] | None = None
    for directory in cache.guest_dirs():
        manifest = layout.read_json(directory / layout.MANIFEST)
        if manifest is None or manifest.get("local_key") != key:
            continue
        image = layout.image_at(directory)
        if not all(p.is_file() for p in (image.kernel, image.initrd, image.rootfs)):
            continue
        built_at = float(manifest.get("built_at", 0.0))
        if best is None or built_at > best[0]:
            best = (built_at, image)
    return best[1] if best else None


async def ensure_image(settings: AgentSettings, progress: Progress | None = None) -> GuestImage:
    """The cached image for the current inputs; built first if there is none.

    :raise ImageBuildError: a build was needed and failed.
    """
    image = await anyio.to_thread.run_sync(find_image, settings)
    if image is not None:
        return image
    log.info("no guest image for the current inputs in %s; building it", settings.images_dir)
    image, _ = await build_images(settings, progress)
    return image


async def ensure_base_image(
    settings: AgentSettings, progress: Progress | None = None
) -> GuestImage:
    """The cached `base` flavour for the current inputs; built first (minutes: apt downloads
    and installs its packages) if there is none.

    :raise ImageBuildError: a build was needed and failed.
    """
    image = await anyio.to_thread.run_sync(find_base_image, settings)
    if image is not None:
        return image
    log.info("no base guest image in %s; building it", settings.images_dir)
    _, base = await build_images(settings, progress, with_base=True)
    assert base is not None
    return base
