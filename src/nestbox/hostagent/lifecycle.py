"""One capsule's build-up and tear-down, as ordered steps on undo stacks.

Every step that makes something (a directory, a disk, a slot lease, a VMM process) pushes
its undo on an `UndoStack` (`undo`) right after it succeeds. If a later step fails or the
caller cancels, `unwind` runs the undos in reverse, shielded from the cancellation, under its
own deadline, attempting every one and collecting the failures: what exists is exactly what
the stack says exists. Nothing here keeps state between calls; `runtime.VmRuntime` does.

A `Run` is one VMM process with its slot lease (`network.SlotNetworks`: often a warm one) and
the capsule's one envd client (`envdconn.CapsuleEnvd`, made as soon as the VM is up, closed by
the run's stack). A capsule has a run while it is RUNNING; pausing closes the run (`end_run`:
the VMM is gone when it returns, the slot network goes in the background) and keeps the
capsule's directory (disk + snapshot). The VMM is driven through the `Hypervisor` protocol only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import anyio

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import CapsuleRecord, GuestUnreachable
from nestbox.hostagent.durable import fsync_path, start_writeback
from nestbox.hostagent.envdconn import CapsuleEnvd, envd_url
from nestbox.hostagent.envdconn.errors import EnvdCallError
from nestbox.hostagent.network.egress import egress_allow
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage.templates import TemplateMeta
from nestbox.hostagent.undo import UndoStack, unwind, unwind_after_failure
from nestbox.hostagent.vmm import serial
from nestbox.hostagent.vmm.base import VmSpec

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.network import SlotLease, SlotNetwork, SlotNetworks, SlotPool
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import TemplateDir
    from nestbox.hostagent.system import System
    from nestbox.hostagent.vmm.base import Accel, DiskFormat, Hypervisor, SaveResult, VmHandle
    from nestbox.protocol.envd import InitRequest

log = logging.getLogger(__name__)

StepHook = Callable[[str], Awaitable[None]]
"""Called after each step succeeds, with the step's name. Tests cancel from it to prove that
a cancellation at any step leaves nothing behind."""


async def no_hook(_step: str) -> None:
    return None


EnvdOpener = Callable[["SlotNetwork", "str | None"], CapsuleEnvd]
"""Makes a run's envd client: envd in slot `network`, presenting the token (or None)."""


def open_envd(network: SlotNetwork, access_token: str | None) -> CapsuleEnvd:
    """The envd client of a VM in slot `network`: its envd at the slot's host address."""
    return CapsuleEnvd(envd_url(network.host_address), access_token=access_token)


RecordVm = Callable[["SlotNetwork", int], Awaitable[None]]
"""Called with the slot network and the VMM's pid as soon as the VMM process exists, before
anything waits on it: it writes them into the capsule's record, so that start-up recovery finds
the VM of an operation a crash interrupted."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of the lifecycle's steps, in seconds (set by the runtime's owner)."""

    boot: float = 240.0
    """Cold boot to envd answering. Seconds under TCG, minutes when many boots share 2 cores."""
    restore: float = 60.0
    """Start a VMM and load a snapshot into it."""
    envd_ready: float = 60.0
    """envd answering after a restore."""
    init: float = 15.0
    """envd answering `/init` once it has the request."""
    prepare: float = 3.0
    """`/snapshot/prepare` before a pause (best effort, as in the seed)."""
    template_prepare: float = 60.0
    """`/snapshot/prepare` before a template snapshot: required, not best effort (every clone
    of the template starts from that moment), so it may take its time on a loaded host."""
    save: float = 120.0
    teardown: float = 30.0


CANCEL_SAVE_S = 5.0
"""How long letting the guest run on after a failed save may take."""


@dataclass(frozen=True, slots=True)
class Host:
    """What the steps act on."""

    settings: AgentSettings
    system: System
    hypervisor: Hypervisor
    slots: SlotPool
    networks: SlotNetworks
    timeouts: Timeouts
    open_envd: EnvdOpener = open_envd
    """How a run's envd client is made (tests point it at a fake envd)."""


@dataclass(slots=True)
class Run:
    """A running VMM, the slot lease (network) it sits in, and the capsule's one envd client
    (every call into the guest goes over it). `stack` kills the VMM, closes the client and
    releases the lease."""

    lease: SlotLease
    vm: VmHandle
    envd: CapsuleEnvd
    stack: UndoStack

    @property
    def network(self) -> SlotNetwork:
        return self.lease.network

    @property
    def pid(self) -> int:
        return self.vm.pid


# ── steps ────────────────────────────────────────────────────────────────────────────────


async def open_run(
    host: Host,
    spec_for: Callable[[SlotNetwork], VmSpec],
    *,
    egress: bool,
    restore_from: Path | None,
    ignore_shared: bool,
    hook: StepHook,
    access_token: str | None = None,
    on_launch: RecordVm | None = None,
) -> Run:
    """Slot lease (a warm one when there is one) → VMM process (`on_launch` called with its
    pid) [→ snapshot loaded and running] → the run's envd client (presenting `access_token`, the
    one envd holds)."""
    stack = UndoStack("run")
    try:
        lease = await host.networks.acquire(egress=egress)
        stack.push_async_callback(host.networks.release, lease)
        await hook("slot")
        await hook("network")
        network = lease.network
        launched = None if on_launch is None else functools.partial(on_launch, network)
        vm = await host.hypervisor.launch(spec_for(network), on_launch=launched)
        stack.push_async_callback(host.hypervisor.kill, vm)
        await hook("vmm")
        if restore_from is not None:
            with anyio.fail_after(host.timeouts.restore):
                await host.hypervisor.restore(vm, restore_from, ignore_shared=ignore_shared)
            await hook("restore")
        envd = host.open_envd(network, access_token)
        stack.push_async_callback(envd.aclose)
    except BaseException:
        await unwind_after_failure(stack, host.timeouts.teardown)
        raise
    return Run(lease=lease, vm=vm, envd=envd, stack=stack)


async def end_run(host: Host, run: Run) -> None:
    """Close a run that did its job (pause, destroy, template): the VMM is killed and its
    client closed before this returns; the slot network is removed in the background.

    :raise TeardownError:
    """
    run.lease.background_teardown = True
    await unwind(run.stack, host.timeouts.teardown)


async def wait_guest(
    host: Host,
    run: Run,
    record: CapsuleRecord,
    *,
    ready_within: float,
    init: Callable[[], InitRequest] | None,
    hook: StepHook,
) -> None:
    """envd answers, then `/init`: as one request when there is an `/init` (it is sent as
    soon as envd takes connections, within `ready_within` s; envd then has `timeouts.init` s to
    answer it), else a `/health` poll (within `ready_within` s).

    :raise GuestUnreachable: with the tail of the guest's serial console.
    """
    if init is None:
        ready = run.envd.wait_ready()
    else:
        ready = run.envd.init_when_ready(init, answer_within=host.timeouts.init)
    try:
        with anyio.fail_after(ready_within):
            exited = await _first_of(ready, host.hypervisor.supervise(run.vm))
    except TimeoutError as err:
        raise GuestUnreachable(record.id, "wait_ready", _serial_tail(run)) from err
    except EnvdCallError as err:
        # Fatal, unlike in the seed: a clone that missed /init still has the template's RNG
        # state and identity, which must never leak into a capsule that runs user code.
        raise GuestUnreachable(record.id, "init", repr(err)) from err
    if exited:
        raise GuestUnreachable(record.id, "wait_ready", "the VM exited; " + _serial_tail(run))
    await hook("envd")
    if init is not None:
        await hook("init")


async def start_guest(
    host: Host,
    record: CapsuleRecord,
    *,
    restore_from: Path | None,
    ignore_shared: bool,
    init: Callable[[], InitRequest] | None,
    egress: bool,
    hook: StepHook,
    on_launch: RecordVm | None = None,
) -> Run:
    """Run of `record`'s machine (`open_run`, restoring `restore_from` when given) → envd
    ready → `/init` (`wait_guest`, within `timeouts.boot` for a cold boot, else
    `timeouts.envd_ready`). A failure or cancellation unwinds the run.

    The `/init` is authenticated with `record.access_token` (the token envd holds); the
    client sends the token the `/init` sets from its answer on.
    """
    incoming = restore_from is not None
    # The allow-list reaches the slot network's build-up without a parameter on every layer
    # between (`network/egress.py`).
    with egress_allow(record.egress_allow if egress else ()):
        run = await open_run(
            host,
            lambda network: machine_spec(record, network, incoming=incoming),
            egress=egress,
            restore_from=restore_from,
            ignore_shared=ignore_shared,
            hook=hook,
            access_token=record.access_token,
            on_launch=on_launch,
        )
    ready_within = host.timeouts.envd_ready if incoming else host.timeouts.boot
    try:
        await wait_guest(host, run, record, ready_within=ready_within, init=init, hook=hook)
    except BaseException:
        await unwind_after_failure(run.stack, host.timeouts.teardown)
        raise
    return run


async def create(
    host: Host,
    record: CapsuleRecord,
    *,
    base: Path,
    base_format: DiskFormat,
    restore_from: Path | None,
    ignore_shared: bool,
    init: Callable[[], InitRequest] | None,
    egress: bool,
    hook: StepHook = no_hook,
) -> tuple[Run, UndoStack]:
    """Directory → disk overlay on `base` → record → run (the record gets its pid and slot as
    soon as the VMM exists) → envd ready → `/init`.

    Returns the run and the stack that removes the capsule's files (its owner keeps both).
    A failure or cancellation at any step removes everything made so far.
    """
    files = UndoStack(f"capsule {record.id} files")

    async def record_vm(network: SlotNetwork, pid: int) -> None:
        update = {"slot": network.slot, "host_address": network.host_address, "pid": pid}
        await write_record(host.settings.state_dir, record.model_copy(update=update))

    try:
        await anyio.to_thread.run_sync(lambda: record.dir.mkdir(mode=0o700, parents=True))
        files.push_async_callback(_rmtree, record.dir)
        await hook("dir")
        await cow.create_overlay(base, base_format, record.disk)
        await hook("disk")
        await write_record(host.settings.state_dir, record)
        files.push_async_callback(_remove_record, host.settings.state_dir, record.id)
        await hook("record")
        run = await start_guest(
            host, record, restore_from=restore_from, ignore_shared=ignore_shared, init=init,
            egress=egress, hook=hook, on_launch=record_vm,
        )  # fmt: skip
    except BaseException:
        await unwind_after_failure(files, host.timeouts.teardown)
        raise
    return run, files


async def prepare_snapshot(
    host: Host,
    run: Run,
    *,
    ignore_shared: bool,
    alongside: Callable[[], Awaitable[None]] | None = None,
    template: bool = False,
) -> None:
    """`/snapshot/prepare` with a short deadline (best effort, as in the seed: a guest that does
    not answer is snapshotted anyway; for a `template`, a longer one and required, since every
    clone would start from a guest caught mid-prepare) while the VMM sets its migration up
    (`Hypervisor.prepare_save`; the guest runs on until `save`) and the caller's `alongside`
    runs (the record write that must be on disk before the save: it need not wait for the
    guest's answer, nor the guest for it). Returns once all three are done.

    :raise VmError: the VMM's set-up failed (the guest runs on). :raise Exception: what
        `alongside` raised. :raise EnvdCallError: a template's prepare failed or timed out.
    """
    failures: list[Exception] = []

    async def guarded(work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except Exception as err:
            failures.append(err)

    async with anyio.create_task_group() as tg:
        if alongside is not None:
            tg.start_soon(guarded, alongside)
        tg.start_soon(
            guarded, functools.partial(host.hypervisor.prepare_save, run.vm,
                                       ignore_shared=ignore_shared)
        )  # fmt: skip
        await guarded(functools.partial(_prepare_guest, host, run, template=template))
    if failures:
        raise failures[0]


async def _prepare_guest(host: Host, run: Run, *, template: bool = False) -> None:
    """`/snapshot/prepare` on the unary pool's keep-alive connection (no new TCP handshake
    into a guest that may be slow under TCG). envd does the seed's rule itself: it turns
    keep-alive off, closes every idle connection (ours in both pools included) before it
    answers, and answers with `Connection: close`, so no idle connection of ours lives into the
    snapshot. Streams in flight (exec, PTY) keep their connections; the caller cuts them once
    the VM is gone. A run that goes on (the save failed) first drops what envd closed
    (`guest_runs_on`)."""
    deadline = host.timeouts.template_prepare if template else host.timeouts.prepare
    try:
        with anyio.fail_after(deadline):
            await run.envd.prepare_snapshot()
    except (TimeoutError, EnvdCallError) as err:
        if template:
            msg = f"snapshot/prepare failed before a template snapshot: {err!r}"
            raise EnvdCallError(msg) from err
        # The guest is snapshotted anyway; nothing we hold may outlive the snapshot.
        log.warning("snapshot/prepare failed, snapshotting anyway: %r", err)
        with anyio.CancelScope(shield=True), contextlib.suppress(EnvdCallError):
            await run.envd.close_idle()


async def guest_runs_on(run: Run) -> None:
    """After a prepare whose snapshot did not happen: the run's client drops the connections
    envd closed while it prepared (best effort; later calls open fresh ones)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(EnvdCallError):
        await run.envd.close_idle()


async def save(host: Host, run: Run, state_file: Path, *, ignore_shared: bool) -> SaveResult:
    """Stop the guest (`Hypervisor.pause`) and write its snapshot to `state_file`, atomically
    and durably: the VMM writes `<state_file>.partial`, which is fsynced and renamed into place
    only once it is complete, so `state_file` existing means the snapshot is whole (start-up
    recovery relies on it). On failure or cancellation the partial file is removed, the save
    is cancelled and the guest let run on (`Hypervisor.cancel_save`), and the error raised;
    the caller decides what the capsule's state is then."""
    partial = state_file.with_name(state_file.name + ".partial")
    try:
        with anyio.fail_after(host.timeouts.save):
            await host.hypervisor.pause(run.vm)
            result = await _written_back_meanwhile(
                partial,
                functools.partial(host.hypervisor.save, run.vm, partial,
                                  ignore_shared=ignore_shared),
            )  # fmt: skip
        await anyio.to_thread.run_sync(_move_into_place, partial, state_file)
    except BaseException:
        partial.unlink(missing_ok=True)
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_SAVE_S) as scope:
            try:
                await host.hypervisor.cancel_save(run.vm)
            except Exception as err:
                log.warning("cannot let the guest run on after a failed save: %r", err)
        if scope.cancelled_caught:
            log.warning("cannot let the guest run on after a failed save: timed out")
        raise
    return result


WRITEBACK_S = 0.01
"""How often the pages of a snapshot being written are sent on to the disk."""


async def _written_back_meanwhile(
    path: Path, write: Callable[[], Awaitable[SaveResult]]
) -> SaveResult:
    """`write()` (the VMM writing `path`, made here empty first), while what it has written so
    far is sent on to the disk every `WRITEBACK_S` (`durable.start_writeback`): the fsync that
    then makes the snapshot durable waits only for the last pages, not for all of them (here
    ~50 ms less for a 124 MiB snapshot, which the VMM writes in about as long). An error of
    `write` is raised as is; one of the writeback only ends it."""
    fd = await anyio.to_thread.run_sync(
        lambda: os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    )
    outcome: SaveResult | None = None
    error: BaseException | None = None

    async def write_back() -> None:
        with contextlib.suppress(OSError):  # an optimisation only: the fsync still comes
            while True:
                await anyio.sleep(WRITEBACK_S)
                await anyio.to_thread.run_sync(start_writeback, fd)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(write_back)
            try:
                outcome = await write()
            except BaseException as err:  # raised below, not in the task group's group
                error = err
            tg.cancel_scope.cancel()
    finally:
        os.close(fd)
    if error is not None:
        raise error
    assert outcome is not None
    return outcome


def _move_into_place(partial: Path, final: Path) -> None:
    fsync_path(partial)
    os.replace(partial, final)
    fsync_path(final.parent)


async def _first_of(ready: Awaitable[None], exit_: Awaitable[int | None]) -> bool:
    """Wait for whichever comes first; True if it was the VM's exit. An error of `ready` is
    raised as is (not in an exception group)."""
    exited = False
    error: Exception | None = None

    async def watch_exit(scope: anyio.CancelScope) -> None:
        nonlocal exited
        await exit_
        exited = True
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_exit, tg.cancel_scope)
        try:
            await ready
        except Exception as err:
            error = err
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return exited


async def freeze_into_template(
    record: CapsuleRecord, staging: TemplateDir, *, with_ram: bool = True
) -> None:
    """Move a stopped capsule's RAM file (if it has its own, and `with_ram`) and disk into a
    template version (a base template has no RAM: `with_ram=False`).

    An overlay directly on the raw image moves as is; a deeper chain (a clone's overlay on a
    template's) is flattened onto the raw image, so template chains never grow.
    """
    if with_ram and record.ram == "shared" and record.ram_file is not None:
        await anyio.to_thread.run_sync(os.replace, record.ram_file, staging.mem)
    chain = await cow.backing_chain(record.disk)
    if len(chain) <= 2:
        await anyio.to_thread.run_sync(os.replace, record.disk, staging.disk)
    else:
        await cow.flatten(record.disk, staging.disk, backing=chain[-1], backing_format="raw")


def template_meta(
    record: CapsuleRecord,
    template_id: str,
    *,
    source: str,
    ram: Literal["file", "state"],
    state_bytes: int,
    accel: Accel,
    kind: Literal["snapshot", "base"] = "snapshot",
) -> TemplateMeta:
    """The metadata of a template made from `record`'s machine (and the token its envd holds)."""
    m = record.machine
    return TemplateMeta(
        template_id=template_id, created_at=datetime.now(UTC), source=source,
        image_version=m.image_version, accel=accel, kernel=m.kernel, initrd=m.initrd,
        cmdline=m.cmdline, vcpus=m.vcpus, memory_mib=m.memory_mib, ram=ram,
        state_bytes=state_bytes, default_user=record.default_user, default_env=record.env_vars,
        access_token=record.access_token if kind == "snapshot" else None, kind=kind,
    )  # fmt: skip


def machine_spec(record: CapsuleRecord, network: SlotNetwork, *, incoming: bool) -> VmSpec:
    """The VmSpec of `record`'s machine (its RAM as the record says) in slot `network`."""
    m = record.machine
    return VmSpec(
        name=record.id, kernel=m.kernel, initrd=m.initrd, cmdline=m.cmdline, disk=record.disk,
        disk_format="qcow2", run_dir=record.run_dir, vcpus=m.vcpus, memory_mib=m.memory_mib,
        ram=record.ram_spec(), netns=network.netns, tap=network.tap, slot=network.slot,
        incoming=incoming,
    )  # fmt: skip


def _serial_tail(run: Run) -> str:
    """The console's last lines (read from the end: the log may be up to its cap)."""
    data = serial.tail(run.vm.spec.serial_log, 1500)
    return "serial console tail:\n" + data.decode(errors="replace") if data else ""


async def _rmtree(path: Path) -> None:
    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)

    await anyio.to_thread.run_sync(remove)


async def write_record(state_dir: Path, record: CapsuleRecord) -> None:
    """`capsule.write_record` in a worker thread (it fsyncs), shielded: once a step is done
    in memory, its record reaches the disk even if the caller is cancelled meanwhile."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(cap.write_record, state_dir, record)


async def _remove_record(state_dir: Path, capsule_id: str) -> None:
    await anyio.to_thread.run_sync(cap.remove_record, state_dir, capsule_id)


__all__ = [
    "EnvdOpener",
    "Host",
    "RecordVm",
    "Run",
    "StepHook",
    "Timeouts",
    "UndoStack",
    "create",
    "end_run",
    "freeze_into_template",
    "guest_runs_on",
    "machine_spec",
    "no_hook",
    "open_envd",
    "open_run",
    "prepare_snapshot",
    "save",
    "start_guest",
    "template_meta",
    "unwind",
    "unwind_after_failure",
    "wait_guest",
    "write_record",
]
