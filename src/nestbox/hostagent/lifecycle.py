"""One capsule's build-up and tear-down, as ordered steps on undo stacks.

Every step that makes something (a directory, a disk, a slot, a netns, a VMM process) pushes
its undo on an `UndoStack` right after it succeeds. If a later step fails or the caller
cancels, `unwind` runs the undos in reverse, shielded from the cancellation, under its own
deadline, attempting every one and collecting the failures: what exists is exactly what the
stack says exists. Nothing here keeps state between calls; `runtime.VmRuntime` does.

A `Run` is one VMM process with its slot network and envd client. A capsule has a run while it
is RUNNING; pausing closes the run and keeps the capsule's directory (disk + snapshot).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import CapsuleRecord, GuestUnreachable, TeardownError
from nestbox.hostagent.envd_client import EnvdClient, EnvdError, envd_url
from nestbox.hostagent.network import open_slot_network
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage.templates import TemplateMeta
from nestbox.hostagent.vmm.base import RamSpec, VmSpec

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.network import SlotNetwork, SlotPool
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
    prepare: float = 3.0
    """`/snapshot/prepare` before a pause (best effort, as in the seed)."""
    save: float = 120.0
    teardown: float = 30.0


@dataclass(frozen=True, slots=True)
class Host:
    """What the steps act on."""

    settings: AgentSettings
    system: System
    hypervisor: Hypervisor
    slots: SlotPool
    timeouts: Timeouts


class UndoStack(contextlib.AsyncExitStack):
    """An AsyncExitStack whose async undos never stop the unwinding: each failure is logged
    and kept in `errors`, and the next undo runs."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.errors: list[BaseException] = []

    def push_async_callback(
        self, callback: Callable[..., Awaitable[Any]], /, *args: Any, **kwds: Any
    ) -> Callable[..., Awaitable[Any]]:
        async def guarded() -> None:
            try:
                await callback(*args, **kwds)
            except Exception as err:
                log.warning("undo step of %s failed: %r", self.what, err)
                self.errors.append(err)

        super().push_async_callback(guarded)
        return callback


async def unwind(stack: UndoStack, within: float) -> None:
    """Run every undo of `stack` (reverse order), shielded, within `within` seconds (the
    teardown's own deadline: the caller's may be what was just cancelled).

    :raise TeardownError: some undo failed or the deadline passed (all were attempted).
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(within) as scope:
        await stack.aclose()
    if scope.cancelled_caught:
        stack.errors.append(TimeoutError(f"teardown exceeded {within:g} s"))
    if stack.errors:
        raise TeardownError(stack.what, stack.errors)


async def unwind_after_failure(stack: UndoStack, within: float) -> None:
    """`unwind` while another exception is propagating: undo failures are logged (and the
    original exception, or the cancellation, is what the caller sees)."""
    try:
        await unwind(stack, within)
    except TeardownError as err:
        log.error("%s", err)


@dataclass(slots=True)
class Run:
    """A running VMM, the slot network it sits in, and the envd client that reaches it."""

    network: SlotNetwork
    vm: VmHandle
    envd: EnvdClient
    stack: UndoStack

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
) -> Run:
    """Slot → slot network → VMM process [→ snapshot loaded and running] → envd client."""
    stack = UndoStack("run")
    try:
        slot = await host.slots.allocate()
        stack.push_async_callback(host.slots.release, slot)
        await hook("slot")
        network = await open_slot_network(
            host.system, host.settings, slot, egress=egress, stack=stack
        )
        await hook("network")
        vm = await host.hypervisor.start(spec_for(network))
        stack.push_async_callback(host.hypervisor.kill, vm)
        await hook("vmm")
        if restore_from is not None:
            with anyio.fail_after(host.timeouts.restore):
                await host.hypervisor.restore(vm, restore_from, ignore_shared=ignore_shared)
            await hook("restore")
        envd = EnvdClient(envd_url(network.host_address))
        stack.push_async_callback(envd.aclose)
    except BaseException:
        await unwind_after_failure(stack, host.timeouts.teardown)
        raise
    return Run(network=network, vm=vm, envd=envd, stack=stack)


async def wait_guest(
    host: Host,
    run: Run,
    record: CapsuleRecord,
    *,
    ready_within: float,
    init: Callable[[], InitRequest] | None,
    hook: StepHook,
) -> None:
    """envd answers `/health` (within `ready_within` s), then `/init` (its own deadline).

    :raise GuestUnreachable: with the tail of the guest's serial console.
    """
    try:
        with anyio.fail_after(ready_within):
            exited = await _first_of(run.envd.wait_ready(), run.vm.process.wait_exit())
    except TimeoutError as err:
        raise GuestUnreachable(record.id, "wait_ready", _serial_tail(run)) from err
    if exited:
        raise GuestUnreachable(record.id, "wait_ready", "the VM exited; " + _serial_tail(run))
    await hook("envd")
    if init is None:
        return
    try:
        with anyio.fail_after(host.timeouts.init):
            await run.envd.init(init())
    except (TimeoutError, httpx.HTTPError, EnvdError) as err:
        # Fatal, unlike in the seed: a clone that missed /init still has the template's RNG
        # state and identity, which must never leak into a capsule that runs user code.
        raise GuestUnreachable(record.id, "init", repr(err)) from err
    await hook("init")


async def create(
    host: Host,
    record: CapsuleRecord,
    *,
    base: Path,
    base_format: DiskFormat,
    spec_for: Callable[[SlotNetwork], VmSpec],
    restore_from: Path | None,
    ignore_shared: bool,
    init: Callable[[], InitRequest] | None,
    egress: bool,
    hook: StepHook = no_hook,
) -> tuple[Run, UndoStack]:
    """Directory → disk overlay on `base` → record → run → envd ready → `/init`.

    Returns the run and the stack that removes the capsule's files (its owner keeps both).
    A failure or cancellation at any step removes everything made so far.
    """
    files = UndoStack(f"capsule {record.id} files")
    try:
        await anyio.to_thread.run_sync(lambda: record.dir.mkdir(parents=True))
        files.push_async_callback(_rmtree, record.dir)
        await hook("dir")
        await cow.create_overlay(base, base_format, record.disk)
        await hook("disk")
        cap.records_dir(host.settings.state_dir).mkdir(parents=True, exist_ok=True)
        cap.write_record(host.settings.state_dir, record)
        files.push_async_callback(_remove_record, host.settings.state_dir, record.id)
        await hook("record")
        ready_within = host.timeouts.boot if restore_from is None else host.timeouts.envd_ready
        run = await open_run(
            host,
            spec_for,
            egress=egress,
            restore_from=restore_from,
            ignore_shared=ignore_shared,
            hook=hook,
        )
        try:
            await wait_guest(host, run, record, ready_within=ready_within, init=init, hook=hook)
        except BaseException:
            await unwind_after_failure(run.stack, host.timeouts.teardown)
            raise
    except BaseException:
        await unwind_after_failure(files, host.timeouts.teardown)
        raise
    return run, files


async def prepare_snapshot(host: Host, run: Run) -> None:
    """Close the host's idle connections, then `/snapshot/prepare` with a short deadline.
    Best effort (as in the seed): a guest that does not answer is snapshotted anyway."""
    await run.envd.aclose()
    run.envd = EnvdClient(run.envd.base_url)
    run.stack.push_async_callback(run.envd.aclose)
    try:
        with anyio.fail_after(host.timeouts.prepare):
            await run.envd.prepare_snapshot()
        await run.envd.aclose()  # the prepare connection is pre-snapshot; drop it too
    except (TimeoutError, httpx.HTTPError, EnvdError) as err:
        log.warning("snapshot/prepare failed, snapshotting anyway: %r", err)


async def save(host: Host, run: Run, state_file: Path, *, ignore_shared: bool) -> SaveResult:
    """Stop the guest and write its snapshot. On failure the guest is let run on (`cont`)
    and the error raised; the caller decides what the capsule's state is then."""
    try:
        with anyio.fail_after(host.timeouts.save):
            return await host.hypervisor.save(run.vm, state_file, ignore_shared=ignore_shared)
    except Exception:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(Exception):
            await run.vm.qmp.execute("migrate_cancel")
            await run.vm.qmp.execute("cont")
        raise


async def _first_of(ready: Awaitable[None], exit_: Awaitable[int | None]) -> bool:
    """Wait for whichever comes first; True if it was the VM's exit."""
    exited = False

    async def watch_exit(scope: anyio.CancelScope) -> None:
        nonlocal exited
        await exit_
        exited = True
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_exit, tg.cancel_scope)
        await ready
        tg.cancel_scope.cancel()
    return exited


async def freeze_into_template(record: CapsuleRecord, staging: TemplateDir) -> None:
    """Move a stopped capsule's RAM file (if it has its own) and disk into a template version.

    An overlay directly on the raw image moves as is; a deeper chain (a clone's overlay on a
    template's) is flattened onto the raw image, so template chains never grow.
    """
    if record.ram == "shared" and record.ram_file is not None:
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
) -> TemplateMeta:
    """The metadata of a template made from `record`'s machine."""
    m = record.machine
    return TemplateMeta(
        template_id=template_id, created_at=datetime.now(UTC), source=source,
        image_version=m.image_version, accel=accel, kernel=m.kernel, initrd=m.initrd,
        cmdline=m.cmdline, vcpus=m.vcpus, memory_mib=m.memory_mib, ram=ram,
        state_bytes=state_bytes, default_user=record.default_user, default_env=record.env_vars,
    )  # fmt: skip


def machine_spec(
    record: CapsuleRecord, run_dir: Path, network: SlotNetwork, *, ram: RamSpec, incoming: bool
) -> VmSpec:
    """The VmSpec of `record`'s machine in slot `network`."""
    m = record.machine
    return VmSpec(
        name=record.id, kernel=m.kernel, initrd=m.initrd, cmdline=m.cmdline, disk=record.disk,
        disk_format="qcow2", run_dir=run_dir, vcpus=m.vcpus, memory_mib=m.memory_mib, ram=ram,
        netns=network.netns, tap=network.tap, incoming=incoming,
    )  # fmt: skip


def _serial_tail(run: Run) -> str:
    try:
        data = run.vm.spec.serial_log.read_bytes()[-1500:]
    except OSError:
        return ""
    return "serial console tail:\n" + data.decode(errors="replace")


async def _rmtree(path: Path) -> None:
    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)

    await anyio.to_thread.run_sync(remove)


async def _remove_record(state_dir: Path, capsule_id: str) -> None:
    cap.remove_record(state_dir, capsule_id)


__all__ = [
    "Host",
    "Run",
    "StepHook",
    "Timeouts",
    "UndoStack",
    "create",
    "freeze_into_template",
    "machine_spec",
    "no_hook",
    "open_run",
    "prepare_snapshot",
    "save",
    "template_meta",
    "unwind",
    "unwind_after_failure",
    "wait_guest",
]
