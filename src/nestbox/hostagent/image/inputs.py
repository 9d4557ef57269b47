"""What each build stage depends on, and the content hashes that name the stages.

A stage's key hashes exactly the inputs that change its output, so editing envd's code changes
only the final image's version while the kernel, the debootstrap tree and the dependency layer
are reused. Inputs come in two kinds:

* local: files in this checkout (guest scripts, envd's source, its pinned requirements) and
  the recipes below; cheap to read, so `find_image` uses only these;
* resolved: the kernel package version apt offers now; only a build asks apt for it.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import nestbox

ENVD_PARTS = ("__init__.py", "py.typed", "protocol", "common", "envd")
"""What of `src/nestbox` goes into the guest: envd and what it imports, never the host side."""
ENVD_EXTRA = "envd"
GUEST_PYTHON = "3.11"
"""bookworm's python3: the dependency layer's wheels must be built for this ABI (cp311)."""


@dataclass(frozen=True, slots=True)
class KernelPackage:
    """The versioned Debian kernel package a build resolved from the meta-package."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class ImageInputs:
    """Digests of the local inputs, one per concern."""

    kernel_recipe: str
    tree_recipe: str
    deps_recipe: str
    init_script: str
    envd_source: str
    image_recipe: str


@dataclass(frozen=True, slots=True)
class StageKeys:
    kernel: str
    tree: str
    deps: str
    local: str
    version: str


def digest(*parts: str | bytes) -> str:
    """A 16-hex-digit SHA-256 over `parts`, unambiguous about where one part ends."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def local_key(inputs: ImageInputs) -> str:
    """Names the image's recipe, whatever kernel version it was built with."""
    return digest(
        "local",
        inputs.kernel_recipe,
        inputs.tree_recipe,
        inputs.deps_recipe,
        inputs.init_script,
        inputs.envd_source,
        inputs.image_recipe,
    )


def stage_keys(inputs: ImageInputs, kernel: KernelPackage) -> StageKeys:
    """Every stage's cache key, and the final image's version."""
    kernel_key = digest("kernel", inputs.kernel_recipe, kernel.name, kernel.version)
    local = local_key(inputs)
    return StageKeys(
        kernel=kernel_key,
        tree=digest("tree", inputs.tree_recipe),
        deps=digest("deps", inputs.deps_recipe),
        local=local,
        version=digest("image", local, kernel_key),
    )


def guest_file(name: str) -> bytes:
    """A file shipped to the guest (package data under `image/guest/`)."""
    return resources.files("nestbox.hostagent.image").joinpath("guest", name).read_bytes()


def envd_source_files() -> list[tuple[str, Path]]:
    """(path under the guest's lib dir, source path) of every file of envd's code layer."""
    package = Path(nestbox.__file__).resolve().parent
    found: list[tuple[str, Path]] = []
    for part in ENVD_PARTS:
        path = package / part
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                found.append((f"nestbox/{f.relative_to(package).as_posix()}", f))
    return sorted(found)


def hash_files(files: list[tuple[str, Path]]) -> str:
    return digest(*(x for name, path in files for x in (name, path.read_bytes())))


def project_root() -> Path | None:
    """The checkout holding this package (src layout), or None for an installed wheel."""
    root = Path(nestbox.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def envd_requirements() -> tuple[str, ...]:
    """envd's pinned requirements: the base dependencies plus the `envd` extra, sorted.

    Read from pyproject.toml in a checkout, else from the installed distribution's metadata.
    """
    root = project_root()
    if root is not None:
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        reqs = _expand(project, [*project.get("dependencies", []), f"nestbox[{ENVD_EXTRA}]"])
    else:
        reqs = _from_metadata(metadata.requires("nestbox") or [], ENVD_EXTRA)
    return tuple(sorted(set(reqs)))


def _expand(project: dict[str, object], reqs: list[str]) -> list[str]:
    """Replace self-references like `nestbox[envd-client]` by that extra's requirements."""
    extras = project.get("optional-dependencies", {})
    assert isinstance(extras, dict)
    out: list[str] = []
    pending, seen = list(reqs), set()
    while pending:
        req = pending.pop()
        if m := re.fullmatch(r"nestbox\[([\w,-]+)\]", req.replace(" ", "")):
            for extra in m.group(1).split(","):
                if extra not in seen:
                    seen.add(extra)
                    pending.extend(extras.get(extra, []))
        else:
            out.append(req)
    return out


def _from_metadata(requires: list[str], extra: str) -> list[str]:
    out = []
    for line in requires:
        req, _, marker = line.partition(";")
        marker = marker.strip().replace("'", '"')
        if not marker or marker == f'extra == "{extra}"':
            out.append(req.strip())
    return out
