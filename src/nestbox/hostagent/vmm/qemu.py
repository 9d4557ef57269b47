"""The QEMU `microvm` driver: command line, launch and adoption, and over QMP (which nothing
outside this driver sees) pause (`stop`), resume (`cont`), snapshot (save, cancel) and restore.

Snapshots are outgoing migrations into a file and restores incoming migrations from one
(QEMU 7.2 has no `file:` URI). Both go through `fd:` with the file descriptor passed over the
QMP socket (`getfd`): QEMU then writes the file itself, so "completed" means every byte is in it.
With `exec:cat > FILE`, `query-migrate` reports "completed" while `cat` may still be draining
the pipe.

Guest RAM is always the named backend `mem0` (anonymous or file-backed), because migration
matches RAM blocks by name: a clone whose RAM maps the template's file must be able to save a
snapshot that a VM with anonymous RAM restores.

Every QEMU is confined (`confine.py`: seccomp, its own uid, an empty chroot, its own cgroup,
rlimits), so after start-up it can open no path: everything it needs later (migration files)
arrives as a file descriptor over QMP. Its serial log is kept bounded while it runs
(`supervise`, `serial.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from nestbox.hostagent.vmm import process, serial
from nestbox.hostagent.vmm.base import (
    Accel,
    LaunchHook,
    MigrationFailed,
    SaveResult,
    VmError,
    VmExited,
    VmHandle,
    VmLaunchError,
    VmSpec,
    VmStats,
)
from nestbox.hostagent.vmm.confine import Confinement
from nestbox.hostagent.vmm.qmp import QmpClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.vmm.accel import AccelChoice
    from nestbox.hostagent.vmm.process import VmProcess

log = logging.getLogger(__name__)

POLL_S = 0.002
"""QMP socket appearing, `query-status` during a restore, `query-migrate` during a save: QMP has
no blocking wait, and a capsule's start, restore and pause wait on these polls."""
MAX_BANDWIDTH = 64 << 30
"""Bytes/s. QEMU 7.2 defaults to 128 MiB/s, which makes a file snapshot 8x slower."""
MIGRATING = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"})
"""`query-migrate` statuses of a migration still under way."""


@dataclass(eq=False, slots=True)
class QemuVm(VmHandle):
    """A QEMU process and its QMP session, which only this driver talks over."""

    process: VmProcess
    qmp: QmpClient
    save_set_up: bool | None = None
    """The `ignore_shared` that `prepare_save` set the next save up for, if any."""


class QemuHypervisor:
    """Runs capsules as `qemu-system-x86_64 -M microvm` processes, each inside its slot's netns."""

    def __init__(
        self,
        accel: AccelChoice,
        *,
        binary: str = "qemu-system-x86_64",
        confinement: Confinement | None = None,
        tb_size_mib: int = 0,
        serial_max_bytes: int = 1 << 20,
    ) -> None:
        self._accel = accel
        self.binary = binary
        self.confinement = confinement or Confinement.off()
        self.tb_size_mib = tb_size_mib
        self.serial_max_bytes = serial_max_bytes

    @classmethod
    def from_settings(cls, accel: AccelChoice, settings: AgentSettings) -> QemuHypervisor:
        """The driver as `settings` configure it, confinement probed on this host (blocking,
        ~25 ms; once at start-up), with a WARNING for each measure the host lacks."""
        confinement = Confinement.probe(settings)
        confinement.warn_missing()
        return cls(
            accel, binary=settings.qemu_binary, confinement=confinement,
            tb_size_mib=settings.vm_tcg_tb_size_mib, serial_max_bytes=settings.serial_log_max_bytes,
        )  # fmt: skip

    @property
    def accel(self) -> Accel:
        return self._accel.accel

    def command(self, spec: VmSpec) -> list[str]:
        """The full argv, `ip netns exec` prefix included."""
        argv = [
            self.binary, "-name", spec.name,
            "-M", "microvm,x-option-roms=off,memory-backend=mem0",
            *self._accel.qemu_args(tb_size_mib=self.tb_size_mib),
            "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M",
            "-object", _memory_backend(spec),
            # -no-reboot: a guest panic (panic=-1) or reboot ends QEMU, which we notice.
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(spec.kernel), "-append", spec.cmdline,
            # append=on: the agent truncates the log to keep it bounded (`serial.py`).
            "-chardev", f"file,id=serial0,path={spec.serial_log},append=on",
            "-serial", "chardev:serial0",
            "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
            "-pidfile", str(spec.pidfile),
            # cache=unsafe: no host fsync per guest flush; a capsule disk need not survive a
            # host crash, and every snapshot ends with QEMU writing out its qcow2 metadata.
            # auto-read-only=off: a migration's end drops the write permission and its start
            # takes it back; with -drive's default (on) QEMU then reopens the image by path,
            # which fails once it is chrooted and unprivileged.
            "-drive", f"id=root,file={spec.disk},format={spec.disk_format},if=none,"
                      "cache=unsafe,auto-read-only=off",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-rng-device",
        ]  # fmt: skip
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.tap is not None:
            argv += [
                "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={spec.mac}",
            ]  # fmt: skip
        if spec.incoming:
            argv += ["-incoming", "defer"]
        argv += self.confinement.qemu_args(spec)
        if spec.netns is not None:
            argv = ["ip", "netns", "exec", spec.netns, *argv]
        return argv

    async def launch(self, spec: VmSpec, *, on_launch: LaunchHook | None = None) -> VmHandle:
        spec.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in (spec.qmp_socket, spec.pidfile):
            stale.unlink(missing_ok=True)
        argv = self.command(spec)
        try:
            procs = await anyio.to_thread.run_sync(self.confinement.prepare, spec)
            argv = self.confinement.wrap(argv, procs)
            proc = process.launch(argv, output_log=spec.output_log)
        except BaseException as err:
            with anyio.CancelScope(shield=True):
                await self._release(spec)
            if isinstance(err, OSError):
                raise VmLaunchError(
                    "cannot confine the VMM", command=argv, exit_code=None, output_tail=str(err)
                ) from err
            raise
        try:
            if on_launch is not None:
                await on_launch(proc.pid)
            qmp = await _connect_qmp(spec.qmp_socket, proc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await proc.kill()
                await self._release(spec)
            raise
        _check_pidfile(spec, proc)
        return QemuVm(spec=spec, pid=proc.pid, process=proc, qmp=qmp)

    async def adopt(self, spec: VmSpec, process: VmProcess) -> VmHandle:
        try:
            qmp = await QmpClient.connect(spec.qmp_socket)
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as err:
            raise VmError(f"the VM's QMP socket does not answer: {err!r}") from err
        return QemuVm(spec=spec, pid=process.pid, process=process, qmp=qmp)

    async def restore(self, vm: VmHandle, state_file: Path, *, ignore_shared: bool) -> None:
        q = _qemu(vm)
        fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await _set_ignore_shared(q.qmp, ignore_shared)
            await q.qmp.execute_with_fd("getfd", {"fdname": "state"}, fd)
            await q.qmp.execute("migrate-incoming", {"uri": "fd:state"})
            status = await _wait_incoming(q.qmp)
            if status == "running":
                return  # saved live (a fork's source ran on): QEMU started it as it was
            if status != "paused":
                raise MigrationFailed("restore", status, "the guest did not end paused")
            await q.qmp.execute("cont")
        except (anyio.EndOfStream, anyio.BrokenResourceError) as err:
            # A failed incoming migration makes QEMU exit; its output says why.
            await q.process.wait_exit()
            raise MigrationFailed("restore", "exited", q.process.output_tail()) from err
        finally:
            os.close(fd)

    async def prepare_save(self, vm: VmHandle, *, ignore_shared: bool) -> None:
        q = _qemu(vm)
        q.save_set_up = None
        async with _exits_as_error(q):
            await _set_ignore_shared(q.qmp, ignore_shared)
            await q.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        q.save_set_up = ignore_shared

    async def pause(self, vm: VmHandle) -> None:
        q = _qemu(vm)
        async with _exits_as_error(q):
            await q.qmp.execute("stop")

    async def resume(self, vm: VmHandle) -> None:
        q = _qemu(vm)
        async with _exits_as_error(q):
            status: str = (await q.qmp.execute("query-status"))["status"]
            if status != "running":
                log.info("continuing a VM found %s", status, extra={"pid": q.pid})
                await q.qmp.execute("cont")

    async def save(self, vm: VmHandle, state_file: Path, *, ignore_shared: bool) -> SaveResult:
        q = _qemu(vm)
        fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            async with _exits_as_error(q):
                if q.save_set_up is not ignore_shared:
                    await self.prepare_save(q, ignore_shared=ignore_shared)
                q.save_set_up = None
                await q.qmp.execute_with_fd("getfd", {"fdname": "state"}, fd)
                await q.qmp.execute("migrate", {"uri": "fd:state"})
                info = await _wait_migration(q.qmp)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        downtime = info.get("downtime")
        return SaveResult(
            state_bytes=size, downtime_ms=int(downtime) if downtime is not None else None
        )

    async def cancel_save(self, vm: VmHandle) -> None:
        # A migration may still be writing, or may have completed into a file the caller will
        # never use: either way it is cancelled (waited for) and `cont` also takes the disk
        # back from a completed one.
        q = _qemu(vm)
        async with _exits_as_error(q):
            migration: dict[str, Any] = await q.qmp.execute("query-migrate")
            if migration.get("status") in MIGRATING:
                log.info("cancelling a snapshot under way", extra={"pid": q.pid})
                await q.qmp.execute("migrate_cancel")
                while (await q.qmp.execute("query-migrate")).get("status") in MIGRATING:  # noqa: ASYNC110
                    await anyio.sleep(POLL_S)
        await self.resume(q)

    async def kill(self, vm: VmHandle) -> int | None:
        q = _qemu(vm)
        code = await q.process.kill()
        await q.qmp.aclose()
        for path in (q.spec.qmp_socket, q.spec.pidfile):
            path.unlink(missing_ok=True)
        await self._release(q.spec)
        return code

    async def supervise(self, vm: VmHandle) -> int | None:
        q = _qemu(vm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._cap_serial_log, q.spec.serial_log)
            code = await q.process.wait_exit()
            tg.cancel_scope.cancel()
        return code

    def stats(self, vm: VmHandle) -> VmStats | None:
        return _qemu(vm).process.stats()

    async def _cap_serial_log(self, path: Path) -> None:
        """Keep the serial log under its cap (`serial.py`): a `stat` per interval."""
        while True:
            await anyio.sleep(serial.CHECK_INTERVAL_S)
            if serial.needs_rotation(path, self.serial_max_bytes):
                await anyio.to_thread.run_sync(serial.rotate, path, self.serial_max_bytes)

    async def _release(self, spec: VmSpec) -> None:
        """Remove the VM's cgroup (its VMM has exited or never started); logged, not raised:
        start-up recovery removes what is left."""
        try:
            await anyio.to_thread.run_sync(self.confinement.release, spec.name)
        except OSError as err:
            log.error("cannot remove the cgroup of %s: %s", spec.name, err)


def _qemu(vm: VmHandle) -> QemuVm:
    if not isinstance(vm, QemuVm):
        raise TypeError(f"not a QEMU VM: {vm!r}")
    return vm


@contextlib.asynccontextmanager
async def _exits_as_error(vm: QemuVm) -> AsyncIterator[None]:
    """QMP's socket closing (QEMU exited) raised as `VmExited`, with QEMU's last output."""
    try:
        yield
    except (anyio.EndOfStream, anyio.BrokenResourceError) as err:
        code = await vm.process.wait_exit()
        raise VmExited(vm.pid, code, vm.process.output_tail()) from err


def _memory_backend(spec: VmSpec) -> str:
    size = f"size={spec.memory_mib}M"
    if spec.ram.file is None:
        return f"memory-backend-ram,id=mem0,{size}"
    share = "on" if spec.ram.share else "off"
    return f"memory-backend-file,id=mem0,{size},mem-path={spec.ram.file},share={share}"


async def _connect_qmp(path: Path, proc: process.VmProcess) -> QmpClient:
    """Poll until QMP answers; the caller's deadline bounds the wait."""
    while True:
        if not proc.is_running():
            raise VmLaunchError(
                "QEMU exited during start-up",
                command=proc.command,
                exit_code=proc.exit_code,
                output_tail=proc.output_tail(),
            )
        try:
            return await QmpClient.connect(path)
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            await anyio.sleep(POLL_S)


def _check_pidfile(spec: VmSpec, proc: process.VmProcess) -> None:
    # `ip netns exec` execs QEMU in place, so the pid we started is QEMU's. Check, because a
    # different pid would mean our kill and exit watching aim at the wrong process.
    try:
        written = int(spec.pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if written != proc.pid:
        log.warning("QEMU pid file says %d, started %d", written, proc.pid, extra={"pid": proc.pid})


async def _set_ignore_shared(qmp: QmpClient, on: bool) -> None:
    caps = [{"capability": "x-ignore-shared", "state": on}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})


async def _wait_incoming(qmp: QmpClient) -> str:
    """Poll until the incoming migration has loaded (QMP has no blocking wait)."""
    while True:
        status: str = (await qmp.execute("query-status"))["status"]
        if status != "inmigrate":
            return status
        await anyio.sleep(POLL_S)


async def _wait_migration(qmp: QmpClient) -> dict[str, Any]:
    """Poll `query-migrate` until the outgoing migration ends; its final statistics."""
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise MigrationFailed("save", status, str(info.get("error-desc", "")))
        await anyio.sleep(POLL_S)
