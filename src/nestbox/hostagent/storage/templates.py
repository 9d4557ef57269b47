"""The template directory: `templates/<template>/` holds one template, of one of two kinds:

  - snapshot: disk + memory + device state; a capsule restores it (fast) and gets its baked
    vCPUs and memory;
  - base: a disk only (`disk.qcow2`, on the guest image's raw rootfs); a capsule boots it cold
    with the vCPUs and memory it asks for.

    templates/<template> -> .<template>.v-<random>     the current version (a symlink)
    templates/.<template>.v-<random>/                   one version, never modified:
      disk.qcow2      the frozen disk: clones get a qcow2 overlay on top of it
      mem             guest RAM as a file (ram="file"): clones map it copy-on-write
      state           device state (and, for ram="state", the RAM too) from the migration
      template.json   TemplateMeta (0600: it holds the envd access token of the snapshot)
    templates/.<template>.build-<random>/               a version being built

A version is built in a staging directory, fsync'ed (a template must survive a reboot), renamed
and then published by swapping the symlink, so what `templates/<template>` names is always
complete. Nothing here starts VMs; `lifecycle.py` does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime  # noqa: TC003 (pydantic needs the types at runtime)
from pathlib import Path  # noqa: TC003
from typing import Literal

import anyio
from pydantic import BaseModel, ConfigDict

from nestbox.hostagent.durable import fsync_path, write_atomic
from nestbox.hostagent.vmm.base import Accel  # noqa: TC001 (pydantic field type)

META_FILE = "template.json"


class TemplateNotFound(Exception):
    """No complete template of that name in the templates directory."""

    def __init__(self, template_id: str) -> None:
        super().__init__(f"template {template_id!r} does not exist")
        self.template_id = template_id


class TemplateMeta(BaseModel):
    """What a clone needs to restore the template: the same machine (kernel, command line,
    memory, vCPUs, accelerator) and where the RAM is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template_id: str
    created_at: datetime
    source: str
    """`image:<version>` for a template booted from the guest image, else the capsule id."""
    image_version: str
    accel: Accel
    kernel: Path
    initrd: Path | None
    cmdline: str
    vcpus: int
    memory_mib: int
    ram: Literal["file", "state"]
    """`file`: RAM is `mem`, the state file is tiny (x-ignore-shared). `state`: RAM is in the
    state file (a template made from a capsule whose RAM was private)."""
    state_bytes: int
    kind: Literal["snapshot", "base"] = "snapshot"
    """`base`: no `mem` nor `state`; `cmdline`, `vcpus` and `memory_mib` are only defaults."""
    default_user: str = "root"
    default_env: dict[str, str] = {}
    access_token: str | None = None
    """The token the snapshot's envd holds (that of the capsule it was made from): a clone's
    `/init` presents it and sets the clone's own. None for a template whose envd has none."""


@dataclass(frozen=True, slots=True)
class TemplateDir:
    root: Path

    @property
    def disk(self) -> Path:
        return self.root / "disk.qcow2"

    @property
    def mem(self) -> Path:
        return self.root / "mem"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def meta_file(self) -> Path:
        return self.root / META_FILE


@dataclass(frozen=True, slots=True)
class Template:
    dir: TemplateDir
    meta: TemplateMeta

    @property
    def template_id(self) -> str:
        return self.meta.template_id

    def size_bytes(self) -> int:
        """Bytes the version's files take on disk (allocated blocks: `mem` and the disks are
        sparse). A few `stat`s."""
        total = 0
        for path in (self.dir.disk, self.dir.mem, self.dir.state, self.dir.meta_file):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_blocks * 512
        return total


def template_path(templates_dir: Path, template_id: str) -> TemplateDir:
    """The name `templates/<template>` (a symlink to the current version once published)."""
    if not template_id or "/" in template_id or template_id.startswith("."):
        raise ValueError(f"bad template id {template_id!r}")
    return TemplateDir(templates_dir / template_id)


def load_template(templates_dir: Path, template_id: str) -> Template:
    """The current version of a published template, by its real (versioned) directory.

    Reading small files; fine on the event loop.

    :raise TemplateNotFound:
    """
    link = template_path(templates_dir, template_id).root
    try:
        tdir = TemplateDir(templates_dir / os.readlink(link))
        meta = TemplateMeta.model_validate_json(tdir.meta_file.read_bytes())
    except (FileNotFoundError, OSError) as err:
        raise TemplateNotFound(template_id) from err
    return Template(tdir, meta)


def make_staging(templates_dir: Path, template_id: str) -> TemplateDir:
    """A fresh, empty staging directory for building `template_id`."""
    template_path(templates_dir, template_id)  # validates the id
    templates_dir.mkdir(parents=True, exist_ok=True)
    root = templates_dir / f".{template_id}.build-{secrets.token_hex(4)}"
    root.mkdir(mode=0o700)
    return TemplateDir(root)


async def publish(staging: TemplateDir, templates_dir: Path, meta: TemplateMeta) -> Template:
    """Write the metadata, fsync everything, make the staging directory a version
    (`.<template>.v-<random>`) and point `templates/<template>` at it (atomic symlink swap).

    Versions are never modified. Capsules refer to the version they were cloned from (their
    overlay's backing file, their RAM file), so replacing a template can never slide a new
    base under an existing capsule; `prune` removes versions no capsule uses any more.
    """
    link = template_path(templates_dir, meta.template_id).root
    version = staging.root.with_name(staging.root.name.replace(".build-", ".v-", 1))

    def _publish() -> None:
        _write_private(staging.meta_file, meta.model_dump_json(indent=2))
        for path in (staging.disk, staging.mem, staging.state, staging.meta_file):
            if path.exists():
                fsync_path(path)
        fsync_path(staging.root)  # the files' names, before the version's name points at them
        staging.root.rename(version)
        tmp_link = templates_dir / f".{meta.template_id}.link-{secrets.token_hex(4)}"
        tmp_link.symlink_to(version.name)
        if link.is_dir() and not link.is_symlink():  # an unversioned older layout
            shutil.rmtree(link)
        tmp_link.rename(link)
        fsync_path(templates_dir)

    await anyio.to_thread.run_sync(_publish)
    return Template(TemplateDir(version), meta)


def mark_unanswered(templates_dir: Path, template_id: str) -> bool:
    """Note, before a new template is made for a caller, that the caller has no answer yet
    (`answered` removes the note once it does). An agent that stops in between leaves the note,
    and its next start forgets the template (`forget_unanswered`): nobody else knows it.
    False (no note) when `template_id` exists already: a failure must not forget that one."""
    if template_path(templates_dir, template_id).root.is_symlink():
        return False
    templates_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(_unanswered(templates_dir, template_id), template_id)
    return True


def answered(templates_dir: Path, template_id: str) -> None:
    _unanswered(templates_dir, template_id).unlink(missing_ok=True)


def forget_unanswered(templates_dir: Path, template_id: str | None = None) -> list[str]:
    """Templates marked unanswered (`template_id`'s, or all): the link goes, then the note;
    `prune` then removes each version no capsule uses (a clone made from one keeps it until
    it goes). The templates forgotten."""
    pattern = f".{template_id}{UNANSWERED}" if template_id else f".*{UNANSWERED}"
    forgotten = []
    for note in templates_dir.glob(pattern):
        name = note.name[1 : -len(UNANSWERED)]
        link = templates_dir / name
        if link.is_symlink():
            link.unlink()
        note.unlink(missing_ok=True)
        forgotten.append(name)
    return forgotten


UNANSWERED = ".unanswered"


def _unanswered(templates_dir: Path, template_id: str) -> Path:
    template_path(templates_dir, template_id)  # validates the id
    return templates_dir / f".{template_id}{UNANSWERED}"


def template_id_of(version: Path) -> str | None:
    """The template a version directory (`.<template>.v-<random>`) belongs to, or None."""
    name = version.name
    if not name.startswith(".") or ".v-" not in name:
        return None
    return name[1:].rsplit(".v-", 1)[0] or None


async def prune(templates_dir: Path, template_id: str, in_use: set[Path]) -> list[Path]:
    """Remove the versions of `template_id` that are neither current nor in `in_use`."""
    link = template_path(templates_dir, template_id).root

    def _prune() -> list[Path]:
        current = templates_dir / os.readlink(link) if link.is_symlink() else None
        removed = []
        for version in templates_dir.glob(f".{template_id}.v-*"):
            if version != current and version not in in_use:
                shutil.rmtree(version, ignore_errors=True)
                removed.append(version)
        return removed

    return await anyio.to_thread.run_sync(_prune)


def _write_private(path: Path, text: str) -> None:
    """Create `path` (owner read/write only, whatever the umask) holding `text`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
