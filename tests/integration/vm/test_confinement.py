"""QEMU confined like Firecracker's jailer, checked on real VMs: own uid, seccomp, no
capabilities, chroot, a cgroup per capsule with its limits, rlimits, a capped serial log and
private file modes; and every later operation (pause, resume, template snapshot) still works.

What each QEMU runs with is read from /proc/<pid>/{status,cgroup,limits,root} and from its
cgroup's control files, never from our own bookkeeping.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from nestbox.hostagent.storage.templates import load_template
from nestbox.hostagent.vmm import confine, serial
from nestbox.hostagent.vmm.cgroups import CFS_PERIOD_US, Cgroups, Limits
from nestbox.hostagent.vmm.confine import CHROOT_DIR
from tests.integration.vm.conftest import open_runtime, vm_cgroups

if TYPE_CHECKING:
    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.settings import AgentSettings

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

MiB = 1 << 20


async def sh(capsule: Capsule, script: str) -> str:
    result = await capsule.envd.exec("sh", ["-c", script], timeout_s=None)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def proc_cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> path, from /proc/<pid>/cgroup (v2's single line under "")."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            found[c] = path
    return found


def tree(settings: AgentSettings) -> Cgroups:
    return Cgroups.detect(settings.cgroup_root, settings.cgroup_parent, settings.agent_id)


def memory_limit(t: Cgroups, name: str) -> int:
    if t.version == 2:
        return int(t.read(name, "memory", "memory.max"))
    return int(t.read(name, "memory", "memory.limit_in_bytes"))


def memory_peak(t: Cgroups, name: str) -> int:
    if t.version == 2:
        return int(t.read(name, "memory", "memory.peak"))
    return int(t.read(name, "memory", "memory.max_usage_in_bytes"))


def cpu_quota(t: Cgroups, name: str) -> tuple[int, int]:
    if t.version == 2:
        quota, period = t.read(name, "cpu", "cpu.max").split()
        return int(quota), int(period)
    return int(t.read(name, "cpu", "cpu.cfs_quota_us")), int(
        t.read(name, "cpu", "cpu.cfs_period_us")
    )


def assert_confined(settings: AgentSettings, capsule: Capsule) -> int:
    """Every confinement measure on `capsule`'s QEMU, as the kernel reports it; its uid."""
    pid, slot = capsule.pid, capsule.record.slot
    assert pid is not None
    assert slot is not None
    st = status(pid)
    uid = settings.vm_uid_base + slot
    assert st["Uid"].split() == [str(uid)] * 4  # real, effective, saved, filesystem
    assert st["Gid"].split() == [str(uid)] * 4
    assert st["Groups"].split() == [str(uid)]  # its own gid only: no supplementary groups
    assert st["Seccomp"] == "2"  # a seccomp filter
    assert int(st["CapEff"], 16) == 0
    assert int(st["CapPrm"], 16) == 0
    assert os.readlink(f"/proc/{pid}/root") == str(settings.state_dir / CHROOT_DIR)
    assert not os.listdir(settings.state_dir / CHROOT_DIR)
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert f"Max open files            {settings.vm_nofile_max}" in limits
    assert f"Max processes             {settings.vm_pids_max}" in limits
    assert "Max core file size        0" in limits
    t = tree(settings)
    assert t.version is not None, t.missing
    own = f"/{settings.cgroup_parent}/{settings.agent_id}/{capsule.id}"
    paths = proc_cgroup_paths(pid)
    for controller in ("memory", "cpu", "pids") if t.version == 1 else ("",):
        assert paths[controller] == own, paths
    memory_mib = capsule.record.machine.memory_mib
    assert memory_limit(t, capsule.id) == (memory_mib + settings.vm_memory_overhead_mib) * MiB
    assert cpu_quota(t, capsule.id) == (capsule.record.machine.vcpus * CFS_PERIOD_US, CFS_PERIOD_US)
    assert int(t.read(capsule.id, "pids", "pids.max")) == settings.vm_pids_max
    return uid


async def test_a_capsule_runs_confined_and_its_cgroup_goes_with_it(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        assert_confined(vm, capsule)
        # The guest works as before: disk writes, processes, the network to envd.
        assert (await sh(capsule, "echo ok > /root/f && sync && cat /root/f")).strip() == "ok"
        assert vm_cgroups(vm)
        await runtime.destroy(capsule.id)
        assert vm_cgroups(vm) == []


async def test_two_running_capsules_have_different_uids(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        clones = await runtime.clone("minimal", 2)
        uids = {assert_confined(vm, c) for c in clones}
        assert len(uids) == 2


async def test_a_guest_filling_its_ram_stays_within_its_cgroup(vm: AgentSettings) -> None:
    fill = "python3 -c '\nx = []\nwhile True: x.append(b\"\\x01\" * (8 << 20))\n'; echo exit=$?"
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        assert capsule.pid is not None
        t = tree(vm)
        limit = memory_limit(t, capsule.id)
        with anyio.fail_after(120):
            out = await sh(capsule, fill)
        assert "exit=137" in out  # the guest's own OOM killer ended the hog (SIGKILL)
        peak = memory_peak(t, capsule.id)
        hwm_kib = int(status(capsule.pid)["VmHWM"].split()[0])
        # The guest RAM it touched is charged to this capsule's cgroup, which held the limit.
        assert 200 * MiB < peak <= limit, (peak, limit)
        assert hwm_kib * 1024 <= limit
        # ... and nothing else suffered: the VM and envd run on.
        assert (await sh(capsule, "echo alive")).strip() == "alive"
        assert status(capsule.pid)["State"][0] in "RS"


async def test_pause_resume_and_template_snapshot_stay_confined(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        await sh(capsule, "echo kept > /root/kept && sync")
        await runtime.pause(capsule.id)
        assert vm_cgroups(vm) == []  # the VM is gone, and its cgroup with it
        assert stat.S_IMODE(capsule.record.dir.joinpath("snapshot.state").stat().st_mode) == 0o600
        await runtime.resume(capsule.id)
        assert_confined(vm, capsule)
        assert (await sh(capsule, "cat /root/kept")).strip() == "kept"
        await runtime.pause(capsule.id)  # a resumed (restored) VM saves again
        await runtime.resume(capsule.id)
        template = await runtime.snapshot_template(capsule.id, "confined")
        assert vm_cgroups(vm) == []
        for path in (template.dir.disk, template.dir.state, template.dir.meta_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(template.dir.root.stat().st_mode) == 0o700
        [child] = await runtime.clone("confined")
        assert_confined(vm, child)
        assert (await sh(child, "cat /root/kept")).strip() == "kept"


async def test_capsule_files_are_private(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        record = capsule.record
        for d in (vm.data_dir, vm.state_dir, vm.templates_dir, record.dir, record.run_dir):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        run = record.run_dir
        for f in (record.disk, run / "serial.log", run / "vmm.log", run / "vmm.pid"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        mem = load_template(vm.templates_dir, "minimal").dir.mem  # QEMU made it (umask 077)
        assert stat.S_IMODE(mem.stat().st_mode) == 0o600


async def test_the_serial_log_stays_under_its_cap_when_the_guest_floods_it(
    vm: AgentSettings,
) -> None:
    cap = vm.serial_log_max_bytes
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        log = capsule.record.run_dir / "serial.log"
        largest = 0

        async def watch() -> None:
            nonlocal largest
            while True:
                sizes = [p.stat().st_size for p in (log, serial.rotated(log)) if p.exists()]
                largest = max(largest, sum(sizes))
                await anyio.sleep(0.05)

        # ~2.7 MB of console output (~20 s of UART emulation under TCG), then a marker.
        flood = "head -c 2000000 /dev/urandom | base64 > /dev/ttyS0; echo END-OF-FLOOD > /dev/ttyS0"
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            with anyio.fail_after(150):
                await sh(capsule, flood)
            await anyio.sleep(2 * serial.CHECK_INTERVAL_S)
            tg.cancel_scope.cancel()
        assert serial.rotated(log).exists()  # it did rotate ...
        assert 0 < largest <= cap, (largest, cap)  # ... and never held more than the cap
        assert b"END-OF-FLOOD" in serial.tail(log, 4096)  # the newest output is kept


def test_recovery_removes_leftover_cgroups_and_kills_what_runs_in_them(
    vm: AgentSettings,
) -> None:
    """A VM cgroup of this agent that no running capsule owns (an agent killed mid-create, a
    removal that failed) goes at start-up, with any process left in it (an orphan VMM)."""
    t = tree(vm)
    procs = t.create("cl-orphan", Limits(memory_bytes=64 * MiB, cpus=1, pids=16))
    orphan = subprocess.Popen(confine.Confinement.off().wrap(["sleep", "600"], procs))
    try:
        deadline = time.monotonic() + 10
        while t.procs("cl-orphan") != [orphan.pid] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.procs("cl-orphan") == [orphan.pid]
        live = t.names() - {"cl-orphan"}
        assert confine.remove_leftover_cgroups(vm, live) == ["cl-orphan"]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert "cl-orphan" not in t.names()
        assert not any(d.exists() for d in t.dirs("cl-orphan"))
    finally:
        orphan.kill()
        orphan.wait()
        t.remove("cl-orphan")
