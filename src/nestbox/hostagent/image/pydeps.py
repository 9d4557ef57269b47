"""The dependency layer: envd's pinned Python requirements, pip-installed for the guest.

Cached on the requirements alone (from pyproject.toml), so changing envd's code never
re-downloads them. envd's own code is not installed here: the final image copies it from
`src/nestbox` (see `inputs.envd_source_files`).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.image import layout
from nestbox.hostagent.image.commands import run
from nestbox.hostagent.image.inputs import GUEST_PYTHON, digest, envd_requirements

if TYPE_CHECKING:
    from pathlib import Path

RECIPE = "deps-1"


def recipe() -> str:
    return digest(RECIPE, GUEST_PYTHON, *envd_requirements())


def pip_command(target: Path, requirements: tuple[str, ...]) -> list[str]:
    """`pip install --target` with this interpreter's pip, for the guest's Python ABI."""
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--target",
        str(target),
    ]
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if host != GUEST_PYTHON:
        # Another host Python: fetch wheels for the guest's ABI instead of the host's.
        tag = "cp" + GUEST_PYTHON.replace(".", "")
        argv += [
            "--only-binary=:all:",
            "--python-version",
            GUEST_PYTHON,
            "--implementation",
            "cp",
            "--abi",
            tag,
            "--platform",
            "manylinux2014_x86_64",
        ]
    return [*argv, *requirements]


async def build_deps(cache: layout.CacheLayout, key: str) -> Path:
    """pip-install envd's requirements into `deps/<key>/lib`; returns `deps/<key>`.

    :raise ImageBuildError: pip failed.
    """
    requirements = envd_requirements()
    work = layout.make_temp(cache, "deps")
    try:
        lib = work / "lib"
        await run(pip_command(lib, requirements))
        # Console scripts carry the host interpreter's path in their #! line: useless inside.
        await anyio.to_thread.run_sync(layout.remove_tree, lib / "bin")
        installed = sorted(p.name.removesuffix(".dist-info") for p in lib.glob("*.dist-info"))
        meta = {"requirements": list(requirements), "installed": installed, "built_at": time.time()}
        await anyio.to_thread.run_sync(layout.write_json, work / layout.META, meta)
        target = cache.deps(key)
        await anyio.to_thread.run_sync(layout.publish, work, target)
        return target
    finally:
        if work.exists():
            await anyio.to_thread.run_sync(layout.remove_tree, work)
