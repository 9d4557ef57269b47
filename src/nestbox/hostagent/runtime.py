"""`VmRuntime`: the agent's one registry of capsules, and their verbs — boot, clone, pause,
resume, snapshot, destroy.

Every capsule this agent knows has exactly one entry here (`capsule.Capsule`), from the moment
its create starts (STARTING) until it is destroyed, ERROR ones included, and one record on disk
(`capsule.CapsuleRecord`, replaced atomically on every change). Its lock (`Capsule.lock`, the
only per-capsule lock) is held by each verb for the whole verb: two verbs on one capsule are
serialised while different capsules never wait on each other. Verbs are `_<verb>_held` bodies
(lock held) behind public wrappers that take the lock, so composite verbs (a template that
comes back paused) run under one acquisition. The runtime also owns one exit watcher per
running VM (in its task group: a VMM that dies is noticed, its resources removed and its
capsule left in ERROR) and one metrics sampler for all of them (`metrics.Sampler`). The steps
themselves are functions in `lifecycle` that take the record and the run and keep no state.
Each verb logs one INFO line with its duration (`duration_ms`).

What the service adds per run is done here too, so every path (RPC, reaper, recovery, shutdown)
gets it: when a run starts, proxied traffic is let in and the sampler starts; before a snapshot
the sampler stops and proxied requests drain (the seed's pause order); when a run ends, the
calls in flight are cut and `on_run_end` lets the proxy drop its pools.

Open it with `async with VmRuntime.open(settings, system) as rt:`. Leaving the block stops the
watchers but not the VMs: QEMU runs detached, so an agent restart does not kill capsules. It
does wait for slot networks still being torn down, and removes the warm ones (`networks`).

One banner per verb group; what is not registry or state bookkeeping lives in `lifecycle`
(steps), `capsule` (state machine, record, entry) and `storage`/`vmm`/`network`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import anyio

from nestbox.hostagent import capsule as cap
from nestbox.hostagent import lifecycle
from nestbox.hostagent.capsule import (
    Capsule,
    CapsuleError,
    CapsuleNotFound,
    CapsuleRecord,
    CapsuleState,
    InvalidState,
    MachineRecord,
)
from nestbox.hostagent.envdconn import init_request, new_access_token
from nestbox.hostagent.errors import CapsuleExists
from nestbox.hostagent.image.cmdline import kernel_cmdline
from nestbox.hostagent.lifecycle import Host, Run, StepHook, Timeouts, no_hook
from nestbox.hostagent.metrics import Sampler
from nestbox.hostagent.network import (
    GUEST_IP,
    GUEST_PREFIX,
    TAP_IP,
    SlotNetworks,
    SlotPool,
    ensure_blackhole,
)
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage import templates as tpl
from nestbox.hostagent.undo import TeardownError, UndoStack
from nestbox.hostagent.vmm import confine
from nestbox.hostagent.vmm.accel import choose_accel
from nestbox.hostagent.vmm.qemu import QemuHypervisor

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

    from anyio.abc import TaskGroup

    from nestbox.hostagent.image.layout import GuestImage
    from nestbox.hostagent.network import SlotNetwork
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System
    from nestbox.hostagent.vmm.accel import AccelChoice
    from nestbox.hostagent.vmm.base import DiskFormat, Hypervisor
    from nestbox.protocol.envd import InitRequest

log = logging.getLogger(__name__)

S = CapsuleState
SERVICE_FIELDS = ("team_id", "idle_timeout_s", "egress", "egress_allow", "created_at")
"""The record's fields that describe the capsule to the service, not its machine or run: a
capsule remade under the same id (a template that comes back paused) keeps them."""


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    capsules: int
    running: int
    paused: int
    slots_in_use: int
    slots_free: int


class VmRuntime:
    """Creates and drives capsule VMs on this host. See the module docstring."""

    def __init__(
        self,
        settings: AgentSettings,
        system: System,
        task_group: TaskGroup,
        *,
        hypervisor: Hypervisor | None = None,
        accel: AccelChoice | None = None,
        timeouts: Timeouts | None = None,
        open_envd: lifecycle.EnvdOpener = lifecycle.open_envd,
    ) -> None:
        self.settings = settings
        self.accel = accel or choose_accel(settings.accel)
        self.hypervisor: Hypervisor = hypervisor or QemuHypervisor.from_settings(
            self.accel, settings
        )
        self.slots = SlotPool(settings)
        self._sampler = Sampler(settings.metrics_interval_s, task_group.start_soon)
        """One metrics sampling pass a second for every running capsule (`metrics.py`)."""
        timeouts = timeouts or Timeouts()
        self.networks = SlotNetworks(
            system, settings, self.slots, task_group, warm=settings.warm_slots,
            teardown_within=timeouts.teardown,
        )  # fmt: skip
        self.host = Host(
            settings=settings,
            system=system,
            hypervisor=self.hypervisor,
            slots=self.slots,
            networks=self.networks,
            timeouts=timeouts,
            open_envd=open_envd,
        )
        self._tg = task_group
        self._capsules: dict[str, Capsule] = {}
        """The registry: every capsule of this agent, from its create's start to its destroy.
        Keys are added and removed only by create, destroy, a consumed template, recovery."""
        self.on_vm_exit: Callable[[str, int | None], None] | None = None
        """Called (capsule id, exit code) after a VM that exited on its own was cleaned up (the
        capsule is then in ERROR)."""
        self.on_run_end: Callable[[str], Awaitable[None]] | None = None
        """Called (capsule id, shielded) once a run ended: pause, destroy, template, VM exit
        (the proxy drops its pools to the capsule's old address)."""
        self._template_locks: dict[str, anyio.Lock] = {}
        self._restores = anyio.CapacityLimiter(
            settings.restore_concurrency or 2 * (os.cpu_count() or 1)
        )
        """Clones started at once (`restore_concurrency`): a waiting one holds its entry and
        its lock, nothing else (its deadlines start once it runs)."""
        log.info(
            "VM runtime: accelerator %s (%s)",
            self.accel.accel,
            self.accel.reason,
            extra={"accel": self.accel.accel},
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: AgentSettings,
        system: System,
        *,
        hypervisor: Hypervisor | None = None,
        accel: AccelChoice | None = None,
        timeouts: Timeouts | None = None,
        open_envd: lifecycle.EnvdOpener = lifecycle.open_envd,
    ) -> AsyncIterator[VmRuntime]:
        """The runtime, with its task group for exit watchers. VMs outlive the block."""
        confine.secure_data_dirs(settings)  # made 0700, or made so (logged) if looser
        for path in (
            settings.state_dir,
            cap.records_dir(settings.state_dir),
            settings.templates_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)
        # Before any slot exists: a packet for a slot address without a live route is dropped.
        await ensure_blackhole(system, settings)
        body_error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            rt = cls(settings, system, tg, hypervisor=hypervisor, accel=accel, timeouts=timeouts,
                     open_envd=open_envd)  # fmt: skip
            try:
                yield rt
            except BaseException as err:
                body_error = err  # re-raised as is, not wrapped in the task group's group
            await rt.networks.aclose()  # shielded: teardowns in flight end, warm slots go
            confine.remove_agent_cgroups(settings)  # a few rmdirs; none while a VM is left
            tg.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    # ── queries ─────────────────────────────────────────────────────────────────────────

    def get(self, capsule_id: str) -> Capsule:
        """:raise CapsuleNotFound:"""
        try:
            return self._capsules[capsule_id]
        except KeyError:
            raise CapsuleNotFound(capsule_id) from None

    def capsules(self) -> list[Capsule]:
        return list(self._capsules.values())

    @contextlib.asynccontextmanager
    async def _locked(self, capsule_id: str) -> AsyncIterator[Capsule]:
        """The capsule, its lock held; still registered once the lock is had (a verb that
        waited for it may find the capsule destroyed). :raise CapsuleNotFound:"""
        capsule = self.get(capsule_id)
        async with capsule.lock:
            if self._capsules.get(capsule_id) is not capsule:
                raise CapsuleNotFound(capsule_id)
            yield capsule

    def locked(self, capsule_id: str) -> contextlib.AbstractAsyncContextManager[Capsule]:
        """`async with runtime.locked(id) as capsule:` the capsule with its one lock held, for a
        verb composed outside the runtime (fork). :raise CapsuleNotFound:"""
        return self._locked(capsule_id)

    def _register(self, record: CapsuleRecord) -> Capsule:
        """A new entry for `record`, its lock already held by the caller's task (released by
        the caller), so no other verb gets in before the create. :raise CapsuleExists:"""
        if record.id in self._capsules:
            raise CapsuleExists(f"capsule {record.id} exists")
        capsule = Capsule(record)
        capsule.lock.acquire_nowait()
        self._capsules[record.id] = capsule
        return capsule

    def _forget(self, capsule: Capsule) -> None:
        if self._capsules.get(capsule.id) is capsule:
            del self._capsules[capsule.id]
            self._release_version(capsule.record.template_dir)

    def _release_version(self, version: Path | None) -> None:
        """A capsule no longer uses the template version `version`: if it was an old one (its
        template was remade since, e.g. a platform template after an upgrade) that no other
        capsule uses, it is removed, in the background."""
        template_id = tpl.template_id_of(version) if version is not None else None
        if template_id is not None:
            self._tg.start_soon(self._prune_template, template_id)

    async def prune_templates(self) -> None:
        """Remove every template version that is neither current nor used (agent start-up:
        versions whose last capsule went while no agent ran)."""
        versions = await anyio.to_thread.run_sync(
            lambda: list(self.settings.templates_dir.glob(".*.v-*"))
        )
        for template_id in sorted({t for v in versions if (t := tpl.template_id_of(v))}):
            await self._prune_template(template_id)

    async def _prune_template(self, template_id: str) -> None:
        """Remove `template_id`'s versions that are neither current nor used, under the
        template's lock (no publish swaps the current version meanwhile)."""
        try:
            async with self._template_lock(template_id):
                removed = await tpl.prune(
                    self.settings.templates_dir, template_id, self._versions_in_use()
                )
        except (OSError, ValueError) as err:  # never fatal: the next prune tries again
            log.warning("cannot prune template %s: %r", template_id, err)
            return
        if removed:
            log.info("unused template versions removed", extra={
                "template_id": template_id, "leftovers": [p.name for p in removed]})  # fmt: skip

    def statistics(self) -> RuntimeStatistics:
        states = [c.state for c in self._capsules.values()]
        slots = self.networks.statistics()
        return RuntimeStatistics(
            capsules=len(states),
            running=states.count(S.RUNNING),
            paused=states.count(S.PAUSED),
            slots_in_use=slots.in_use,
            slots_free=slots.free,
        )

    # ── create ──────────────────────────────────────────────────────────────────────────

    async def boot(
        self,
        image: GuestImage,
        *,
        template_id: str = "",
        capsule_id: str | None = None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        egress: bool = False,
        ram_shared: bool = False,
        default_user: str = "root",
        env_vars: dict[str, str] | None = None,
        hook: StepHook = no_hook,
    ) -> Capsule:
        """Cold-boot a capsule from the guest image; return when envd answered `/init`.

        `ram_shared` puts the RAM in a file of the capsule's own, mapped shared: its snapshot
        can then become a template whose clones map that file (`snapshot_template`).
        """
        cid = capsule_id or cap.new_capsule_id()
        cdir = self._capsule_dir(cid)
        cmdline = kernel_cmdline(f"{GUEST_IP}/{GUEST_PREFIX}", TAP_IP, cid, template_id)
        record = CapsuleRecord(
            id=cid, template_id=template_id, state=S.STARTING,
            machine=MachineRecord(kernel=image.kernel, initrd=image.initrd, cmdline=cmdline,
                                  vcpus=vcpus or self.settings.default_vcpus,
                                  memory_mib=memory_mib or self.settings.default_memory_mib,
                                  image_version=image.version),
            ram="shared" if ram_shared else "anonymous",
            ram_file=cdir / "mem" if ram_shared else None,
            dir=cdir, disk=cdir / "disk.qcow2", default_user=default_user,
            env_vars=env_vars or {}, pending_token=new_access_token(),
        )  # fmt: skip
        with self._timed("capsule booted", cid, template_id):
            return await self._create(
                record,
                base=image.rootfs,
                base_format="raw",
                restore_from=None,
                ignore_shared=False,
                egress=egress,
                hook=hook,
            )

    async def clone(
        self,
        template_id: str,
        count: int = 1,
        *,
        capsule_id: str | None = None,
        egress: bool = False,
        default_user: str | None = None,
        env_vars: dict[str, str] | None = None,
        team_id: str = "",
        idle_timeout_s: int = 0,
        egress_allow: list[str] | None = None,
        default_workdir: str | None = None,
        hook: StepHook = no_hook,
    ) -> list[Capsule]:
        """Create `count` capsules from a snapshot template, concurrently (`capsule_id`
        names the capsule when `count` is 1; `team_id` and `idle_timeout_s` go into each
        record).

        If any fails, the others are destroyed too and the failures raised (an ExceptionGroup
        when `count` > 1).

        :raise TemplateNotFound: :raise CapsuleExists: :raise GuestUnreachable: :raise VmError:
        """
        template = tpl.load_template(self.settings.templates_dir, template_id)
        if template.meta.accel != self.hypervisor.accel:
            raise CapsuleError(
                f"template {template_id} was made under {template.meta.accel}, "
                f"this host runs {self.hypervisor.accel}"
            )
        service = {"egress": egress, "team_id": team_id, "idle_timeout_s": idle_timeout_s,
                   "egress_allow": list(egress_allow or [])}  # fmt: skip
        if default_workdir:  # else the template's envd keeps its own
            service["default_workdir"] = default_workdir
        clone_one = functools.partial(self._clone_one, template, default_user, env_vars, hook,
                                      service=service)  # fmt: skip
        if count == 1:
            return [await clone_one(capsule_id)]
        made: list[Capsule] = []

        async def one() -> None:
            made.append(await clone_one(None))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(one)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for c in made:
                    with contextlib.suppress(CapsuleError, TeardownError):
                        await self.destroy(c.id)
            raise
        return made

    async def _clone_one(
        self,
        template: tpl.Template,
        default_user: str | None,
        env_vars: dict[str, str] | None,
        hook: StepHook,
        capsule_id: str | None,
        *,
        service: dict[str, object],
    ) -> Capsule:
        record = self._clone_record(template, capsule_id or cap.new_capsule_id(), default_user,
                                    env_vars, service)  # fmt: skip
        with self._timed("capsule cloned", record.id, record.template_id):
            capsule = self._register(record)
            try:
                await self._clone_held(capsule, template, hook)
            except BaseException:
                self._forget(capsule)
                raise
            finally:
                capsule.lock.release()
            return capsule

    async def _clone_held(self, capsule: Capsule, template: tpl.Template, hook: StepHook) -> None:
        meta = template.meta
        await self._create_held(
            capsule,
            base=template.dir.disk,
            base_format="qcow2",
            restore_from=template.dir.state,
            ignore_shared=meta.ram == "file",
            hook=hook,
        )

    def _clone_record(
        self,
        template: tpl.Template,
        cid: str,
        default_user: str | None,
        env_vars: dict[str, str] | None,
        service: dict[str, object],
    ) -> CapsuleRecord:
        """A STARTING record for a clone of `template` (`service`: the record's service fields,
        team, idle timeout, egress, ...)."""
        meta = template.meta
        cdir = self._capsule_dir(cid)
        return CapsuleRecord(
            id=cid, template_id=meta.template_id, state=S.STARTING,
            machine=MachineRecord(kernel=meta.kernel, initrd=meta.initrd, cmdline=meta.cmdline,
                                  vcpus=meta.vcpus, memory_mib=meta.memory_mib,
                                  image_version=meta.image_version),
            ram="template" if meta.ram == "file" else "anonymous",
            ram_file=template.dir.mem if meta.ram == "file" else None,
            template_dir=template.dir.root,
            dir=cdir, disk=cdir / "disk.qcow2",
            default_user=default_user or meta.default_user,
            env_vars={**meta.default_env, **(env_vars or {})},
            access_token=meta.access_token, pending_token=new_access_token(),
        ).model_copy(update=service)  # fmt: skip

    async def _create(
        self,
        record: CapsuleRecord,
        *,
        base: Path,
        base_format: DiskFormat,
        restore_from: Path | None,
        ignore_shared: bool,
        egress: bool,
        hook: StepHook,
    ) -> Capsule:
        """Register `record` (egress set) and create it. :raise CapsuleExists:"""
        capsule = self._register(record.model_copy(update={"egress": egress}))
        try:
            await self._create_held(
                capsule, base=base, base_format=base_format, restore_from=restore_from,
                ignore_shared=ignore_shared, hook=hook,
            )  # fmt: skip
        except BaseException:
            self._forget(capsule)
            raise
        finally:
            capsule.lock.release()
        return capsule

    async def _create_held(
        self,
        capsule: Capsule,
        *,
        base: Path,
        base_format: DiskFormat,
        restore_from: Path | None,
        ignore_shared: bool,
        hook: StepHook,
    ) -> None:
        """Create the STARTING `capsule.record` (`lifecycle.create`); it is RUNNING after. On a
        failure or cancellation nothing of it is left (the caller forgets the entry)."""
        record = capsule.record
        try:
            # Cold boots (base templates, template builds) take minutes: never queued behind.
            async with self._restores if restore_from is not None else contextlib.nullcontext():
                run, files = await lifecycle.create(
                    self.host, record, base=base, base_format=base_format,
                    restore_from=restore_from, ignore_shared=ignore_shared,
                    init=self._init_for(record), egress=record.egress, hook=hook,
                )  # fmt: skip
        finally:
            self.networks.refill()  # now that this start-up no longer needs the CPUs
        capsule.files = files
        try:
            await self._set_running(capsule, run, **_token_set(record))
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(TeardownError):
                await self._teardown(capsule)
            raise

    # ── pause / resume ──────────────────────────────────────────────────────────────────

    async def pause(
        self, capsule_id: str, *, only_if_idle: bool = False, hook: StepHook = no_hook
    ) -> bool:
        """Snapshot a RUNNING capsule to its directory, then stop its VMM and free its slot
        (its network is removed in the background). Steps: `prepare` (sampler stopped,
        proxied requests drained, envd quiesced, the migration set up), `save` (snapshot
        written, VMM gone, record PAUSED).

        With `only_if_idle` (the reaper) nothing happens unless its idle time is still over its
        timeout once the lock is held; returns whether it paused.
        :raise CapsuleNotFound: :raise InvalidState: :raise MigrationFailed: (the guest then
        runs on)
        """
        async with self._locked(capsule_id) as capsule:
            self._require_run(capsule, S.RUNNING)
            if only_if_idle and not capsule.is_idle_expired():
                return False
            with self._timed("capsule paused", capsule_id, capsule.record.template_id):
                await self._pause_held(capsule, hook)
        return True

    async def _pause_held(self, capsule: Capsule, hook: StepHook = no_hook) -> None:
        run = self._require_run(capsule, S.RUNNING)
        snapshot = capsule.record.pause_snapshot
        try:
            await self._quiesce(capsule)
            self._stop_watch(capsule)
            # The record names the snapshot before it exists: after a crash, a PAUSING record
            # whose snapshot exists is a pause that completed (see `recovery`). It is written
            # while envd prepares (a crash meanwhile finds RUNNING or PAUSING, both with the VM
            # running and no snapshot: re-adopted either way); the save waits for it.
            await lifecycle.prepare_snapshot(
                self.host, run, ignore_shared=False,
                alongside=functools.partial(self._move, capsule, S.PAUSING, snapshot=snapshot),
            )  # fmt: skip
            await hook("prepare")
            await lifecycle.save(self.host, run, snapshot, ignore_shared=False)
        except BaseException:
            snapshot.unlink(missing_ok=True)
            await lifecycle.guest_runs_on(run)
            await self._set_running(capsule, run, snapshot=None)
            raise
        capsule.run = None
        try:
            # The VMM goes first: the record never says PAUSED while it may live.
            await lifecycle.end_run(self.host, run)
        finally:
            await self._run_ended(capsule)
            # A paused capsule's RAM is all in its snapshot: it resumes into anonymous RAM.
            await self._move(capsule, S.PAUSED, snapshot=snapshot, slot=None, host_address=None,
                             pid=None, ram="anonymous", ram_file=None)  # fmt: skip
        await hook("save")

    async def resume(
        self,
        capsule_id: str,
        *,
        default_user: str | None = None,
        env_vars: dict[str, str] | None = None,
        idle_timeout_s: int | None = None,
        hook: StepHook = no_hook,
    ) -> None:
        """Restore a PAUSED capsule into a fresh slot; return when envd answered `/init`
        (which carries `default_user` / `env_vars` when given, and they are kept, as is
        `idle_timeout_s` when given).

        :raise CapsuleNotFound: :raise InvalidState: :raise GuestUnreachable: (the capsule
        stays PAUSED)
        """
        async with self._locked(capsule_id) as capsule:
            with self._timed("capsule resumed", capsule_id, capsule.record.template_id):
                await self._resume_held(
                    capsule, default_user=default_user, env_vars=env_vars,
                    idle_timeout_s=idle_timeout_s, hook=hook,
                )  # fmt: skip

    async def _resume_held(
        self,
        capsule: Capsule,
        *,
        default_user: str | None = None,
        env_vars: dict[str, str] | None = None,
        idle_timeout_s: int | None = None,
        hook: StepHook = no_hook,
    ) -> None:
        record = capsule.record
        snapshot = record.snapshot
        if record.state != S.PAUSED or snapshot is None:
            raise InvalidState(capsule.id, record.state, frozenset({S.PAUSED}))
        update: dict[str, object] = {"pending_token": new_access_token()}
        if default_user or env_vars:
            update["default_user"] = default_user or record.default_user
            update["env_vars"] = {**record.env_vars, **(env_vars or {})}
        if idle_timeout_s is not None:
            update["idle_timeout_s"] = idle_timeout_s
        # A new envd token, recorded (with the new settings) before the /init that sets it.
        await self._move(capsule, S.RESUMING, **update)
        record = capsule.record
        try:
            run = await self._restore_run(record, snapshot, hook, self._record_vm(capsule))
        except BaseException:
            # The VM is gone; the snapshot's envd still holds the old token.
            await self._move(capsule, S.PAUSED, pending_token=None, slot=None,
                             host_address=None, pid=None)  # fmt: skip
            raise
        await self._set_running(capsule, run, snapshot=None, **_token_set(record))
        snapshot.unlink(missing_ok=True)

    async def _restore_run(
        self,
        record: CapsuleRecord,
        snapshot: Path,
        hook: StepHook,
        on_launch: lifecycle.RecordVm,
    ) -> Run:
        try:
            return await lifecycle.start_guest(
                self.host, record, restore_from=snapshot, ignore_shared=False,
                init=self._init_for(record), egress=record.egress, hook=hook,
                on_launch=on_launch,
            )  # fmt: skip
        finally:
            self.networks.refill()  # now that this start-up no longer needs the CPUs

    # ── templates ───────────────────────────────────────────────────────────────────────

    async def snapshot_template(
        self, capsule_id: str, template_id: str, *, source: str | None = None
    ) -> tpl.Template:
        """Turn a RUNNING capsule into the snapshot template `template_id` (replacing an older
        one). The capsule is consumed: its VM stops, its files move into the template and it
        is forgotten.

        RAM: a capsule booted with `ram_shared` hands over its RAM file (tiny state file,
        x-ignore-shared); any other capsule's RAM goes into the state file. Disk: an overlay
        directly on the raw image moves as is; a deeper chain is flattened onto the raw image.
        """
        async with self._template_lock(template_id), self._locked(capsule_id) as capsule:
            try:
                return await self._snapshot_held(capsule, template_id, source=source)
            finally:
                if capsule.state == S.STOPPED:
                    self._forget(capsule)

    async def make_template(
        self,
        capsule_id: str,
        template_id: str,
        *,
        consume: bool,
        kind: Literal["snapshot", "base"] = "snapshot",
    ) -> tuple[tpl.Template, Capsule | None]:
        """Snapshot a RUNNING or PAUSED capsule (resumed first) into `template_id`, under one
        hold of its lock. The snapshot consumes the capsule; unless `consume`, it comes back
        PAUSED under the same id as a clone of the new template (Wrenn leaves it paused),
        keeping its record's service settings. If that fails the capsule is lost (logged) and
        None is returned with the template.

        A `base` template (`_base_template_held`) takes the disk only: the capsule is paused
        (if running) and stays so, or is destroyed with `consume`.

        :raise CapsuleNotFound: :raise InvalidState:
        """
        async with (
            self._template_lock(template_id),
            self._locked(capsule_id) as capsule,
            self._unanswered(template_id),
        ):
            if capsule.state not in (S.RUNNING, S.PAUSED):
                raise InvalidState(capsule_id, capsule.state, frozenset({S.RUNNING, S.PAUSED}))
            if kind == "base":
                template = await self._base_template_held(capsule, template_id, source=capsule_id)
                if not consume:
                    return template, capsule
                with self._timed("capsule destroyed", capsule_id, capsule.record.template_id):
                    await self._move(capsule, S.STOPPING)
                    await self._discard(capsule)
                return template, None
            before = capsule.record
            if capsule.state == S.PAUSED:
                await self._resume_held(capsule)
            try:
                template = await self._snapshot_held(capsule, template_id, source=capsule_id)
            except BaseException:
                if capsule.record.state == S.STOPPED:  # consumed, then publishing failed
                    self._forget(capsule)
                raise
            if consume:
                self._forget(capsule)
                return template, None
            service = {name: getattr(before, name) for name in SERVICE_FIELDS}
            capsule.record = self._clone_record(template, capsule_id, before.default_user,
                                                dict(before.env_vars), service)  # fmt: skip
            self._release_version(before.template_dir)  # it is a clone of the new one now
            try:
                await self._clone_held(capsule, template, no_hook)
                await self._pause_held(capsule)
            except BaseException as err:
                with anyio.CancelScope(shield=True), contextlib.suppress(TeardownError):
                    await self._teardown(capsule)
                self._forget(capsule)
                if not isinstance(err, Exception):
                    raise
                log.error("capsule lost after its template was made: %s", err,
                          extra={"capsule_id": capsule_id})  # fmt: skip
                return template, None
            return template, capsule

    async def _snapshot_held(
        self, capsule: Capsule, template_id: str, *, source: str | None
    ) -> tpl.Template:
        """`snapshot_template` with the locks held; the capsule is left STOPPED (the caller
        forgets it or makes it again)."""
        run = self._require_run(capsule, S.RUNNING)
        capsule_id = capsule.id
        with self._timed("template snapshotted", capsule_id, template_id):
            shared = capsule.record.ram == "shared"
            staging: tpl.TemplateDir | None = None
            try:
                await self._quiesce(capsule)
                await self._move(capsule, S.SNAPSHOTTING)
                self._stop_watch(capsule)
                staging = tpl.make_staging(self.settings.templates_dir, template_id)
                await self._move(capsule, S.SNAPSHOTTING, staging=staging.root)
                await lifecycle.prepare_snapshot(self.host, run, ignore_shared=shared,
                                                 template=True)  # fmt: skip
                result = await lifecycle.save(self.host, run, staging.state, ignore_shared=shared)
            except BaseException:
                if staging is not None:
                    with anyio.CancelScope(shield=True):
                        await _remove_tree(staging.root)
                await lifecycle.guest_runs_on(run)
                await self._set_running(capsule, run, staging=None)
                raise
            try:
                capsule.run = None
                await lifecycle.end_run(self.host, run)
                await lifecycle.freeze_into_template(capsule.record, staging)
                meta = lifecycle.template_meta(
                    capsule.record, template_id, source=source or capsule_id,
                    ram="file" if shared else "state", state_bytes=result.state_bytes,
                    accel=self.accel.accel,
                )  # fmt: skip
                template = await tpl.publish(staging, self.settings.templates_dir, meta)
                await tpl.prune(self.settings.templates_dir, template_id, self._versions_in_use())
            finally:
                with anyio.CancelScope(shield=True):
                    await _remove_tree(staging.root)
                    await self._teardown(capsule)
        return template

    async def build_template(
        self,
        image: GuestImage,
        template_id: str = "minimal",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
    ) -> tpl.Template:
        """Boot the image once, wait for envd, snapshot it as `template_id` (RAM in a file)."""
        started = time.monotonic()
        capsule = await self.boot(
            image, template_id=template_id, ram_shared=True, vcpus=vcpus, memory_mib=memory_mib
        )
        try:
            template = await self.snapshot_template(
                capsule.id, template_id, source=f"image:{image.version}"
            )
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(CapsuleError, TeardownError):
                await self.destroy(capsule.id)
            raise
        log.info(
            "template built", extra={"template_id": template_id, "duration_ms": _ms_since(started)}
        )
        return template

    async def ensure_template(
        self,
        image: GuestImage,
        template_id: str = "minimal",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
    ) -> tpl.Template:
        """The template if it matches this image, accelerator and machine size (the settings'
        defaults unless given); else build it."""
        vcpus = vcpus or self.settings.default_vcpus
        memory_mib = memory_mib or self.settings.default_memory_mib
        async with self._template_lock(f"ensure {template_id}"):
            try:
                t = tpl.load_template(self.settings.templates_dir, template_id)
                if (
                    t.meta.kind == "snapshot"
                    and t.meta.image_version == image.version
                    and t.meta.accel == self.accel.accel
                    and t.meta.memory_mib == memory_mib
                    and t.meta.vcpus == vcpus
                ):
                    return t
            except tpl.TemplateNotFound:
                pass
            return await self.build_template(image, template_id, vcpus=vcpus, memory_mib=memory_mib)

    # ── base templates: a disk only; capsules boot it cold at the size they ask for ──────

    async def ensure_image_template(self, image: GuestImage, template_id: str) -> tpl.Template:
        """The base template `template_id` whose disk is the image itself (an empty overlay
        on its rootfs: no VM needed), made or remade when the image changed."""
        async with self._template_lock(template_id):
            try:
                t = tpl.load_template(self.settings.templates_dir, template_id)
                if t.meta.kind == "base" and t.meta.image_version == image.version:
                    return t
            except tpl.TemplateNotFound:
                pass
            staging = tpl.make_staging(self.settings.templates_dir, template_id)
            try:
                await cow.create_overlay(image.rootfs, "raw", staging.disk)
                meta = tpl.TemplateMeta(
                    template_id=template_id, created_at=datetime.now(UTC),
                    source=f"image:{image.version}", image_version=image.version,
                    accel=self.accel.accel, kernel=image.kernel, initrd=image.initrd, cmdline="",
                    vcpus=self.settings.default_vcpus,
                    memory_mib=self.settings.default_memory_mib, ram="state", state_bytes=0,
                    kind="base",
                )  # fmt: skip
                template = await tpl.publish(staging, self.settings.templates_dir, meta)
                await tpl.prune(self.settings.templates_dir, template_id, self._versions_in_use())
            finally:
                with anyio.CancelScope(shield=True):
                    await _remove_tree(staging.root)
        log.info("base template made", extra={"template_id": template_id})
        return template

    async def boot_template(
        self,
        template_id: str,
        *,
        capsule_id: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        egress: bool = False,
        egress_allow: list[str] | None = None,
        default_user: str | None = None,
        env_vars: dict[str, str] | None = None,
        team_id: str = "",
        idle_timeout_s: int = 0,
        default_workdir: str | None = None,
        hook: StepHook = no_hook,
    ) -> Capsule:
        """Cold-boot a capsule from the base template `template_id` with `vcpus` and
        `memory_mib` (else the template's defaults); return when envd answered `/init`.

        :raise TemplateNotFound: :raise CapsuleError: (not a base template)
        :raise GuestUnreachable: :raise VmError:
        """
        template = tpl.load_template(self.settings.templates_dir, template_id)
        meta = template.meta
        if meta.kind != "base":
            raise CapsuleError(f"template {template_id} is a snapshot template, not a base one")
        cid = capsule_id or cap.new_capsule_id()
        cdir = self._capsule_dir(cid)
        cmdline = kernel_cmdline(f"{GUEST_IP}/{GUEST_PREFIX}", TAP_IP, cid, meta.template_id)
        record = CapsuleRecord(
            id=cid, template_id=meta.template_id, state=S.STARTING,
            machine=MachineRecord(kernel=meta.kernel, initrd=meta.initrd, cmdline=cmdline,
                                  vcpus=vcpus or meta.vcpus,
                                  memory_mib=memory_mib or meta.memory_mib,
                                  image_version=meta.image_version),
            ram="anonymous", template_dir=template.dir.root,
            dir=cdir, disk=cdir / "disk.qcow2",
            default_user=default_user or meta.default_user,
            env_vars={**meta.default_env, **(env_vars or {})}, pending_token=new_access_token(),
            team_id=team_id, idle_timeout_s=idle_timeout_s, egress_allow=list(egress_allow or []),
            template_kind="base", default_workdir=default_workdir or None,
        )  # fmt: skip
        with self._timed("capsule booted", cid, meta.template_id):
            return await self._create(
                record,
                base=template.dir.disk,
                base_format="qcow2",
                restore_from=None,
                ignore_shared=False,
                egress=egress,
                hook=hook,
            )

    async def _base_template_held(
        self, capsule: Capsule, template_id: str, *, source: str | None
    ) -> tpl.Template:
        """The base template `template_id` (replacing an older one) from a RUNNING or PAUSED
        capsule, lock held: a running one is paused first (envd syncs its disk before the
        snapshot), then its disk is flattened onto the raw image into the template, without
        memory. The capsule stays PAUSED, untouched."""
        if capsule.state == S.RUNNING:
            await self._pause_held(capsule)
        record = capsule.record
        if record.state != S.PAUSED:
            raise InvalidState(capsule.id, record.state, frozenset({S.RUNNING, S.PAUSED}))
        with self._timed("base template made", capsule.id, template_id):
            staging = tpl.make_staging(self.settings.templates_dir, template_id)
            try:
                chain = await cow.backing_chain(record.disk)
                await cow.flatten(record.disk, staging.disk, backing=chain[-1])
                meta = lifecycle.template_meta(
                    record, template_id, source=source or capsule.id, ram="state",
                    state_bytes=0, accel=self.accel.accel, kind="base",
                )  # fmt: skip
                template = await tpl.publish(staging, self.settings.templates_dir, meta)
                await tpl.prune(self.settings.templates_dir, template_id, self._versions_in_use())
            finally:
                with anyio.CancelScope(shield=True):
                    await _remove_tree(staging.root)
        return template

    async def set_fields(self, capsule_id: str, **fields: object) -> Capsule:
        """Change service fields of the capsule's record (`idle_timeout_s`, ...) whatever its
        state, in one atomic write (an ERROR capsule has no record on disk: in memory only).

        :raise CapsuleNotFound:
        """
        async with self._locked(capsule_id) as capsule:
            if capsule.state == S.ERROR:
                capsule.record = capsule.record.model_copy(update=fields)
            else:
                await self._move(capsule, capsule.state, **fields)
        return capsule

    # ── recovery ────────────────────────────────────────────────────────────────────────

    async def adopt(self, capsule: Capsule) -> None:
        """Register a capsule an earlier agent run left (`hostagent/recovery.py` rebuilds its
        run and files); a running one gets its exit watcher and sampler."""
        self._capsules[capsule.id] = capsule
        if capsule.run is not None:
            await self._set_running(capsule, capsule.run)

    def add_failed(self, record: CapsuleRecord, reason: str) -> Capsule:
        """Register a capsule recovery could not take back (its VMs and files are gone): it is
        listed in ERROR until destroyed."""
        capsule = Capsule(record.model_copy(update={"state": S.ERROR, "error": reason}))
        self._capsules[capsule.id] = capsule
        return capsule

    # ── destroy ─────────────────────────────────────────────────────────────────────────

    async def destroy(self, capsule_id: str) -> None:
        """Kill the VMM, remove the slot network, disk, snapshot and record, and forget the
        capsule (one in ERROR has nothing left: it is only forgotten). A capsule another
        destroy removed while this one waited for its lock is not an error.

        :raise CapsuleNotFound: :raise TeardownError: (every step was still attempted, and the
        capsule is forgotten all the same)
        """
        capsule = self.get(capsule_id)
        async with capsule.lock:
            if self._capsules.get(capsule_id) is not capsule or capsule.state == S.STOPPED:
                return
            if capsule.state == S.ERROR:
                self._forget(capsule)
                log.info("capsule destroyed", extra={"capsule_id": capsule_id})
                return
            with self._timed("capsule destroyed", capsule_id, capsule.record.template_id):
                await self._move(capsule, S.STOPPING)
                self._stop_watch(capsule)
                await self._discard(capsule)

    async def destroy_all(self) -> None:
        """Destroy every capsule (tests, doctor); failures are logged, not raised."""
        for c in self.capsules():
            try:
                await self.destroy(c.id)
            except (CapsuleError, TeardownError) as err:
                log.error("destroy %s: %s", c.id, err)

    async def _discard(self, capsule: Capsule) -> None:
        """`_teardown`, then forget the capsule. Lock held."""
        try:
            await self._teardown(capsule)
        finally:
            self._forget(capsule)

    async def _teardown(self, capsule: Capsule, final: CapsuleState = S.STOPPED) -> None:
        """Unwind the run (if any) and the files; the record (in memory: its file is gone)
        says `final`. Lock held. :raise TeardownError: (every step was still attempted)"""
        errors: list[BaseException] = []
        run, capsule.run = capsule.run, None
        try:
            if run is not None:
                await lifecycle.end_run(self.host, run)
        except TeardownError as err:
            errors.extend(err.errors)
        finally:
            if run is not None:
                await self._run_ended(capsule)
        files, capsule.files = capsule.files, UndoStack(f"capsule {capsule.id} files")
        try:
            await lifecycle.unwind(files, self.host.timeouts.teardown)
        except TeardownError as err:
            errors.extend(err.errors)
        capsule.record = capsule.record.model_copy(update={"state": final})
        if errors:
            raise TeardownError(f"capsule {capsule.id}", errors)

    async def close_runs(self) -> None:
        """Agent shutdown: stop the samplers, cut the calls in flight and close the envd
        clients of the capsules left running (their VMs run on; the next start re-adopts)."""
        for capsule in self.capsules():
            capsule.stop_sampler()
            capsule.interrupt_calls()
            if capsule.run is not None:
                with anyio.CancelScope(shield=True):
                    await capsule.run.envd.aclose()

    # ── runs: watcher, sampler, proxied traffic ─────────────────────────────────────────

    async def _set_running(self, capsule: Capsule, run: Run, **changes: object) -> None:
        """The capsule runs `run` (a create, a resume, a pause or template that did not
        happen, a re-adoption): recorded RUNNING, proxied traffic let in, the exit watcher and
        the sampler started."""
        capsule.run = run
        await self._move(
            capsule,
            S.RUNNING,
            slot=run.network.slot,
            host_address=run.network.host_address,
            pid=run.pid,
            **changes,
        )
        capsule.tracker.reset()
        capsule.touch()
        self._stop_watch(capsule)
        scope = anyio.CancelScope()
        capsule.watch = scope
        self._tg.start_soon(self._watch, capsule, run, scope)
        self._start_sampler(capsule, run)

    async def _quiesce(self, capsule: Capsule) -> None:
        """The first steps of the seed's pause order: stop the sampler, drain proxied requests
        (up to `drain_timeout_s`; new ones get 503 until `_set_running` or the run's end)."""
        capsule.stop_sampler()
        if not await capsule.tracker.drain(self.settings.drain_timeout_s):
            active = capsule.tracker.statistics().active
            log.info("pausing with %d proxied requests in flight", active,
                     extra={"capsule_id": capsule.id})  # fmt: skip

    async def _run_ended(self, capsule: Capsule) -> None:
        """After a run's VMM is gone: stop sampling, cut the calls in flight (their sockets
        are dead), let the proxy drop its pools (`on_run_end`)."""
        capsule.stop_sampler()
        capsule.interrupt_calls()
        if self.on_run_end is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self.on_run_end(capsule.id)
                except Exception as err:
                    log.warning("run end hook failed: %r", err, extra={"capsule_id": capsule.id})

    def _start_sampler(self, capsule: Capsule, run: Run) -> None:
        capsule.stop_sampler()
        stats = functools.partial(self.hypervisor.stats, run.vm)
        record = capsule.record
        capsule.sampler = self._sampler.add(
            capsule.id, capsule.metrics, stats, record.disk, record.machine.vcpus
        )

    def _stop_watch(self, capsule: Capsule) -> None:
        if capsule.watch is not None:
            capsule.watch.cancel()
            capsule.watch = None

    async def _watch(self, capsule: Capsule, run: Run, scope: anyio.CancelScope) -> None:
        with scope:
            code = await self.hypervisor.supervise(run.vm)
        if scope.cancel_called:
            return
        async with capsule.lock:
            if capsule.run is not run or self._capsules.get(capsule.id) is not capsule:
                return
            reason = f"the VM exited unexpectedly (exit code {code})"
            log.error("capsule failed: %s; removing its resources", reason,
                      extra={"capsule_id": capsule.id, "pid": run.pid})  # fmt: skip
            await self._move(capsule, S.STOPPING)
            self._stop_watch(capsule)
            try:
                await self._teardown(capsule, final=S.ERROR)
            except TeardownError as err:
                log.error("%s", err)
            capsule.record = capsule.record.model_copy(update={"error": reason})
        if self.on_vm_exit is not None:
            self.on_vm_exit(capsule.id, code)

    # ── helpers ─────────────────────────────────────────────────────────────────────────

    async def _move(self, capsule: Capsule, state: CapsuleState, **changes: object) -> None:
        """Change the capsule's record in memory and on disk (durably, in a worker thread,
        shielded: the record on disk never lags a step that was taken)."""
        record = capsule.record
        if state != record.state:
            record = record.moved_to(state)
            log.debug(
                "capsule %s %s -> %s",
                capsule.id,
                capsule.record.state,
                state,
                extra={"capsule_id": capsule.id},
            )
        capsule.record = record.model_copy(update=changes)
        await lifecycle.write_record(self.settings.state_dir, capsule.record)

    def _record_vm(self, capsule: Capsule) -> lifecycle.RecordVm:
        """`on_launch` of a capsule's new run: its pid and slot go into the record at once."""

        async def record(network: SlotNetwork, pid: int) -> None:
            await self._move(capsule, capsule.state, slot=network.slot,
                             host_address=network.host_address, pid=pid)  # fmt: skip

        return record

    def _require_run(self, capsule: Capsule, state: CapsuleState) -> Run:
        if capsule.state != state or capsule.run is None:
            raise InvalidState(capsule.id, capsule.state, frozenset({state}))
        return capsule.run

    def _init_for(self, record: CapsuleRecord) -> Callable[[], InitRequest]:
        """The `/init` body, built when it is sent (its timestamp must be *now*)."""
        return lambda: init_request(
            capsule_id=record.id,
            template_id=record.template_id,
            default_user=record.default_user,
            env_vars=record.env_vars,
            access_token=record.pending_token,
            default_workdir=record.default_workdir,
        )

    def _capsule_dir(self, capsule_id: str) -> Path:
        return cap.records_dir(self.settings.state_dir) / capsule_id

    def _versions_in_use(self) -> set[Path]:
        """Template versions some capsule of this agent (live or only on disk) is based on."""
        records = [c.record for c in self._capsules.values()]
        records += cap.read_records(self.settings.state_dir)
        return {r.template_dir for r in records if r.template_dir is not None}

    @contextlib.asynccontextmanager
    async def _unanswered(self, template_id: str) -> AsyncIterator[None]:
        """A new template made for a caller (template lock held): if the block fails or is
        cancelled, the caller gets no template, so none is left (its versions go unless a
        capsule uses one); if the agent stops meanwhile, its next start removes it
        (`templates.mark_unanswered`)."""
        root = self.settings.templates_dir
        if not await anyio.to_thread.run_sync(tpl.mark_unanswered, root, template_id):
            yield
            return
        try:
            yield
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tpl.forget_unanswered, root, template_id)
                await tpl.prune(root, template_id, self._versions_in_use())
            raise
        await anyio.to_thread.run_sync(tpl.answered, root, template_id)

    def _template_lock(self, template_id: str) -> anyio.Lock:
        return self._template_locks.setdefault(template_id, anyio.Lock())

    @contextlib.contextmanager
    def _timed(self, what: str, capsule_id: str, template_id: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        log.info(
            what,
            extra={
                "capsule_id": capsule_id,
                "template_id": template_id,
                "duration_ms": _ms_since(started),
            },
        )


def _token_set(record: CapsuleRecord) -> dict[str, object]:
    """The record's changes once envd answered the `/init` that set `record.pending_token`."""
    if record.pending_token is None:
        return {}
    return {"access_token": record.pending_token, "pending_token": None}


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


async def _remove_tree(path: Path) -> None:
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
