"""`kill -9` of the host agent in the middle of create, resume, pause and template snapshot,
with real QEMU and a real agent process, then a restart: start-up recovery adopts or cleans
what the interrupted operation left.

Each operation is stalled deterministically without any hook in the agent: the capsule's QEMU
is stopped (SIGSTOP) as soon as it exists (create, resume) or before the operation starts (pause,
template: the agent records the new state before it asks QEMU anything, then waits on QMP), so
the agent waits inside the operation; the test waits until the record shows it there. The agent
is then killed, the QEMU continued (SIGCONT) and the agent restarted. Two states of the pause
that no stall reaches (the migration finished but not renamed; renamed but the record not yet
PAUSED) are made by doing the agent's save over QMP while it is dead.
Afterwards: no QEMU names the capsule unless it is the adopted VM, nothing of the slot is left
(netns, links, routes, rules), the agent lists the capsule in the state recovery decided, and a
capsule that survived still has the file written before the crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import CapsuleRecord, CapsuleState, MachineRecord, new_capsule_id
from nestbox.hostagent.vmm.qmp import QmpClient
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import wait_until as poll
from tests.integration.vm.agent_process import agent_leftovers, reset_agent
from tests.integration.vm.conftest import qemu_pids

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    from tests.integration.vm.agent_process import AgentProcess, Rpc

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

RUNNING, PAUSED, ERROR = pb.CapsuleState.RUNNING, pb.CapsuleState.PAUSED, pb.CapsuleState.ERROR
NETWORK = ("netns", "links", "routes", "rules")
STALL_S = 30.0
PREPARE_GAVE_UP = "snapshot/prepare failed, snapshotting anyway"
"""What the agent logs when a pause's prepare got no answer in time (`lifecycle._prepare_guest`)."""


STOPPED: list[int] = []
"""QEMUs a test stopped (a failed test may leave one stopped: the fixture continues it)."""


@pytest.fixture(autouse=True)
def _no_capsule_left(agent: AgentProcess) -> Iterator[None]:
    yield
    print(agent.log_tail(6000))  # shown when the test failed
    for pid in STOPPED:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    STOPPED.clear()
    reset_agent(agent)


def capsule_dir(agent: AgentProcess, cid: str) -> Path:
    return agent.settings.state_dir / "capsules" / cid


def record(agent: AgentProcess, cid: str) -> dict[str, Any]:
    """The capsule's record as on disk ({} if there is none)."""
    try:
        text = (agent.settings.state_dir / "capsules" / f"{cid}.json").read_text()
    except FileNotFoundError:
        return {}
    result: dict[str, Any] = json.loads(text)
    return result


def sigstop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    STOPPED.append(pid)


def wait_until(what: str, check: Callable[[], Any], within: float = STALL_S) -> Any:
    """`tests.conftest.wait_until`, polling every 0.5 ms: the point to catch may be
    milliseconds wide."""
    return poll(check, within=within, every=0.0005, what=what)


def stop_new_qemu(cdir: Path, old: set[int]) -> int:
    """SIGSTOP the first QEMU naming `cdir` that is not in `old`, as soon as it exists."""
    pid: int = wait_until(
        f"a QEMU of {cdir.name}", lambda: next(iter(set(qemu_pids(cdir)) - old), None)
    )
    sigstop(pid)
    return pid


async def crash_during(
    agent: AgentProcess,
    operation: Awaitable[object],
    stall: Callable[[], int],
    *,
    restart: bool = True,
) -> int:
    """Start `operation` (an RPC), run `stall` in a thread (it returns the pid of the
    capsule's QEMU, stopped, once the agent is stuck inside the operation), `kill -9` the
    agent, continue the QEMU and restart the agent. Returns the QEMU's pid."""
    failure: list[BaseException] = []

    async def call() -> None:
        try:
            await operation
        except Exception as err:  # the agent died under it
            failure.append(err)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        pid = await anyio.to_thread.run_sync(stall)
        agent.kill()
    assert failure, "the operation completed: the stall did not hold it"
    os.kill(pid, signal.SIGCONT)
    if restart:
        await anyio.to_thread.run_sync(agent.start)
    return pid


def assert_no_network_left(agent: AgentProcess, cid: str, adopted: int | None) -> None:
    """Nothing of a slot is left unless `adopted` (the re-adopted VM) runs in it, and no QEMU
    names the capsule but `adopted`."""
    assert qemu_pids(capsule_dir(agent, cid)) == ([adopted] if adopted else [])
    if adopted is None:
        # No waiting: recovery removes what no capsule holds before the agent serves.
        left = agent_leftovers(agent.settings, within=0)
        kinds = (*NETWORK, "processes")
        assert {k: left[k] for k in kinds} == {k: [] for k in kinds}, left


def alive(pid: int) -> bool:
    """`pid` runs (a zombie or a recycled pid running something else does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu" in f.read().split(b"\0")[0]
    except OSError:
        return False


async def make_capsule(rpc: Rpc, text: str) -> str:
    cid = (await rpc.create()).capsule_id
    await rpc.out(cid, f"echo {text} > /root/mine && sync")
    return cid


async def test_kill_during_create_kills_and_cleans_the_vm(agent: AgentProcess) -> None:
    cid = new_capsule_id()
    cdir = capsule_dir(agent, cid)

    def stall() -> int:
        pid = stop_new_qemu(cdir, set())
        # The agent wrote the pid before waiting on the VM: it is stuck connecting to QMP.
        wait_until("the pid in the record", lambda: record(agent, cid).get("pid") == pid)
        assert record(agent, cid)["state"] == "starting"
        return pid

    async with agent.connect() as rpc:
        pid = await crash_during(agent, rpc.create(capsule_id=cid), stall)
    assert not alive(pid)
    assert not cdir.exists()
    assert record(agent, cid) == {}
    assert_no_network_left(agent, cid, None)
    async with agent.connect() as rpc:
        listed = await rpc.capsules()
        assert listed[cid].state == ERROR, listed[cid]
        assert "starting" in listed[cid].error
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))
        assert cid not in await rpc.capsules()
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


async def test_kill_during_resume_rolls_back_to_paused(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = await make_capsule(rpc, "before-resume")
        await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
    cdir = capsule_dir(agent, cid)
    assert qemu_pids(cdir) == []

    def stall() -> int:
        pid = stop_new_qemu(cdir, set())
        wait_until("the pid in the record", lambda: record(agent, cid).get("pid") == pid)
        assert record(agent, cid)["state"] == "resuming"
        return pid

    async with agent.connect() as rpc:
        request = pb.ResumeCapsuleRequest(capsule_id=cid)
        pid = await crash_during(agent, rpc.resume_capsule(request), stall)
    assert not alive(pid)
    assert_no_network_left(agent, cid, None)
    saved = record(agent, cid)
    assert (saved["state"], saved["pid"], saved["slot"]) == ("paused", None, None)
    assert (cdir / "snapshot.state").exists()
    async with agent.connect() as rpc:
        assert (await rpc.capsules())[cid].state == PAUSED
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        assert await rpc.out(cid, "cat /root/mine") == "before-resume\n"
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


async def test_kill_before_the_pause_snapshot_keeps_the_vm_running(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = await make_capsule(rpc, "before-pause")
    [pid] = qemu_pids(capsule_dir(agent, cid))

    def stall() -> int:
        # The VM was stopped first; the record says PAUSING before the agent asks QEMU
        # anything, and then the agent is stuck setting the migration up (QMP): the snapshot
        # cannot begin.
        wait_until("the pausing record", lambda: record(agent, cid).get("state") == "pausing")
        return pid

    sigstop(pid)

    async with agent.connect() as rpc:
        await crash_during(agent, rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid)), stall)
    await assert_adopted_and_usable(agent, cid, pid, "before-pause")


async def test_kill_before_the_pause_snapshot_was_renamed_continues_the_vm(
    agent: AgentProcess,
) -> None:
    """The migration completed into the partial file but the agent died before renaming it:
    that is not the capsule's snapshot. Recovery continues the stopped VM (`cont` also takes
    the disk back from the finished migration) and removes the partial file; the guest runs
    on and its disk still takes writes. Made by stalling the pause before its save, then, with
    the agent dead, doing the save over QMP as the agent would have, without the rename."""
    async with agent.connect() as rpc:
        cid = await make_capsule(rpc, "migrated")
    cdir = capsule_dir(agent, cid)
    [pid] = qemu_pids(cdir)

    gave_up = PREPARE_GAVE_UP.encode()
    before = agent.log_path.read_bytes().count(gave_up)

    def stall() -> int:
        wait_until("the pausing record", lambda: record(agent, cid).get("state") == "pausing")
        wait_until("the prepare given up",  # (as below: never save a guest mid-prepare)
                   lambda: agent.log_path.read_bytes().count(gave_up) > before)  # fmt: skip
        return pid

    sigstop(pid)  # the pause is then stuck setting up its migration (QMP), as above

    async with agent.connect() as rpc:
        pause = rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
        await crash_during(agent, pause, stall, restart=False)
    await save_as_the_agent_would(cdir, rename=False)
    await anyio.to_thread.run_sync(agent.start)
    assert not (cdir / "snapshot.state.partial").exists()
    async with agent.connect() as rpc:
        await rpc.out(cid, "echo migrated > /root/mine && sync")  # the disk is writable again
    await assert_adopted_and_usable(agent, cid, pid, "migrated")


async def test_kill_after_the_pause_snapshot_completed_is_paused(agent: AgentProcess) -> None:
    """The window between the snapshot's rename and the PAUSED record: the VM still exists
    (stopped after its migration), the record says PAUSING, the snapshot is complete. Made by
    stalling the pause before its save, then, with the agent dead, doing the save over QMP as
    the agent would have (migration into the partial file, fsync, rename)."""
    async with agent.connect() as rpc:
        cid = await make_capsule(rpc, "snapshot-done")
        host_ip = (await rpc.capsules())[cid].host_ip
    cdir = capsule_dir(agent, cid)
    [pid] = qemu_pids(cdir)

    gave_up = PREPARE_GAVE_UP.encode()
    before = agent.log_path.read_bytes().count(gave_up)

    def stall() -> int:
        wait_until("the pausing record", lambda: record(agent, cid).get("state") == "pausing")
        # The record is written while envd prepares: the save (made below, as the agent would
        # have) must not start before the prepare is over (here: given up on, the guest being
        # stopped), or it would catch envd mid-prepare, which the agent never does.
        wait_until("the prepare given up",
                   lambda: agent.log_path.read_bytes().count(gave_up) > before)  # fmt: skip
        return pid

    sigstop(pid)  # the pause is then stuck setting up its migration (QMP), as above

    async with agent.connect() as rpc:
        pause = rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
        await crash_during(agent, pause, stall, restart=False)
    assert record(agent, cid)["state"] == "pausing"
    # The dead agent's prepare reached the guest once it was continued; envd runs it (its sync
    # on the event loop). Save only once envd answers again, as the agent's own save never
    # catches a guest inside that sync (restored there, this guest never answered again).
    poll(lambda: envd_answers(host_ip), within=STALL_S, what="envd answering after the prepare")
    await save_as_the_agent_would(cdir, rename=True)
    await anyio.to_thread.run_sync(agent.start)
    assert not alive(pid)
    assert_no_network_left(agent, cid, None)
    saved = record(agent, cid)
    assert (saved["state"], saved["pid"], saved["ram"]) == ("paused", None, "anonymous")
    async with agent.connect() as rpc:
        assert (await rpc.capsules())[cid].state == PAUSED
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        assert await rpc.out(cid, "cat /root/mine") == "snapshot-done\n"
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


def envd_answers(host_ip: str) -> bool:
    """envd's /health answers a new connection (its event loop is not inside a sync)."""
    try:
        with socket.create_connection((host_ip, 49983), timeout=5) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: envd\r\nConnection: close\r\n\r\n")
            return raw.recv(4096).startswith(b"HTTP/1.1 2")
    except OSError:
        return False


async def save_as_the_agent_would(cdir: Path, *, rename: bool) -> None:
    """The pause's save, over the VM's QMP socket: full-RAM migration into the partial file,
    then fsync and (if `rename`) rename into place, as `lifecycle.save` does. Ends with the
    VM stopped after its migration."""
    partial, final = cdir / "snapshot.state.partial", cdir / "snapshot.state"
    qmp = await QmpClient.connect(cdir / "run" / "qmp.sock")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        caps = [{"capability": "x-ignore-shared", "state": False}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
        await qmp.execute("stop")
        await qmp.execute_with_fd("getfd", {"fdname": "state"}, fd)
        await qmp.execute("migrate", {"uri": "fd:state"})
        with anyio.fail_after(STALL_S):
            # Not `query-migrate`: a clone's says "completed" (its incoming restore) already.
            while (await qmp.execute("query-status"))["status"] != "postmigrate":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert (await qmp.execute("query-migrate"))["status"] == "completed"
        os.fsync(fd)
    finally:
        os.close(fd)
        await qmp.aclose()
    assert os.stat(partial).st_size > 1 << 20
    if rename:
        os.replace(partial, final)


async def test_kill_during_template_snapshot_keeps_the_vm_running(agent: AgentProcess) -> None:
    template_id = "crash-" + new_capsule_id()[-8:]
    async with agent.connect() as rpc:
        cid = await make_capsule(rpc, "before-template")
    [pid] = qemu_pids(capsule_dir(agent, cid))

    def stall() -> int:
        # The staging directory is recorded before the agent asks QEMU anything.
        wait_until("the staging directory in the record", lambda: record(agent, cid).get("staging"))
        return pid

    sigstop(pid)

    staging = None
    async with agent.connect() as rpc:
        request = pb.CreateTemplateRequest(capsule_id=cid, template_id=template_id)

        def stall_and_remember() -> int:
            nonlocal staging
            stopped = stall()
            staging = record(agent, cid)["staging"]
            return stopped

        await crash_during(agent, rpc.create_template(request), stall_and_remember)
    assert staging is not None
    assert not await anyio.Path(staging).exists()
    assert not (agent.settings.templates_dir / template_id).exists()
    await assert_adopted_and_usable(agent, cid, pid, "before-template")


async def assert_adopted_and_usable(agent: AgentProcess, cid: str, pid: int, text: str) -> None:
    """The same VM was re-adopted running, it is the only QEMU of the capsule, it still has its
    file, and it pauses and resumes with it; destroyed afterwards, nothing is left."""
    assert_no_network_left(agent, cid, pid)
    saved = record(agent, cid)
    assert (saved["state"], saved["pid"], saved["snapshot"]) == ("running", pid, None)
    assert sorted(p.name for p in capsule_dir(agent, cid).iterdir() if "snapshot" in p.name) == []
    async with agent.connect() as rpc:
        assert (await rpc.capsules())[cid].state == RUNNING
        assert await rpc.out(cid, "cat /root/mine") == f"{text}\n"
        await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
        assert not alive(pid)
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        assert await rpc.out(cid, "cat /root/mine") == f"{text}\n"
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


async def test_recovery_finds_unrecorded_vms_and_never_kills_a_recycled_pid(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """What the record cannot say: a VM launched in the instant before its pid reached the
    record (found by its command line naming the capsule's directory), a stray directory's VM,
    and a recorded pid that now belongs to another program (never signalled). Stand-ins for
    QEMU are processes whose argv[0] says qemu."""
    agent.kill()
    state_dir = agent.settings.state_dir
    starting = fake_record(state_dir, CapsuleState.STARTING, pid=None)
    recycled = other_program()
    slot = agent.settings.slot_first
    running = fake_record(state_dir, CapsuleState.RUNNING, pid=recycled.pid, slot=slot)
    stray_dir = state_dir / "capsules" / new_capsule_id()
    stray_dir.mkdir()
    elsewhere = tmp_path / "capsules" / starting.id  # another agent's capsule of the same id
    procs = {
        "unrecorded": fake_qemu(starting.disk),
        "stray": fake_qemu(stray_dir / "disk.qcow2"),
        "elsewhere": fake_qemu(elsewhere / "disk.qcow2"),
    }
    try:
        await anyio.to_thread.run_sync(agent.start)
        assert procs["unrecorded"].wait(10) == -signal.SIGKILL
        assert procs["stray"].wait(10) == -signal.SIGKILL
        assert procs["elsewhere"].poll() is None
        assert recycled.poll() is None
        assert not starting.dir.exists()
        assert not stray_dir.exists()
        async with agent.connect() as rpc:
            listed = await rpc.capsules()
        assert {cid: c.state for cid, c in listed.items()} == {
            starting.id: ERROR,
            running.id: ERROR,
        }
        assert "gone" in listed[running.id].error
    finally:
        for proc in (*procs.values(), recycled):
            proc.kill()
            proc.wait(10)


def fake_record(
    state_dir: Path, state: CapsuleState, pid: int | None, slot: int | None = None
) -> CapsuleRecord:
    cid = new_capsule_id()
    cdir = state_dir / "capsules" / cid
    (cdir / "run").mkdir(parents=True)
    machine = MachineRecord(kernel=cdir / "vmlinux", initrd=None, cmdline="", vcpus=1,
                            memory_mib=256, image_version="test")  # fmt: skip
    record = CapsuleRecord(id=cid, template_id="minimal", state=state, machine=machine,
                           ram="anonymous", dir=cdir, disk=cdir / "disk.qcow2", pid=pid,
                           slot=slot)  # fmt: skip
    cap.write_record(state_dir, record)
    return record


def other_program() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


def fake_qemu(disk: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like a capsule's QEMU using `disk`."""
    return subprocess.Popen(
        ["qemu-system-x86_64", "-c", "import time; time.sleep(600)", f"file={disk}"],
        executable=sys.executable,
    )
