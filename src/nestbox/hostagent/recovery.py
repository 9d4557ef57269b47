"""Agent start-up: take back what an earlier run of this agent left, remove what nobody owns.

QEMU runs in its own session, so a crash or `kill -9` of the agent leaves every VM running,
possibly in the middle of an operation. The record of a capsule names its VM from the moment
the VMM process exists (`pid`, `slot`), and a snapshot is renamed into place only once it is
complete and fsynced, so each interrupted state has one decision:

| record       | what is found                        | outcome                                 |
|--------------|--------------------------------------|-----------------------------------------|
| RUNNING      | its VM alive                         | re-adopted, running (resumed if stopped)|
| PAUSING      | the pause's snapshot complete        | VM killed, PAUSED                       |
| PAUSING      | no complete snapshot, VM alive       | save cancelled, resumed, re-adopted     |
| SNAPSHOTTING | VM alive                             | save cancelled, resumed, re-adopted;    |
|              |                                      | the template staging directory removed  |
| PAUSED       | its snapshot                         | PAUSED (any VM left is killed)          |
| RESUMING     | its snapshot                         | half-restored VM killed, PAUSED         |
| STARTING     | anything                             | VM killed, files removed, `error`       |
| any other    | (the VM is gone, snapshot missing…)  | VM killed, files removed, `error`       |
| STOPPING     | anything                             | VM killed, files removed, forgotten     |

A SNAPSHOTTING capsule whose VM is gone was being consumed into its template (its disk may
already have moved): it is removed and listed as `error`. A template made for a caller that
never got the answer (`templates.mark_unanswered` is still there) is removed, its versions with
it unless a capsule uses one. Re-adoption claims the slot, takes the VMM back
(`Hypervisor.adopt`), lets the guest run (`resume`, or `cancel_save` after an interrupted
snapshot) and rebuilds the run's undo stack (slot network, VMM, envd client); the guest never
noticed. A capsule in `error` stays in the registry (state ERROR, the reason in its record)
until the control plane destroys it. A record an agent before the one-record merge wrote has its
`agent.json` (team, idle timeout, egress) folded in first (`capsule.migrate_legacy_meta`).

The VMs of a capsule are the recorded pid and any QEMU whose command line names the capsule's
directory (one launched in the instant before its pid reached the record). Each is held by a
pidfd opened *before* its command line is checked, and signalled through it, so a recycled pid
is never killed. Files are removed only after every VM of the capsule has exited.

Then remove this agent's network leftovers of every slot no capsule holds, the cgroups of VMs
that no longer run, and capsule directories no record owns (after killing any QEMU that names
them). Nothing of another agent
id is ever touched: its records, directories and QEMU command lines are under another state
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import Capsule, CapsuleRecord, CapsuleState
from nestbox.hostagent.lifecycle import Run, UndoStack, machine_spec, unwind_after_failure
from nestbox.hostagent.network import SlotLease, cleanup_leftovers, plan_slot
from nestbox.hostagent.network.egress import open_forwarder
from nestbox.hostagent.storage import templates as tpl
from nestbox.hostagent.vmm import confine
from nestbox.hostagent.vmm.base import VmError
from nestbox.hostagent.vmm.process import VmProcess

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nestbox.hostagent.lifecycle import Host
    from nestbox.hostagent.manager import CapsuleManager

log = logging.getLogger(__name__)

S = CapsuleState
ADOPT_S = 10.0
"""How long reconnecting to a left VMM's API may take."""
CANCEL_SAVE_S = 10.0
"""How long a snapshot that a crash interrupted may take to stop once cancelled."""


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
    state_dir = host.settings.state_dir
    report = RecoveryReport([], [], {})
    vms = await anyio.to_thread.run_sync(_qemu_cmdlines, cap.records_dir(state_dir))
    for record in await anyio.to_thread.run_sync(cap.read_records, state_dir):
        # A record an older agent wrote keeps its service settings in a file of their own.
        record = await anyio.to_thread.run_sync(cap.migrate_legacy_meta, state_dir, record)
        found = _claim_vms(record, vms)
        try:
            capsule = await _recover(host, record, found)
        except NotAdoptable as why:
            reason = str(why)
            await _kill_all(found)  # before its files go: never a deleted disk under a VM
            await _discard(host, record)
            if record.state != S.STOPPING:
                report.failed[record.id] = reason
                runtime.add_failed(record, reason)
            log.warning("capsule not re-adopted: %s", reason, extra={"capsule_id": record.id})
            continue
        await manager.adopt(capsule)
        (report.running if capsule.state == S.RUNNING else report.paused).append(capsule.id)
    await cleanup_leftovers(host.system, host.settings, host.slots.in_use())
    running = {c.id for c in runtime.capsules() if c.run is not None}
    await anyio.to_thread.run_sync(confine.remove_leftover_cgroups, host.settings, running)
    await _remove_strays(state_dir, {c.id for c in runtime.capsules() if c.state != S.ERROR})
    # Templates made for a caller that never got the answer: unknown to it, so they go (the
    # prune then removes their versions unless a capsule still uses one).
    forgotten = await anyio.to_thread.run_sync(tpl.forget_unanswered, host.settings.templates_dir)
    if forgotten:
        log.warning("recovery: templates made but never answered for removed: %s",
                    ", ".join(forgotten))  # fmt: skip
    await runtime.prune_templates()  # old versions whose last capsule went meanwhile
    host.networks.start()  # the warm pool, now that no leftover shares a slot with it
    if report.running or report.paused or report.failed:
        log.info(
            "recovery: %d running and %d paused capsules re-adopted, %d failed",
            len(report.running), len(report.paused), len(report.failed),
        )  # fmt: skip
    return report


async def _recover(host: Host, record: CapsuleRecord, found: list[VmProcess]) -> Capsule:
    """The capsule of `record` as the table in the module docstring says. Every VM in `found`
    is either the adopted capsule's or killed when this returns. :raise NotAdoptable: (the
    caller kills what is left in `found`)"""
    recorded = next((vm for vm in found if vm.pid == record.pid), None)
    if record.state in (S.RUNNING, S.PAUSING, S.SNAPSHOTTING) and not _snapshot_done(record):
        if recorded is None:
            raise NotAdoptable(_GONE.get(record.state, "the VM is gone (it exited while the "
                                                       "agent was down)"))  # fmt: skip
        if record.slot is None:
            raise NotAdoptable("the record has no slot")
        await _kill_all(vm for vm in found if vm is not recorded)
        run = await _adopt_run(host, record, record.slot, recorded, record.egress)
        await anyio.to_thread.run_sync(_remove_unfinished, record, True)
        running = record.model_copy(update={"state": S.RUNNING, "snapshot": None, "staging": None})
        capsule = Capsule(running, _files(host, record))
        capsule.run = run
        return capsule
    await _kill_all(found)
    if record.state in (S.PAUSING, S.PAUSED, S.RESUMING) and _snapshot_done(record):
        await anyio.to_thread.run_sync(_remove_unfinished, record, False)
        # A paused capsule's RAM is all in its snapshot, and its envd holds `access_token`
        # (a resume's new token never reached the snapshot).
        paused = record.model_copy(update={
            "state": S.PAUSED, "slot": None, "pid": None, "host_address": None,
            "ram": "anonymous", "ram_file": None, "pending_token": None, "staging": None,
        })  # fmt: skip
        await anyio.to_thread.run_sync(cap.write_record, host.settings.state_dir, paused)
        return Capsule(paused, _files(host, record))
    raise NotAdoptable(f"the agent stopped while the capsule was {record.state}")


_GONE = {
    S.PAUSING: "the VM is gone (the agent stopped while the capsule was pausing)",
    S.SNAPSHOTTING: "the VM is gone (the agent stopped while the capsule became a template)",
}


def _snapshot_done(record: CapsuleRecord) -> bool:
    """The record's snapshot is complete (it is renamed into place only then)."""
    return record.snapshot is not None and record.snapshot.exists()


async def _adopt_run(
    host: Host, record: CapsuleRecord, slot: int, process: VmProcess, egress: bool
) -> Run:
    """Take a running VM back (cancelling a snapshot a crash interrupted, and letting the guest
    run on) and rebuild its run's undo stack. :raise NotAdoptable:"""
    network = dataclasses.replace(plan_slot(host.settings, slot), egress=egress)
    hypervisor = host.hypervisor
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
        if egress:  # the slot's DNS forwarder lived in the agent that made it
            try:
                forwarder = await open_forwarder(host.settings, network.veth_host_ip)
            except OSError as err:
                raise NotAdoptable(f"the slot's DNS forwarder cannot listen: {err}") from err
            lease.stack.callback(forwarder.close)
        spec = machine_spec(record, network, incoming=False)
        try:
            with anyio.fail_after(ADOPT_S):
                vm = await hypervisor.adopt(spec, process)
        except (VmError, TimeoutError) as err:
            raise NotAdoptable(f"the VM cannot be taken back: {str(err) or repr(err)}") from err
        stack.push_async_callback(hypervisor.kill, vm)
        try:
            with anyio.fail_after(ADOPT_S + CANCEL_SAVE_S):
                if record.state == S.RUNNING:
                    await hypervisor.resume(vm)  # a no-op unless it was found stopped
                else:
                    # An interrupted pause or template: its migration may still be writing, or
                    # may have completed into a file that was never renamed; either way it is
                    # not the capsule's snapshot.
                    await hypervisor.cancel_save(vm)
        except (VmError, TimeoutError) as err:
            raise NotAdoptable(f"the VM cannot be continued: {err!r}") from err
        envd = host.open_envd(network, record.access_token)
        stack.push_async_callback(envd.aclose)
    except BaseException:
        await unwind_after_failure(stack, host.timeouts.teardown)
        raise
    return Run(lease=lease, vm=vm, envd=envd, stack=stack)


def _remove_unfinished(record: CapsuleRecord, running: bool) -> None:
    """What an interrupted pause, resume or template snapshot left: the partial pause snapshot,
    the template staging directory and, for a capsule that runs, the pause snapshot (a resume
    stopped before removing it: it must never pass for a later pause's)."""
    partial = record.pause_snapshot.with_name(record.pause_snapshot.name + ".partial")
    partial.unlink(missing_ok=True)
    if running:
        record.pause_snapshot.unlink(missing_ok=True)
    if record.staging is not None:
        shutil.rmtree(record.staging, ignore_errors=True)


def _files(host: Host, record: CapsuleRecord) -> UndoStack:
    """The undo stack of a capsule's files, as `lifecycle.create` builds it."""
    files = UndoStack(f"capsule {record.id} files")
    files.push_async_callback(_rmtree, record.dir)
    files.push_async_callback(_remove_record, host.settings.state_dir, record.id)
    return files


async def _discard(host: Host, record: CapsuleRecord) -> None:
    """Remove a capsule's record, then its files (its VMs are gone)."""
    with anyio.CancelScope(shield=True):
        await _remove_record(host.settings.state_dir, record.id)
        await _rmtree(record.dir)
        if record.staging is not None:
            await _rmtree(record.staging)


async def _remove_slot_network(host: Host, slot: int) -> None:
    """Remove one adopted slot's netns, veth, route and rules (this run did not build them, so
    its stack has no step-by-step undo): every slot but this one counts as live."""
    first = host.settings.slot_first
    others = frozenset(range(first, first + host.settings.slot_count)) - {slot}
    await cleanup_leftovers(host.system, host.settings, others)


# ── finding a capsule's VMs ─────────────────────────────────────────────────────────────


def _qemu_cmdlines(records_dir: Path) -> dict[int, bytes]:
    """pid -> command line (NULs as spaces) of every QEMU naming something under
    `records_dir` (this agent's capsules)."""
    marker = _marker(records_dir)
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (cmdline := _cmdline(int(name))) and marker in cmdline:
            found[int(name)] = cmdline
    return found


def _cmdline(pid: int) -> bytes | None:
    """`pid`'s command line if it is a QEMU, else None (gone, or another program)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    return b" ".join(argv) if b"qemu" in argv[0] else None


def _marker(directory: Path) -> bytes:
    """What the command line of a QEMU using files under `directory` contains."""
    return str(directory).encode() + b"/"


def _claim_vms(record: CapsuleRecord, vms: dict[int, bytes]) -> list[VmProcess]:
    """The live QEMUs of `record`'s capsule, the recorded pid first."""
    marker = _marker(record.dir)
    pids = [record.pid] if record.pid is not None else []
    pids += [pid for pid, cmdline in vms.items() if marker in cmdline and pid != record.pid]
    return _claim(pids, marker, record.run_dir / "vmm.log")


def _claim(pids: list[int], marker: bytes, output_log: Path) -> list[VmProcess]:
    """The live QEMUs among `pids` whose command line contains `marker`, each held by a pidfd
    opened *before* the command line is checked: a pid recycled in between fails the check and
    is let go, never signalled."""
    found = []
    for pid in pids:
        process = VmProcess.adopt(pid, [], output_log)
        cmdline = _cmdline(pid)
        if process.is_running() and cmdline is not None and marker in cmdline:
            found.append(process)
        else:
            process.close()
    return found


async def _kill_all(vms: Iterable[VmProcess]) -> None:
    """SIGKILL each VM (through its pidfd) and wait until it has exited."""
    with anyio.CancelScope(shield=True):
        for vm in list(vms):
            log.info("killing a VM left by an interrupted operation", extra={"pid": vm.pid})
            await vm.kill()


async def _remove_strays(state_dir: Path, live: set[str]) -> None:
    """Capsule directories and records no live capsule owns, and half-written records. A QEMU
    naming a stray directory is killed before the directory goes."""
    base = cap.records_dir(state_dir)
    if not await anyio.to_thread.run_sync(base.is_dir):
        return
    vms = await anyio.to_thread.run_sync(_qemu_cmdlines, base)
    for path in await anyio.to_thread.run_sync(lambda: sorted(base.iterdir())):
        owner = path.name.removesuffix(".json")
        if path.is_dir() and path.name not in live:
            marker = _marker(path)
            pids = [pid for pid, cmdline in vms.items() if marker in cmdline]
            await _kill_all(_claim(pids, marker, Path(os.devnull)))
            await _rmtree(path)
        elif path.name.endswith(".tmp") or (path.suffix == ".json" and owner not in live):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            continue
        log.warning("removed a stray capsule file: %s", path.name)


async def _rmtree(path: Path) -> None:
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))


async def _remove_record(state_dir: Path, capsule_id: str) -> None:
    await anyio.to_thread.run_sync(cap.remove_record, state_dir, capsule_id)
