"""Agent start-up: take back what an earlier run of this agent left, remove what nobody owns.

QEMU runs in its own session, so a crash or `kill -9` of the agent leaves every VM running.
For each capsule record in `<state_dir>/capsules/`:

- running (or killed mid-pause) and its QEMU still alive: re-adopt it. Reconnect QMP (a VM
  stopped by a pause that never finished is continued), claim its slot, rebuild the undo
  stacks of its run (slot, slot network, VMM, envd client) and files, and give it back to the
  runtime, which watches it from now on. The guest never noticed.
- paused with its snapshot on disk: adopt it as paused (a resume interrupted by the crash is
  rolled back to paused; the snapshot is removed only once a resume succeeded).
- anything else (the VM is gone, a create or template snapshot was interrupted): kill what is
  left of it, remove its files, and list it as `error` until the control plane destroys it.

Then remove this agent's network leftovers of every slot no capsule holds, and capsule
directories no record owns. Nothing of another agent id is ever touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import Capsule, CapsuleRecord, CapsuleState
from nestbox.hostagent.envd_client import EnvdClient, envd_url
from nestbox.hostagent.lifecycle import Run, UndoStack, machine_spec, unwind_after_failure
from nestbox.hostagent.managed import CapsuleMeta, read_meta
from nestbox.hostagent.network import SlotLease, cleanup_leftovers, plan_slot
from nestbox.hostagent.vmm.base import VmHandle
from nestbox.hostagent.vmm.process import VmProcess
from nestbox.hostagent.vmm.qmp import QmpClient

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.lifecycle import Host
    from nestbox.hostagent.manager import CapsuleManager

log = logging.getLogger(__name__)

S = CapsuleState
QMP_CONNECT_S = 10.0


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    running: list[str]
    paused: list[str]
    failed: dict[str, str]
    """capsule id -> why it could not be re-adopted."""


class NotAdoptable(Exception):
    """The record's VM cannot be taken back; the message says why."""


async def recover(manager: CapsuleManager) -> RecoveryReport:
    """Re-adopt, clean and report (see the module docstring). Call once, before serving."""
    runtime = manager.runtime
    host = runtime.host
    report = RecoveryReport([], [], {})
    for record in await anyio.to_thread.run_sync(cap.read_records, host.settings.state_dir):
        meta = await anyio.to_thread.run_sync(read_meta, record.dir)
        try:
            capsule = await _adopt(host, record, meta)
        except NotAdoptable as why:
            reason = str(why)
            await _discard(host, record)
            if record.state != S.STOPPING:
                report.failed[record.id] = reason
                manager.add_failed(record.id, meta, reason)
            log.warning("capsule not re-adopted: %s", reason, extra={"capsule_id": record.id})
            continue
        runtime.adopt(capsule)
        await manager.adopt(capsule, meta)
        (report.running if capsule.state == S.RUNNING else report.paused).append(capsule.id)
    await cleanup_leftovers(host.system, host.settings, host.slots.in_use())
    await anyio.to_thread.run_sync(_remove_strays, host.settings.state_dir,
                                   {c.id for c in runtime.capsules()})  # fmt: skip
    host.networks.start()  # the warm pool, now that no leftover shares a slot with it
    if report.running or report.paused or report.failed:
        log.info(
            "recovery: %d running and %d paused capsules re-adopted, %d failed",
            len(report.running), len(report.paused), len(report.failed),
        )  # fmt: skip
    return report


async def _adopt(host: Host, record: CapsuleRecord, meta: CapsuleMeta) -> Capsule:
    """The capsule of `record`, with its run when its VM is alive. :raise NotAdoptable:"""
    alive = _our_vm(record)
    if record.state in (S.RUNNING, S.PAUSING):
        if alive is None:
            raise NotAdoptable("the VM is gone (it exited while the agent was down)")
        if record.slot is None:
            raise NotAdoptable("the record has no slot")
        if record.state == S.PAUSING and record.snapshot is not None:
            record.snapshot.unlink(missing_ok=True)  # an unfinished snapshot
        capsule = Capsule(record.model_copy(update={"state": S.RUNNING}), _files(host, record))
        capsule.run = await _adopt_run(host, record, record.slot, alive, meta.egress)
        return capsule
    if alive is not None:
        with anyio.CancelScope(shield=True):
            await VmProcess.adopt(alive, [], record.run_dir / "vmm.log").kill()
    if record.state in (S.PAUSED, S.RESUMING) and record.snapshot and record.snapshot.exists():
        paused = record.model_copy(update={"state": S.PAUSED, "slot": None, "pid": None,
                                           "host_address": None})  # fmt: skip
        await anyio.to_thread.run_sync(cap.write_record, host.settings.state_dir, paused)
        return Capsule(paused, _files(host, record))
    raise NotAdoptable(f"the agent stopped while the capsule was {record.state}")


async def _adopt_run(host: Host, record: CapsuleRecord, slot: int, pid: int, egress: bool) -> Run:
    """Reconnect to a running VM and rebuild its run's undo stack. :raise NotAdoptable:"""
    network = dataclasses.replace(plan_slot(host.settings, slot), egress=egress)
    stack = UndoStack("run")
    try:
        try:
            await host.slots.claim(slot)
        except ValueError as err:
            raise NotAdoptable(f"slot {slot} is claimed twice") from err
        lease = SlotLease(network, UndoStack(f"slot {slot} network"))
        lease.stack.push_async_callback(host.slots.release, slot)
        lease.stack.push_async_callback(_remove_slot_network, host, slot)
        stack.push_async_callback(host.networks.release, lease)
        spec = machine_spec(record, network, incoming=False)
        process = VmProcess.adopt(pid, [], spec.output_log)
        try:
            with anyio.fail_after(QMP_CONNECT_S):
                qmp = await QmpClient.connect(spec.qmp_socket)
        except (OSError, TimeoutError, anyio.EndOfStream) as err:
            await process.kill()
            raise NotAdoptable(f"the VM's QMP socket does not answer: {err!r}") from err
        vm = VmHandle(spec=spec, process=process, qmp=qmp)
        stack.push_async_callback(host.hypervisor.kill, vm)
        status = (await qmp.execute("query-status"))["status"]
        if status != "running":  # stopped by a pause the crash interrupted
            log.info("continuing a VM found %s", status, extra={"capsule_id": record.id})
            await qmp.execute("cont")
        envd = EnvdClient(envd_url(network.host_address))
        stack.push_async_callback(envd.aclose)
    except BaseException:
        await unwind_after_failure(stack, host.timeouts.teardown)
        raise
    return Run(lease=lease, vm=vm, envd=envd, stack=stack)


def _our_vm(record: CapsuleRecord) -> int | None:
    """The record's QEMU pid if that process is alive and is this capsule's QEMU (a recycled
    pid must never be adopted or killed)."""
    if record.pid is None:
        return None
    try:
        with open(f"/proc/{record.pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return None
    if b"qemu" not in cmdline[0] or str(record.disk).encode() not in b" ".join(cmdline):
        return None
    return record.pid


def _files(host: Host, record: CapsuleRecord) -> UndoStack:
    """The undo stack of a capsule's files, as `lifecycle.create` builds it."""
    files = UndoStack(f"capsule {record.id} files")
    files.push_async_callback(_rmtree, record.dir)
    files.push_async_callback(_remove_record, host.settings.state_dir, record.id)
    return files


async def _discard(host: Host, record: CapsuleRecord) -> None:
    with anyio.CancelScope(shield=True):
        await _remove_record(host.settings.state_dir, record.id)
        await _rmtree(record.dir)


async def _remove_slot_network(host: Host, slot: int) -> None:
    """Remove one adopted slot's netns, veth, route and rules (this run did not build them, so
    its stack has no step-by-step undo): every slot but this one counts as live."""
    first = host.settings.slot_first
    others = frozenset(range(first, first + host.settings.slot_count)) - {slot}
    await cleanup_leftovers(host.system, host.settings, others)


def _remove_strays(state_dir: Path, live: set[str]) -> None:
    """Capsule directories and records no live capsule owns, and half-written records."""
    base = cap.records_dir(state_dir)
    if not base.is_dir():
        return
    for path in base.iterdir():
        owner = path.name.removesuffix(".json")
        if path.is_dir() and path.name not in live:
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(".tmp") or (path.suffix == ".json" and owner not in live):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            continue
        log.warning("removed a stray capsule file: %s", path.name)


async def _rmtree(path: Path) -> None:
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))


async def _remove_record(state_dir: Path, capsule_id: str) -> None:
    cap.remove_record(state_dir, capsule_id)
