"""The VMM driver's pure parts and its small helpers: accelerator choice, QEMU command line,
the QMP client (against a scripted fake QEMU on a unix socket), detached processes, and
confinement (command line, cgroups on a fake cgroupfs, the child's set-up, serial log cap)."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.vmm import process, serial
from nestbox.hostagent.vmm.accel import AccelChoice, choose_accel
from nestbox.hostagent.vmm.base import QmpError, RamSpec, SocketPathTooLong, VmError, VmSpec
from nestbox.hostagent.vmm.cgroups import CFS_PERIOD_US, Cgroups, Limits
from nestbox.hostagent.vmm.confine import Confinement, secure_dirs
from nestbox.hostagent.vmm.qemu import QemuHypervisor
from nestbox.hostagent.vmm.qmp import QmpClient

# ── accelerator ──────────────────────────────────────────────────────────────────────────


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "cpuinfo", tmp_path / "kvm"


@pytest.mark.parametrize(
    ("flags", "kvm", "setting", "expected"),
    [
        ("fpu vmx sse", True, "auto", "kvm"),
        ("fpu svm sse", True, "auto", "kvm"),
        ("fpu sse", True, "auto", "tcg"),  # PVM: /dev/kvm without vmx/svm
        ("fpu vmx", False, "auto", "tcg"),
        ("fpu vmx", True, "tcg", "tcg"),
        ("fpu sse", True, "kvm", "kvm"),
    ],
)
def test_choose_accel(
    host: tuple[Path, Path], flags: str, kvm: bool, setting: str, expected: str
) -> None:
    cpuinfo, kvm_dev = host
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    if kvm:
        kvm_dev.write_text("")
    choice = choose_accel(setting, cpuinfo=cpuinfo, kvm_device=kvm_dev)  # type: ignore[arg-type]
    assert choice.accel == expected
    assert choice.reason


def test_kvm_requested_without_device_fails(host: tuple[Path, Path]) -> None:
    cpuinfo, kvm_dev = host
    cpuinfo.write_text("flags\t: vmx\n")
    with pytest.raises(VmError):
        choose_accel("kvm", cpuinfo=cpuinfo, kvm_device=kvm_dev)


# ── command line ─────────────────────────────────────────────────────────────────────────


def spec(tmp_path: Path, **kw: object) -> VmSpec:
    base: dict[str, object] = {
        "name": "cl-x", "kernel": Path("/k/vmlinux"), "initrd": Path("/k/initrd"),
        "cmdline": "console=ttyS0 quiet", "disk": tmp_path / "disk.qcow2",
        "disk_format": "qcow2", "run_dir": tmp_path / "run", "netns": "nbx-a0-3", "tap": "tap0",
    }  # fmt: skip
    return VmSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_command_runs_in_the_slot_netns(tmp_path: Path) -> None:
    argv = QemuHypervisor(AccelChoice("tcg", "test")).command(spec(tmp_path))
    assert argv[:5] == ["ip", "netns", "exec", "nbx-a0-3", "qemu-system-x86_64"]
    joined = " ".join(argv)
    for part in ("microvm,x-option-roms=off,memory-backend=mem0", "-accel tcg -cpu max",
                 "memory-backend-ram,id=mem0,size=256M", "-no-reboot",
                 "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                 f"-pidfile {tmp_path}/run/vmm.pid", "-append console=ttyS0 quiet"):  # fmt: skip
        assert part in joined
    assert "-incoming" not in argv
    # virtio-mmio slots follow device order: a template and its clones must agree on it
    devices = [argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"]
    assert devices == ["virtio-blk-device", "virtio-rng-device", "virtio-net-device"]


def test_command_for_a_clone(tmp_path: Path) -> None:
    mem = tmp_path / "mem"
    argv = QemuHypervisor(AccelChoice("kvm", "test")).command(
        spec(tmp_path, ram=RamSpec(file=mem, share=False), incoming=True)
    )
    joined = " ".join(argv)
    assert f"memory-backend-file,id=mem0,size=256M,mem-path={mem},share=off" in joined
    assert "-accel kvm -cpu host" in joined
    assert argv[-2:] == ["-incoming", "defer"]


# ── QMP ──────────────────────────────────────────────────────────────────────────────────


async def test_qmp_client(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    received: list[dict[str, object]] = []
    listener = await anyio.create_unix_listener(path)

    async def fake_qemu() -> None:
        async with await listener.accept() as conn:
            reader = BufferedByteReceiveStream(conn)
            await conn.send(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            while True:
                try:
                    line = await reader.receive_until(b"\n", 65536)
                except anyio.EndOfStream:
                    return
                msg = json.loads(line)
                received.append(msg)
                if msg["execute"] == "bad":
                    reply = {"error": {"class": "GenericError", "desc": "no"}}
                else:
                    await conn.send(b'{"event": "STOP", "data": {}}\n')
                    reply = {"return": {"status": "paused"}}
                await conn.send(json.dumps(reply).encode() + b"\n")

    async with anyio.create_task_group() as tg:
        tg.start_soon(fake_qemu)
        qmp = await QmpClient.connect(path)
        assert await qmp.execute("query-status") == {"status": "paused"}
        with pytest.raises(QmpError) as err:
            await qmp.execute("bad")
        assert (err.value.command, err.value.error_class) == ("bad", "GenericError")
        assert qmp.events[0]["event"] == "STOP"
        await qmp.aclose()
        tg.cancel_scope.cancel()
    assert [m["execute"] for m in received] == ["qmp_capabilities", "query-status", "bad"]
    await listener.aclose()


async def test_qmp_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(SocketPathTooLong):
        await QmpClient.connect(tmp_path / ("x" * 120))


# ── processes ────────────────────────────────────────────────────────────────────────────


async def test_detached_process_exit_is_seen(tmp_path: Path) -> None:
    proc = process.launch([sys.executable, "-c", "import time; time.sleep(60)"],
                          output_log=tmp_path / "out.log")  # fmt: skip
    try:
        assert proc.is_running()
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # its own session
        async with anyio.create_task_group() as tg:
            codes: list[int | None] = []

            async def waiter() -> None:
                codes.append(await proc.wait_exit())

            tg.start_soon(waiter)
            tg.start_soon(waiter)  # two waiters at once
            await anyio.wait_all_tasks_blocked()  # both are waiting before the kill
            assert await proc.kill() == -signal.SIGKILL
        assert codes == [-signal.SIGKILL, -signal.SIGKILL]
        assert not proc.is_running()
        proc.send_signal(signal.SIGKILL)  # a no-op once gone
    finally:
        proc.close()


def test_launch_failure_is_a_launch_error(tmp_path: Path) -> None:
    with pytest.raises(VmError) as err:
        process.launch(["/nonexistent/qemu"], output_log=tmp_path / "out.log")
    assert err.value.command == ["/nonexistent/qemu"]  # type: ignore[attr-defined]


# ── confinement: command line ────────────────────────────────────────────────────────────


def confined(tmp_path: Path, cgroups: Cgroups | None = None) -> Confinement:
    return Confinement(
        sandbox=True, uid_base=2_000_000_000, chroot=tmp_path / "jail", cgroups=cgroups,
        memory_overhead_mib=192, pids_max=128, nofile_max=256, rlimits=True,
    )  # fmt: skip


def test_command_of_a_confined_vm(tmp_path: Path) -> None:
    qemu = QemuHypervisor(
        AccelChoice("tcg", "test"), confinement=confined(tmp_path), tb_size_mib=64
    )
    argv = qemu.command(spec(tmp_path, slot=3))
    joined = " ".join(argv)
    assert argv[:5] == ["ip", "netns", "exec", "nbx-a0-3", "qemu-system-x86_64"]
    assert "-runas 2000000003:2000000003" in joined  # uid = gid = base + slot
    assert f"-chroot {tmp_path}/jail" in joined
    sandbox = argv[argv.index("-sandbox") + 1]
    assert sandbox == "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
    assert "-accel tcg,tb-size=64 -cpu max" in joined
    # The serial log is appended to (the agent truncates it), the disk never reopened by path.
    assert f"file,id=serial0,path={tmp_path}/run/serial.log,append=on" in joined
    assert "-serial chardev:serial0" in joined
    assert "cache=unsafe,auto-read-only=off" in joined
    # Two slots, two uids.
    assert "-runas 2000000004:2000000004" in " ".join(qemu.command(spec(tmp_path, slot=4)))


def test_command_unconfined_and_under_kvm(tmp_path: Path) -> None:
    argv = QemuHypervisor(AccelChoice("kvm", "test"), tb_size_mib=64).command(spec(tmp_path))
    assert not {"-runas", "-chroot", "-sandbox"} & set(argv)
    assert "-accel kvm -cpu host" in " ".join(argv)  # no TCG code cache under KVM


def agent_settings(tmp_path: Path, **kw: object) -> AgentSettings:
    return AgentSettings(data_dir=tmp_path / "data", cgroup_root=tmp_path / "cg", **kw)  # type: ignore[arg-type]


def test_probe_says_what_is_off_and_why(tmp_path: Path) -> None:
    off = Confinement.probe(agent_settings(tmp_path, confine=False))
    assert [(i.name, i.on) for i in off.items] == [("confinement", False)]
    assert "confine=false" in off.items[0].detail
    assert off.qemu_args(spec(tmp_path, slot=1)) == []
    # A QEMU that cannot sandbox, a host without cgroups: both off, with the reason.
    weak = Confinement.probe(agent_settings(tmp_path, qemu_binary=str(tmp_path / "no-qemu")))
    items = {i.name: i for i in weak.items}
    assert not items["seccomp"].on
    assert "no-qemu" in items["seccomp"].detail
    assert not items["cgroup"].on
    assert "no cgroup v2" in items["cgroup"].detail
    assert items["runas"].on
    assert items["chroot"].on
    assert weak.cgroups is None
    assert "-sandbox" not in weak.qemu_args(spec(tmp_path, slot=1))


def test_uid_range_must_stay_below_2_to_the_31(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2\\^31"):
        agent_settings(tmp_path, vm_uid_base=2**31 - 100, slot_count=200)


# ── confinement: cgroups (a fake cgroupfs in tmp_path) ───────────────────────────────────


def v1_root(tmp_path: Path, controllers: tuple[str, ...] = ("memory", "cpu", "pids")) -> Path:
    root = tmp_path / "cg"
    for c in controllers:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")
    return root


def test_cgroups_v1_create_limits_and_names(tmp_path: Path) -> None:
    t = Cgroups.detect(v1_root(tmp_path), "nestbox", "a0")
    assert t.version == 1
    assert t.missing == {}
    procs = t.create("cl-x", Limits(memory_bytes=448 << 20, cpus=2, pids=128))
    base = tmp_path / "cg"
    assert procs == [base / c / "nestbox/a0/cl-x/cgroup.procs" for c in ("cpu", "memory", "pids")]
    assert t.read("cl-x", "memory", "memory.limit_in_bytes") == str(448 << 20)
    assert not (base / "memory/nestbox/a0/cl-x/memory.memsw.limit_in_bytes").exists()  # no swap
    assert t.read("cl-x", "cpu", "cpu.cfs_quota_us") == "200000"
    assert t.read("cl-x", "cpu", "cpu.cfs_period_us") == str(CFS_PERIOD_US)
    assert t.read("cl-x", "pids", "pids.max") == "128"
    assert t.names() == {"cl-x"}
    assert t.procs("cl-x") == []  # the fake's procs files do not exist yet


def test_cgroups_v1_missing_controller_is_reported(tmp_path: Path) -> None:
    t = Cgroups.detect(v1_root(tmp_path, ("memory", "cpu")), "nestbox", "a0")
    assert set(t.bases) == {"memory", "cpu"}
    assert "pids" in t.missing
    t.create("cl-x", Limits(memory_bytes=1 << 30, cpus=1, pids=128))
    assert not (tmp_path / "cg/pids").exists()


def test_cgroups_v2_enables_controllers_down_to_the_agent(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "nestbox/a0").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for level in (root, root / "nestbox", root / "nestbox/a0"):
        (level / "cgroup.subtree_control").write_text("")
    (root / "memory.swap.max").write_text("max")  # shows the layout the VM dir gets
    t = Cgroups.detect(root, "nestbox", "a0")
    assert t.version == 2
    assert t.dirs("cl-x") == [root / "nestbox/a0/cl-x"]
    procs = t.create("cl-x", Limits(memory_bytes=448 << 20, cpus=1, pids=100))
    assert procs == [root / "nestbox/a0/cl-x/cgroup.procs"]
    for level in (root, root / "nestbox", root / "nestbox/a0"):
        assert set((level / "cgroup.subtree_control").read_text().split()) == {
            "+memory", "+cpu", "+pids",
        }  # fmt: skip
    assert t.read("cl-x", "memory", "memory.max") == str(448 << 20)
    assert t.read("cl-x", "cpu", "cpu.max") == f"{CFS_PERIOD_US} {CFS_PERIOD_US}"
    assert t.read("cl-x", "pids", "pids.max") == "100"


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    t = Cgroups.detect(tmp_path / "nothing", "nestbox", "a0")
    assert (t.version, t.enabled) == (None, False)
    assert set(t.missing) == {"memory", "cpu", "pids"}
    assert t.names() == set()


def test_a_confined_child_joins_its_cgroup_and_gets_rlimits_before_exec(tmp_path: Path) -> None:
    t = Cgroups.detect(v1_root(tmp_path), "nestbox", "a0")
    confinement = confined(tmp_path, t)
    procs = confinement.prepare(spec(tmp_path, slot=3))
    assert (tmp_path / "jail").is_dir()
    assert not os.listdir(tmp_path / "jail")
    for d in t.dirs("cl-x"):  # cgroupfs makes these; the fake does not
        (d / "cgroup.procs").write_text("")
    argv = confinement.wrap([sys.executable, "-c", "import time; time.sleep(60)"], procs)
    assert argv[:2] == ["sh", "-c"]
    proc = process.launch(argv, output_log=tmp_path / "out.log")
    try:
        proc_dir = Path(f"/proc/{proc.pid}")
        python = sys.executable.encode() + b"\0"
        for _ in range(1000):  # sh, then prlimit, then python: all the same pid
            if (proc_dir / "cmdline").read_bytes().startswith(python):
                break
            time.sleep(0.01)
        for d in t.dirs("cl-x"):
            assert (d / "cgroup.procs").read_text().strip() == str(proc.pid)
        limits = (proc_dir / "limits").read_text()
        assert "Max open files            256                  256" in limits
        assert "Max processes             128                  128" in limits
        assert "Max core file size        0                    0" in limits
        assert "Umask:\t0077" in (proc_dir / "status").read_text()  # QEMU's files are 0600
    finally:
        anyio.run(proc.kill)


async def test_a_failing_cgroup_join_stops_the_vmm_before_it_runs(tmp_path: Path) -> None:
    confinement = confined(tmp_path)
    argv = confinement.wrap([sys.executable, "-c", "print('ran')"], [tmp_path / "no/such/procs"])
    proc = process.launch(argv, output_log=tmp_path / "out.log")
    assert await proc.wait_exit() == 111
    assert "ran" not in proc.output_tail()
    assert "no/such/procs" in proc.output_tail()  # the shell says why


def test_unconfined_launch_is_not_wrapped(tmp_path: Path) -> None:
    assert Confinement.off().wrap(["qemu"], []) == ["qemu"]


# ── confinement: serial log and directory modes ──────────────────────────────────────────


def test_serial_log_rotation_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    cap = 4096
    log.write_bytes(b"a" * 1000)
    assert not serial.needs_rotation(log, cap)  # a quarter of the cap or less
    with log.open("ab") as f:
        f.write(b"b" * 2000 + b"NEWEST")
    assert serial.needs_rotation(log, cap)
    serial.rotate(log, cap)
    old = serial.rotated(log)
    assert log.stat().st_size == 0
    assert old.read_bytes() == (b"a" * 1000 + b"b" * 2000 + b"NEWEST")[-2048:]  # half the cap
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    with log.open("ab") as f:  # what QEMU appends after the truncation lands at the start
        f.write(b"after")
    assert serial.tail(log, 11) == b"NEWESTafter"  # across the two parts
    assert serial.tail(log, 3) == b"ter"
    assert serial.tail(tmp_path / "missing", 10) == b""


def test_secure_dirs_creates_private_and_fixes_loose(tmp_path: Path) -> None:
    loose = tmp_path / "data"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    fixed = secure_dirs([loose, loose / "agents", loose / "agents" / "a0"])
    assert fixed == [f"{loose} was 0755"]
    for d in (loose, loose / "agents", loose / "agents" / "a0"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert secure_dirs([loose]) == []


def test_leftover_cgroups_are_removed_live_ones_kept(tmp_path: Path) -> None:
    t = Cgroups.detect(v1_root(tmp_path), "nestbox", "a0")
    for d in t.dirs("cl-old") + t.dirs("cl-live"):
        d.mkdir(parents=True)  # empty, as cgroupfs lets them be removed
    assert t.remove_leftovers({"cl-live"}) == ["cl-old"]
    assert t.names() == {"cl-live"}
    t.remove("cl-live")
    t.remove("cl-never-made")  # a no-op
    t.remove_agent_dirs()
    assert not (tmp_path / "cg/memory/nestbox/a0").exists()
    assert (tmp_path / "cg/memory/nestbox").exists()  # shared by every agent
