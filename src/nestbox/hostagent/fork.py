"""Fork: `count` new capsules that are copies of a running one at one instant.

Composed from the operations a template is made of, without consuming the source:

1. Quiesce as a pause does (`lifecycle.prepare_snapshot`: the run's idle envd connections
   closed, `/snapshot/prepare`, the migration set up) while the guest still runs.
2. A live save of the full RAM into a staging template directory: the RAM is copied while the
   guest runs, then the VMM stops the vCPUs for the pages that changed meanwhile (its
   `downtime_ms`). The window, the vCPUs stopped: that remainder, then the copy of the
   source's disk overlay (the VMM flushed and released the disk when the migration completed,
   so the copy is the disk at that instant), then the guest runs on in the same VM
   (`Hypervisor.cancel_save`: `cont` takes the disk back). Nothing else waits in it: no fsync,
   no flatten, no new VM. Then `/health`, so the source's envd runs its post-restore recovery
   (keep-alive and port forwarding back on) at once.
3. Outside the window: the copied overlay is flattened onto the raw image (a template never
   depends on another template's version), the directory published as the hidden template
   `fork-<hex>` (`ram="state"`, the source's token: a clone's `/init` presents it and sets the
   clone's own), and the copies are ordinary creates from it (`CapsuleManager.create`): each
   gets its own slot, record, envd token, identity and entropy through `/init`, as any clone.
   The template's name is unpublished as soon as the copies run; its version stays while a
   copy (running or paused) is based on it, so the copies never depend on the source.

`prune` removes fork versions no capsule uses any more (after every fork and destroy), and
leftovers of a fork a crash interrupted (a published name or a staging directory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent import capsule as cap
from nestbox.hostagent import lifecycle
from nestbox.hostagent.capsule import CapsuleNotFound, CapsuleState, InvalidState
from nestbox.hostagent.envdconn.errors import EnvdCallError
from nestbox.hostagent.errors import BadRequest, CapsuleExists
from nestbox.hostagent.manager import CAPSULE_ID, CreateSpec
from nestbox.hostagent.storage import templates as tpl

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.managed import CapsuleView
    from nestbox.hostagent.manager import CapsuleManager

log = logging.getLogger(__name__)

MAX_COPIES = 10
PREFIX = "fork-"
FORK_TEMPLATE = re.compile(r"^fork-[0-9a-f]{12}$")
SOURCE_DISK = "source.qcow2"
"""The source's overlay as copied in the window, in the staging directory until flattened."""
HEALTH_S = 5.0

_in_flight: set[str] = set()
"""Fork template ids being made by this process (`prune` leaves them alone)."""


@dataclass(frozen=True, slots=True)
class ForkResult:
    copies: list[CapsuleView]
    paused_ms: int
    """How long the source's vCPUs were stopped."""
    quiesced_ms: int
    """From the start of the quiesce to the guest running again (envd's prepare included)."""


async def fork(
    manager: CapsuleManager, capsule_id: str, count: int, ids: list[str] | None = None
) -> ForkResult:
    """Make `count` running copies of the running capsule `capsule_id` (named `ids` if given).

    :raise BadRequest: :raise CapsuleExists: :raise CapsuleNotFound: :raise InvalidState:
    :raise VmError: :raise GuestUnreachable: (no copy is left then; the source runs on)
    """
    ids = list(ids or [])
    if not 1 <= count <= MAX_COPIES:
        raise BadRequest(f"count must be 1 to {MAX_COPIES}, not {count}")
    if ids and len(ids) != count:
        raise BadRequest(f"{len(ids)} capsule ids given for {count} copies")
    ids = ids or [cap.new_capsule_id() for _ in range(count)]
    for cid in ids:
        if not CAPSULE_ID.match(cid):
            raise BadRequest(f"bad capsule id {cid!r}: want cl- and 25 of [0-9a-z]")
    if len(set(ids)) != len(ids) or capsule_id in ids:
        raise BadRequest("the copies' ids must be distinct and new")
    existing = [cid for cid in ids if _known(manager, cid)]
    if existing:
        raise CapsuleExists(f"capsule {existing[0]} exists")
    template_id = f"{PREFIX}{secrets.token_hex(6)}"
    _in_flight.add(template_id)
    try:
        template, timing, meta = await _snapshot(manager, capsule_id, template_id)
        try:
            copies = await _clone(manager, template, ids, meta)
        finally:
            with anyio.CancelScope(shield=True):
                await manager.delete_template(template_id)
    finally:
        _in_flight.discard(template_id)
    extra = {"capsule_id": capsule_id, "count": count, "paused_ms": timing[0]}
    log.info("capsule forked", extra={**extra, "quiesced_ms": timing[1]})
    return ForkResult(copies=copies, paused_ms=timing[0], quiesced_ms=timing[1])


def _known(manager: CapsuleManager, capsule_id: str) -> bool:
    try:
        manager.entry(capsule_id)
    except CapsuleNotFound:
        return False
    return True


async def _snapshot(
    manager: CapsuleManager, capsule_id: str, template_id: str
) -> tuple[tpl.Template, tuple[int, int], CreateSpec]:
    """The source's state and disk as the published template `template_id`; the timings of the
    window; what each copy is created with (the source's team, timeout, egress)."""
    runtime = manager.runtime
    host = runtime.host
    templates_dir = manager.settings.templates_dir
    entry = manager.entry(capsule_id)
    async with entry.lock:
        capsule = runtime.get(capsule_id)
        staging = tpl.make_staging(templates_dir, template_id)
        try:
            run = capsule.run
            if manager.state(capsule_id) != CapsuleState.RUNNING or run is None:
                raise InvalidState(capsule_id, capsule.state, frozenset({CapsuleState.RUNNING}))
            record = capsule.record
            started = saved_at = time.monotonic()
            downtime_ms: int | None = None
            try:
                await lifecycle.prepare_snapshot(host, run, ignore_shared=False)
                prepared = time.monotonic()
                with anyio.fail_after(host.timeouts.save):
                    # A live save: the RAM is copied while the guest runs on, then the
                    # VMM stops the vCPUs for what changed meanwhile (`downtime_ms`);
                    # they stay stopped through the disk copy, until `cancel_save`.
                    saved = await host.hypervisor.save(run.vm, staging.state, ignore_shared=False)
                    saved_at = time.monotonic()
                    downtime_ms = saved.downtime_ms
                    await anyio.to_thread.run_sync(
                        shutil.copyfile, record.disk, staging.root / SOURCE_DISK
                    )
            finally:
                # The guest runs on in the same VM whatever happened (a completed
                # migration is taken back as a failed one is; nothing stopped: no-op).
                with anyio.CancelScope(shield=True), anyio.fail_after(lifecycle.CANCEL_SAVE_S):
                    await host.hypervisor.cancel_save(run.vm)
                running = time.monotonic()
                await lifecycle.guest_runs_on(run)  # drop what envd closed while preparing
                await _recover_envd(manager, capsule_id)
            copy = record.model_copy(
                update={"disk": staging.root / SOURCE_DISK, "ram": "anonymous", "ram_file": None}
            )
            await lifecycle.freeze_into_template(copy, staging)
            await anyio.to_thread.run_sync(_unlink, staging.root / SOURCE_DISK)
            meta = lifecycle.template_meta(
                record, template_id, source=capsule_id, ram="state",
                state_bytes=saved.state_bytes, accel=runtime.accel.accel,
            )  # fmt: skip
            template = await tpl.publish(staging, templates_dir, meta)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    lambda: shutil.rmtree(staging.root, ignore_errors=True)
                )
            raise
        spec = CreateSpec(
            template_id=template_id, team_id=entry.record.team_id,
            idle_timeout_s=entry.record.idle_timeout_s, egress=entry.record.egress,
        )  # fmt: skip
    stopped_ms = _ms(running - saved_at) + (
        downtime_ms if downtime_ms is not None else _ms(saved_at - prepared)
    )
    log.debug("fork window", extra={"capsule_id": capsule_id, "save_ms": _ms(saved_at - prepared),
                                    "downtime_ms": downtime_ms})  # fmt: skip
    timing = (stopped_ms, _ms(running - started))
    return template, timing, spec


async def _recover_envd(manager: CapsuleManager, capsule_id: str) -> None:
    """The source's envd saw `/snapshot/prepare`: its first request afterwards runs the
    post-restore recovery (keep-alive, port forwarding). Best effort."""
    entry = manager.entry(capsule_id)
    if entry.run is None:
        return
    try:
        with anyio.fail_after(HEALTH_S):
            await entry.run.envd.health()
    except (EnvdCallError, TimeoutError) as err:
        log.warning("envd did not answer after the fork: %r", err,
                    extra={"capsule_id": capsule_id})  # fmt: skip


async def _clone(
    manager: CapsuleManager, template: tpl.Template, ids: list[str], spec: CreateSpec
) -> list[CapsuleView]:
    """A running capsule per id from `template`, concurrently; on any failure none is left."""
    made: dict[str, CapsuleView] = {}

    async def one(cid: str) -> None:
        made[cid] = await manager.create(
            CreateSpec(template_id=template.template_id, capsule_id=cid, team_id=spec.team_id,
                       idle_timeout_s=spec.idle_timeout_s, egress=spec.egress)
        )  # fmt: skip

    try:
        async with anyio.create_task_group() as tg:
            for cid in ids:
                tg.start_soon(one, cid)
    except BaseException as err:
        with anyio.CancelScope(shield=True):
            for cid in made:
                with contextlib.suppress(Exception):
                    await manager.destroy(cid)
        if isinstance(err, ExceptionGroup):
            raise err.exceptions[0] from err  # the first copy's failure, with its own code
        raise
    return [made[cid] for cid in ids]


async def prune(manager: CapsuleManager) -> list[Path]:
    """Remove fork versions no capsule of this agent is based on, and what a fork a crash
    interrupted left (its published name, its staging directory). Returns what went."""
    templates_dir = manager.settings.templates_dir
    state_dir = manager.settings.state_dir
    busy = set(_in_flight)
    live = [c.record for c in manager.runtime.capsules()]

    def _prune() -> list[Path]:
        if not templates_dir.is_dir():
            return []
        records = live + cap.read_records(state_dir)
        in_use = {r.template_dir for r in records if r.template_dir is not None}
        removed: list[Path] = []
        for path in templates_dir.iterdir():
            name = path.name
            tid = name.lstrip(".").split(".", 1)[0]
            if not FORK_TEMPLATE.match(tid) or tid in busy:
                continue
            name_left = (path.is_symlink() and name == tid) or name.startswith(f".{tid}.link-")
            dir_left = path.is_dir() and (
                ".build-" in name or (".v-" in name and path not in in_use)
            )
            if name_left:
                path.unlink(missing_ok=True)
            elif dir_left:
                shutil.rmtree(path, ignore_errors=True)
            else:
                continue
            removed.append(path)
        return removed

    removed = await anyio.to_thread.run_sync(_prune)
    if removed:
        log.info("fork leftovers removed: %d", len(removed), extra={"leftovers": len(removed)})
    return removed


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
