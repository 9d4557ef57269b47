"""The VMM driver's pure parts and its small helpers: accelerator choice, QEMU command line,
the QMP client (against a scripted fake QEMU on a unix socket) and detached processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from nestbox.hostagent.vmm import process
from nestbox.hostagent.vmm.accel import AccelChoice, choose_accel
from nestbox.hostagent.vmm.base import QmpError, RamSpec, SocketPathTooLong, VmError, VmSpec
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
            await anyio.sleep(0.1)
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
