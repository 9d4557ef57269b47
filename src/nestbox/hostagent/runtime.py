"""`VmRuntime`: the VM runtime's facade — boot, clone, pause, resume, snapshot, destroy.

It owns the live capsules (a registry keyed by id, one lock per capsule so two verbs on one
capsule are serialised while different capsules never wait on each other), one exit watcher
per running VM (in the runtime's task group: a VMM that dies is noticed and its capsule's
resources removed), and the capsule records on disk. The steps themselves are in `lifecycle`.
Each verb logs one INFO line with its duration (`duration_ms`).

Open it with `async with VmRuntime.open(settings, system) as rt:`. Leaving the block stops the
watchers but not the VMs: QEMU runs detached, so an agent restart does not kill capsules. It
does wait for slot networks still being torn down, and removes the warm ones (`networks`).

About 600 lines, one banner per verb group; what is not registry or state bookkeeping already
lives in `lifecycle` (steps), `capsule` (state machine, records) and `storage`/`vmm`/`network`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
from nestbox.hostagent.image.cmdline import kernel_cmdline
from nestbox.hostagent.lifecycle import Host, Run, StepHook, Timeouts, no_hook
from nestbox.hostagent.network import (
    GUEST_IP,
    GUEST_PREFIX,
    TAP_IP,
    SlotNetworks,
    SlotPool,
    ensure_blackhole,
)
from nestbox.hostagent.storage import templates as tpl
from nestbox.hostagent.undo import TeardownError
from nestbox.hostagent.vmm import confine
from nestbox.hostagent.vmm.accel import choose_accel
from nestbox.hostagent.vmm.qemu import QemuHypervisor

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
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
        self.on_vm_exit: Callable[[str, int | None], None] | None = None
        """Called (capsule id, exit code) after a VM that exited on its own was cleaned up."""
        self._template_locks: dict[str, anyio.Lock] = {}
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
        hook: StepHook = no_hook,
    ) -> list[Capsule]:
        """Create `count` capsules from a snapshot template, concurrently (`capsule_id`
        names the capsule when `count` is 1).

        If any fails, the others are destroyed too and the failures raised (an ExceptionGroup
        when `count` > 1).

        :raise TemplateNotFound: :raise GuestUnreachable: :raise VmError:
        """
        template = tpl.load_template(self.settings.templates_dir, template_id)
        if template.meta.accel != self.hypervisor.accel:
            raise CapsuleError(
                f"template {template_id} was made under {template.meta.accel}, "
                f"this host runs {self.hypervisor.accel}"
            )
        if count == 1:
            return [
                await self._clone_one(template, egress, default_user, env_vars, hook, capsule_id)
            ]
        made: list[Capsule] = []

        async def one() -> None:
            made.append(await self._clone_one(template, egress, default_user, env_vars, hook))

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
        egress: bool,
        default_user: str | None,
        env_vars: dict[str, str] | None,
        hook: StepHook,
        capsule_id: str | None = None,
    ) -> Capsule:
        meta = template.meta
        cid = capsule_id or cap.new_capsule_id()
        cdir = self._capsule_dir(cid)
        record = CapsuleRecord(
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
        )  # fmt: skip
        with self._timed("capsule cloned", cid, meta.template_id):
            return await self._create(
                record,
                base=template.dir.disk,
                base_format="qcow2",
                restore_from=template.dir.state,
                ignore_shared=meta.ram == "file",
                egress=egress,
                hook=hook,
            )

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
        try:
            run, files = await lifecycle.create(
                self.host, record, base=base, base_format=base_format, restore_from=restore_from,
                ignore_shared=ignore_shared, init=self._init_for(record), egress=egress, hook=hook,
            )  # fmt: skip
        finally:
            self.networks.refill()  # now that this start-up no longer needs the CPUs
        capsule = Capsule(record, files)
        capsule.run = run
        self._capsules[record.id] = capsule
        await self._set_running(capsule, run, **_token_set(record))
        return capsule

    # ── pause / resume ──────────────────────────────────────────────────────────────────

    async def pause(self, capsule_id: str, *, hook: StepHook = no_hook) -> None:
        """Snapshot a RUNNING capsule to its directory, then stop its VMM and free its slot
        (its network is removed in the background). Steps: `prepare` (envd quiesced, the
        migration set up), `save` (snapshot written, VMM gone, record PAUSED).

        :raise InvalidState: :raise MigrationFailed: (the guest then runs on)
        """
        capsule = self.get(capsule_id)
        async with capsule.lock:
            run = self._require_run(capsule, S.RUNNING)
            with self._timed("capsule paused", capsule_id, capsule.record.template_id):
                snapshot = capsule.record.pause_snapshot
                # The record names the snapshot before it exists: after a crash, a PAUSING
                # record whose snapshot exists is a pause that completed (see `recovery`).
                await self._move(capsule, S.PAUSING, snapshot=snapshot)
                self._stop_watch(capsule)
                try:
                    await lifecycle.prepare_snapshot(self.host, run, ignore_shared=False)
                    await hook("prepare")
                    await lifecycle.save(self.host, run, snapshot, ignore_shared=False)
                except BaseException:
                    snapshot.unlink(missing_ok=True)
                    await self._set_running(capsule, run, snapshot=None)
                    raise
                capsule.run = None
                try:
                    # The VMM goes first: the record never says PAUSED while it may live.
                    await lifecycle.end_run(self.host, run)
                finally:
                    # A paused capsule's RAM is all in its snapshot: it resumes into anonymous
                    # RAM.
                    await self._move(
                        capsule,
                        S.PAUSED,
                        snapshot=snapshot,
                        slot=None,
                        host_address=None,
                        pid=None,
                        ram="anonymous",
                        ram_file=None,
                    )
                await hook("save")

    async def resume(
        self,
        capsule_id: str,
        *,
        egress: bool = False,
        default_user: str | None = None,
        env_vars: dict[str, str] | None = None,
        hook: StepHook = no_hook,
    ) -> None:
        """Restore a PAUSED capsule into a fresh slot; return when envd answered `/init`
        (which carries `default_user` / `env_vars` when given, and they are kept).

        :raise InvalidState: :raise GuestUnreachable: (the capsule stays PAUSED)
        """
        capsule = self.get(capsule_id)
        async with capsule.lock:
            record = capsule.record
            snapshot = record.snapshot
            if record.state != S.PAUSED or snapshot is None:
                raise InvalidState(capsule_id, record.state, frozenset({S.PAUSED}))
            if default_user or env_vars:
                update: dict[str, object] = {"default_user": default_user or record.default_user}
                update["env_vars"] = {**record.env_vars, **(env_vars or {})}
                record = capsule.record = record.model_copy(update=update)
            with self._timed("capsule resumed", capsule_id, record.template_id):
                # A new envd token, recorded before the /init that sets it is sent.
                await self._move(capsule, S.RESUMING, pending_token=new_access_token())
                record = capsule.record
                try:
                    run = await self._restore_run(
                        record, snapshot, egress, hook, self._record_vm(capsule)
                    )
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
        egress: bool,
        hook: StepHook,
        on_launch: lifecycle.RecordVm,
    ) -> Run:
        try:
            return await lifecycle.start_guest(
                self.host, record, restore_from=snapshot, ignore_shared=False,
                init=self._init_for(record), egress=egress, hook=hook, on_launch=on_launch,
            )  # fmt: skip
        finally:
            self.networks.refill()  # now that this start-up no longer needs the CPUs

    # ── templates ───────────────────────────────────────────────────────────────────────

    async def snapshot_template(
        self, capsule_id: str, template_id: str, *, source: str | None = None
    ) -> tpl.Template:
        """Turn a RUNNING capsule into the snapshot template `template_id` (replacing an older
        one). The capsule is consumed: its VM stops and its files move into the template.

        RAM: a capsule booted with `ram_shared` hands over its RAM file (tiny state file,
        x-ignore-shared); any other capsule's RAM goes into the state file. Disk: an overlay
        directly on the raw image moves as is; a deeper chain is flattened onto the raw image.
        """
        capsule = self.get(capsule_id)
        async with self._template_lock(template_id), capsule.lock:
            run = self._require_run(capsule, S.RUNNING)
            with self._timed("template snapshotted", capsule_id, template_id):
                await self._move(capsule, S.SNAPSHOTTING)
                self._stop_watch(capsule)
                shared = capsule.record.ram == "shared"
                staging: tpl.TemplateDir | None = None
                try:
                    staging = tpl.make_staging(self.settings.templates_dir, template_id)
                    await self._move(capsule, S.SNAPSHOTTING, staging=staging.root)
                    await lifecycle.prepare_snapshot(self.host, run, ignore_shared=shared)
                    result = await lifecycle.save(
                        self.host, run, staging.state, ignore_shared=shared
                    )
                except BaseException:
                    if staging is not None:
                        with anyio.CancelScope(shield=True):
                            await _remove_tree(staging.root)
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
                    await tpl.prune(
                        self.settings.templates_dir, template_id, self._versions_in_use()
                    )
                finally:
                    with anyio.CancelScope(shield=True):
                        await _remove_tree(staging.root)
                        await self._discard(capsule)
        return template

    async def build_template(self, image: GuestImage, template_id: str = "minimal") -> tpl.Template:
        """Boot the image once, wait for envd, snapshot it as `template_id` (RAM in a file)."""
        started = time.monotonic()
        capsule = await self.boot(image, template_id=template_id, ram_shared=True)
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
        self, image: GuestImage, template_id: str = "minimal"
    ) -> tpl.Template:
        """The template if it matches this image, accelerator and machine size; else build it."""
        async with self._template_lock(f"ensure {template_id}"):
            try:
                t = tpl.load_template(self.settings.templates_dir, template_id)
                if (
                    t.meta.image_version == image.version
                    and t.meta.accel == self.accel.accel
                    and t.meta.memory_mib == self.settings.default_memory_mib
                    and t.meta.vcpus == self.settings.default_vcpus
                ):
                    return t
            except tpl.TemplateNotFound:
                pass
            return await self.build_template(image, template_id)

    async def adopt(self, capsule: Capsule) -> None:
        """Register a capsule an earlier agent run left (`hostagent/recovery.py` rebuilds its
        run and files); a running one gets its exit watcher."""
        self._capsules[capsule.id] = capsule
        if capsule.run is not None:
            await self._set_running(capsule, capsule.run)

    # ── destroy ─────────────────────────────────────────────────────────────────────────

    async def destroy(self, capsule_id: str) -> None:
        """Kill the VMM, remove the slot network, disk, snapshot and record.

        :raise CapsuleNotFound: :raise TeardownError: (every step was still attempted)
        """
        capsule = self.get(capsule_id)
        async with capsule.lock:
            if capsule.state == S.STOPPED:
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
        """Unwind the run (if any) and the files; forget the capsule. Lock held."""
        errors: list[BaseException] = []
        run, capsule.run = capsule.run, None
        try:
            if run is not None:
                await lifecycle.end_run(self.host, run)
        except TeardownError as err:
            errors.extend(err.errors)
        try:
            await lifecycle.unwind(capsule.files, self.host.timeouts.teardown)
        except TeardownError as err:
            errors.extend(err.errors)
        capsule.record = capsule.record.model_copy(update={"state": S.STOPPED})
        self._capsules.pop(capsule.id, None)
        if errors:
            raise TeardownError(f"capsule {capsule.id}", errors)

    # ── exit watching ───────────────────────────────────────────────────────────────────

    async def _set_running(self, capsule: Capsule, run: Run, **changes: object) -> None:
        capsule.run = run
        await self._move(
            capsule,
            S.RUNNING,
            slot=run.network.slot,
            host_address=run.network.host_address,
            pid=run.pid,
            **changes,
        )
        scope = anyio.CancelScope()
        capsule.watch = scope
        self._tg.start_soon(self._watch, capsule, run, scope)

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
            if capsule.run is not run:
                return
            log.warning(
                "capsule VM exited unexpectedly (code %s); removing the capsule",
                code,
                extra={"capsule_id": capsule.id, "pid": run.pid},
            )
            await self._move(capsule, S.STOPPING)
            try:
                await self._discard(capsule)
            except TeardownError as err:
                log.error("%s", err)
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
        )

    def _capsule_dir(self, capsule_id: str) -> Path:
        return cap.records_dir(self.settings.state_dir) / capsule_id

    def _versions_in_use(self) -> set[Path]:
        """Template versions some capsule of this agent (live or only on disk) is based on."""
        records = [c.record for c in self._capsules.values()]
        records += cap.read_records(self.settings.state_dir)
        return {r.template_dir for r in records if r.template_dir is not None}

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
