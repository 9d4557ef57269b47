"""`nestbox-agent image build | show`: build (or reuse) the guest image, print the cached one."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import TYPE_CHECKING

from nestbox.hostagent.image.build import build_image
from nestbox.hostagent.image.cache import find_image
from nestbox.hostagent.image.errors import ImageBuildError
from nestbox.hostagent.image.progress import Progress

if TYPE_CHECKING:
    import argparse

    from nestbox.hostagent.image.layout import GuestImage
    from nestbox.hostagent.settings import AgentSettings


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = subparsers.add_parser("image", help="the guest image (kernel, initramfs, rootfs)")
    verbs = image.add_subparsers(dest="verb", metavar="VERB", required=True)
    build = verbs.add_parser("build", help="build the guest image, reusing unchanged stages")
    build.add_argument(
        "--with-base",
        action="store_true",
        help="also build the `base` flavour (git, node, pip, a C toolchain, ...): minutes",
    )
    build.set_defaults(func=run_build)
    show = verbs.add_parser("show", help="print the cached image for the current inputs")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)


def run_build(args: argparse.Namespace, settings: AgentSettings) -> int:
    print(f"building the guest image in {settings.images_dir}", file=sys.stderr)
    try:
        image = asyncio.run(_build_until_signalled(settings, with_base=args.with_base))
    except ImageBuildError as err:
        print(f"image build failed: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("image build interrupted; nothing partial was kept", file=sys.stderr)
        return 130
    _print_image(image, as_json=False)
    return 0


async def _build_until_signalled(settings: AgentSettings, *, with_base: bool) -> GuestImage:
    """The build, cancelled by SIGTERM as by Ctrl-C, so that its clean-up runs either way."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await build_image(settings, Progress(sys.stderr), with_base=with_base)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_show(args: argparse.Namespace, settings: AgentSettings) -> int:
    image = find_image(settings)
    if image is None:
        print(
            f"no guest image for the current inputs in {settings.images_dir}; "
            "run 'nestbox-agent image build'",
            file=sys.stderr,
        )
        return 1
    _print_image(image, as_json=args.json)
    return 0


def _print_image(image: GuestImage, *, as_json: bool) -> None:
    fields = {
        "version": image.version,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "rootfs": str(image.rootfs),
    }
    if as_json:
        print(json.dumps(fields, indent=2))
    else:
        for key, value in fields.items():
            print(f"{key:<8} {value}")
