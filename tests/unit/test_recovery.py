"""Start-up recovery (`hostagent/recovery.py`): each decision of its table, from records written
by hand on a tmp_path state directory, in seconds, without QEMU or root.

The VMs an earlier agent run "left" are stand-in processes (`sleep`, with an argv[0] that names
QEMU and the capsule's directory, as a real QEMU's command line does), so recovery finds,
claims (pidfd first) and kills them for real; `FakeHypervisor.adopt` takes them back (told what
state each VM is in through `LeftVm`). envd is the tiny fake envd of `tests/fakes/envd.py`,
reached by the agent's real client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import CapsuleRecord, CapsuleState, MachineRecord
from nestbox.hostagent.manager import CapsuleManager
from nestbox.hostagent.network import plan_slot
from nestbox.hostagent.recovery import recover
from nestbox.hostagent.storage import templates as tpl
from nestbox.hostagent.vmm.base import VmError
from tests.fakes.envd import FakeGuest
from tests.fakes.host import FakeHost, fake_host
from tests.fakes.hypervisor import FakeHypervisor, LeftVm

S = CapsuleState
SLOT = 3
TOKEN = "the-token-envd-holds"


class StandIns:
    """Processes standing in for QEMUs an earlier agent run left."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, capsule_dir: Path) -> int:
        argv0 = f"qemu-system-x86_64 -drive file={capsule_dir}/disk.qcow2"
        proc = subprocess.Popen(
            [argv0, "600"], executable=shutil.which("sleep"), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs[proc.pid] = proc
        return proc.pid

    def alive(self, pid: int) -> bool:
        return self.procs[pid].poll() is None


@contextmanager
def stand_ins() -> Iterator[StandIns]:
    s = StandIns()
    try:
        yield s
    finally:
        for proc in s.procs.values():
            proc.kill()
            proc.wait()


def write_record(
    host: FakeHost,
    state: CapsuleState,
    *,
    pid: int | None = None,
    slot: int | None = SLOT,
    snapshot: bool | None = None,
    partial: bool = False,
    staging: bool = False,
    **extra: object,
) -> CapsuleRecord:
    """A record as the agent writes it in `state` (the capsule's directory and disk exist).
    `snapshot`: True writes a complete pause snapshot, False names one that does not exist."""
    cid = cap.new_capsule_id()
    cdir = cap.records_dir(host.settings.state_dir) / cid
    (cdir / "run").mkdir(parents=True)
    (cdir / "disk.qcow2").write_bytes(b"disk")
    machine = MachineRecord(kernel=Path("/k"), initrd=None, cmdline="quiet", vcpus=1,
                            memory_mib=256, image_version="v1")  # fmt: skip
    record = CapsuleRecord(
        id=cid, template_id="minimal", state=state, machine=machine, ram="anonymous", dir=cdir,
        disk=cdir / "disk.qcow2", pid=pid, slot=slot, access_token=TOKEN,
        host_address=plan_slot(host.settings, slot).host_address if slot else None,
    )  # fmt: skip
    if snapshot is not None:
        record = record.model_copy(update={"snapshot": record.pause_snapshot})
        if snapshot:
            record.pause_snapshot.write_text(json.dumps({"token": TOKEN}))
    if partial:
        record.pause_snapshot.with_name("snapshot.state.partial").write_text("half")
    if staging:
        root = host.settings.templates_dir / ".t.build-0000"
        root.mkdir(parents=True)
        record = record.model_copy(update={"staging": root})
    record = record.model_copy(update=extra)
    cap.write_record(host.settings.state_dir, record)
    return record


def manager(host: FakeHost) -> CapsuleManager:
    assert host.manager is not None
    return host.manager


def on_disk(host: FakeHost, record: CapsuleRecord) -> CapsuleRecord | None:
    found = [r for r in cap.read_records(host.settings.state_dir) if r.id == record.id]
    return found[0] if found else None


def assert_gone(host: FakeHost, record: CapsuleRecord) -> None:
    """The capsule's record and files are removed (its VMs were killed first)."""
    assert on_disk(host, record) is None
    assert not record.dir.exists()
    if record.staging is not None:
        assert not record.staging.exists()


# ── re-adopted ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("found", ["running", "paused"])
async def test_a_running_capsule_is_adopted_and_continued_if_stopped(
    tmp_path: Path, found: str
) -> None:
    hv = FakeHypervisor()
    with stand_ins() as vms:
        async with fake_host(tmp_path, hypervisor=hv, with_manager=True) as host:
            record = write_record(host, S.RUNNING)
            pid = vms.start(record.dir)
            record = record.model_copy(update={"pid": pid})
            cap.write_record(host.settings.state_dir, record)
            hv.left[pid] = LeftVm(guest=FakeGuest(token=TOKEN), state=found)  # type: ignore[arg-type]
            report = await recover(manager(host))
            assert report.running == [record.id]
            assert hv.verbs(record.id) == ["adopt", "resume"]
            vm = hv.vm(record.id)
            assert (vm.pid, vm.state, vm.spec.slot) == (pid, "running", SLOT)
            capsule = host.runtime.get(record.id)
            assert capsule.state == S.RUNNING
            # The run's one envd client, presenting the record's token, serves the manager too.
            assert manager(host).entry(record.id) is capsule
            assert capsule.envd is host.clients[-1]
            assert capsule.envd.access_token == TOKEN
            assert [s.path for s in vm.guest.seen] == ["/health"]  # envd's version
            assert vms.alive(pid)
            assert host.runtime.slots.in_use() == {SLOT}
            await manager(host).destroy(record.id)
            assert not vms.alive(pid)  # killed through the adopted handle


@pytest.mark.parametrize("state", [S.PAUSING, S.SNAPSHOTTING])
async def test_an_interrupted_snapshot_is_cancelled_and_the_guest_runs_on(
    tmp_path: Path, state: CapsuleState
) -> None:
    hv = FakeHypervisor()
    with stand_ins() as vms:
        async with fake_host(tmp_path, hypervisor=hv, with_manager=True) as host:
            record = write_record(host, state, pid=None, snapshot=False, partial=True,
                                  staging=state == S.SNAPSHOTTING)  # fmt: skip
            pid = vms.start(record.dir)
            record = record.model_copy(update={"pid": pid})
            cap.write_record(host.settings.state_dir, record)
            hv.left[pid] = LeftVm(guest=FakeGuest(token=TOKEN), state="paused", saving=True)
            report = await recover(manager(host))
            assert report.running == [record.id]
            assert hv.verbs(record.id) == ["adopt", "cancel_save"]
            vm = hv.vm(record.id)
            assert (vm.state, vm.saving) == ("running", False)
            assert vms.alive(pid)
            after = on_disk(host, record)
            assert after is not None
            assert (after.state, after.snapshot, after.staging) == (S.RUNNING, None, None)
            assert not record.pause_snapshot.with_name("snapshot.state.partial").exists()
            if record.staging is not None:
                assert not record.staging.exists()


# ── paused ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("state", [S.PAUSING, S.RESUMING, S.PAUSED])
async def test_a_complete_snapshot_wins_and_the_vm_is_killed(
    tmp_path: Path, state: CapsuleState
) -> None:
    hv = FakeHypervisor()
    with stand_ins() as vms:
        async with fake_host(tmp_path, hypervisor=hv, with_manager=True) as host:
            record = write_record(host, state, snapshot=True, pending_token="never-set")
            pid = vms.start(record.dir)
            record = record.model_copy(update={"pid": pid})
            cap.write_record(host.settings.state_dir, record)
            report = await recover(manager(host))
            assert report.paused == [record.id]
            assert not vms.alive(pid)
            assert hv.calls == []  # nothing was adopted
            after = on_disk(host, record)
            assert after is not None
            assert (after.state, after.pid, after.slot, after.host_address) == (
                S.PAUSED, None, None, None,
            )  # fmt: skip
            # The snapshot's envd holds the old token: a resume's new one never got there.
            assert (after.access_token, after.pending_token) == (TOKEN, None)
            assert manager(host).state(record.id) == S.PAUSED
            await manager(host).resume(record.id)  # and it resumes
            [init] = hv.vm(record.id).guest.inits
            assert init.token == TOKEN


# ── removed: `error` (or forgotten) ─────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("state", "vm_alive", "snapshot"),
    [
        (S.STARTING, True, None),  # killed, whatever it was doing
        (S.STARTING, False, None),
        (S.RUNNING, False, None),  # the VM exited while the agent was down
        (S.PAUSING, False, False),  # no snapshot, no VM: nothing to go back to
        (S.SNAPSHOTTING, False, None),  # consumed into its template
        (S.RESUMING, True, False),  # its snapshot is missing
    ],
)
async def test_what_cannot_be_taken_back_is_killed_removed_and_listed_as_error(
    tmp_path: Path, state: CapsuleState, vm_alive: bool, snapshot: bool | None
) -> None:
    hv = FakeHypervisor()
    with stand_ins() as vms:
        async with fake_host(tmp_path, hypervisor=hv, with_manager=True) as host:
            record = write_record(host, state, snapshot=snapshot,
                                  staging=state == S.SNAPSHOTTING)  # fmt: skip
            pid = vms.start(record.dir) if vm_alive else None
            if pid is not None:
                record = record.model_copy(update={"pid": pid})
                cap.write_record(host.settings.state_dir, record)
            report = await recover(manager(host))
            assert list(report.failed) == [record.id]
            assert pid is None or not vms.alive(pid)
            assert_gone(host, record)
            assert manager(host).state(record.id) == S.ERROR
            [failed] = host.runtime.capsules()  # listed in ERROR, nothing of it left
            assert (failed.id, failed.run, failed.record.error) == (
                record.id, None, report.failed[record.id],
            )  # fmt: skip
            assert host.runtime.slots.in_use() == set()


async def test_a_template_made_but_never_answered_for_is_removed(tmp_path: Path) -> None:
    """The agent stopped after making a template for a caller but before answering (the note
    `mark_unanswered` left is still there): no control plane knows that template, so its link,
    note and unused versions go. A template that was answered for stays."""
    async with fake_host(tmp_path, with_manager=True) as host:
        root = host.settings.templates_dir
        assert tpl.mark_unanswered(root, "lost")  # noted before it is made
        for name in ("lost", "kept"):
            (root / f".{name}.v-0000").mkdir(parents=True)
            (root / f".{name}.v-0000" / "mem").write_bytes(b"ram")
            (root / name).symlink_to(f".{name}.v-0000")
        assert not tpl.mark_unanswered(root, "kept")  # exists already: never forgotten
        await recover(manager(host))
        assert sorted(p.name for p in root.iterdir()) == [".kept.v-0000", "kept"]


async def test_an_unrecorded_vm_of_a_starting_capsule_is_found_and_killed(
    tmp_path: Path,
) -> None:
    """A QEMU launched in the instant before its pid reached the record: found by the
    capsule directory on its command line."""
    with stand_ins() as vms:
        async with fake_host(tmp_path, with_manager=True) as host:
            record = write_record(host, S.STARTING, pid=None, slot=None)
            pid = vms.start(record.dir)
            report = await recover(manager(host))
            assert list(report.failed) == [record.id]
            assert not vms.alive(pid)
            assert_gone(host, record)


async def test_a_vm_that_cannot_be_taken_back_is_killed(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.fail["adopt"] = VmError("its API socket does not answer")
    with stand_ins() as vms:
        async with fake_host(tmp_path, hypervisor=hv, with_manager=True) as host:
            record = write_record(host, S.RUNNING)
            pid = vms.start(record.dir)
            record = record.model_copy(update={"pid": pid})
            cap.write_record(host.settings.state_dir, record)
            report = await recover(manager(host))
            assert "API socket does not answer" in report.failed[record.id]
            assert not vms.alive(pid)
            assert_gone(host, record)
            assert host.runtime.slots.in_use() == set()


async def test_a_stopping_capsule_is_removed_and_forgotten(tmp_path: Path) -> None:
    with stand_ins() as vms:
        async with fake_host(tmp_path, with_manager=True) as host:
            record = write_record(host, S.STOPPING)
            pid = vms.start(record.dir)
            record = record.model_copy(update={"pid": pid})
            cap.write_record(host.settings.state_dir, record)
            report = await recover(manager(host))
            assert (report.running, report.paused, report.failed) == ([], [], {})
            assert not vms.alive(pid)
            assert_gone(host, record)
            assert manager(host).list_capsules() == ([], [])


async def test_stray_directories_and_their_vms_go(tmp_path: Path) -> None:
    with stand_ins() as vms:
        async with fake_host(tmp_path, with_manager=True) as host:
            stray = cap.records_dir(host.settings.state_dir) / cap.new_capsule_id()
            stray.mkdir()
            pid = vms.start(stray)
            (cap.records_dir(host.settings.state_dir) / "cl-half.json.tmp").write_text("{")
            await recover(manager(host))
            assert not vms.alive(pid)
            assert list(cap.records_dir(host.settings.state_dir).iterdir()) == []


# ── records of an older agent ───────────────────────────────────────────────────────────


async def test_a_record_of_the_older_two_file_format_is_migrated(tmp_path: Path) -> None:
    """Agents before the one-record merge kept team, idle timeout, egress and creation time in
    `<dir>/agent.json`: they are folded into the record (one atomic write), the file goes, and
    the capsule is listed as before."""
    async with fake_host(tmp_path, with_manager=True) as host:
        record = write_record(host, S.PAUSED, slot=None, snapshot=True)
        path = cap.records_dir(host.settings.state_dir) / f"{record.id}.json"
        old = json.loads(path.read_text())
        for name in ("team_id", "idle_timeout_s", "egress", "error"):
            del old[name]  # the old format had none of them
        path.write_text(json.dumps(old))
        legacy = {"team_id": "team-1", "idle_timeout_s": 300, "egress": True,
                  "created_at_unix_ms": 1_700_000_000_000}  # fmt: skip
        (record.dir / "agent.json").write_text(json.dumps(legacy))
        report = await recover(manager(host))
        assert report.paused == [record.id]
        after = on_disk(host, record)
        assert after is not None
        assert (after.team_id, after.idle_timeout_s, after.egress) == ("team-1", 300, True)
        assert int(after.created_at.timestamp() * 1000) == 1_700_000_000_000
        assert not (record.dir / "agent.json").exists()
        view = manager(host).view(record.id)
        assert (view.state, view.team_id, view.idle_timeout_s, view.egress) == (
            S.PAUSED, "team-1", 300, True,
        )  # fmt: skip
        assert view.created_at_unix_ms == 1_700_000_000_000
