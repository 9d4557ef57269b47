"""The hypervisor seam: what the capsule lifecycle needs from a VMM, whichever one runs it.

`VmSpec` says what to run, `VmHandle` is one running VMM process, and `Hypervisor` is the
Protocol a driver (`qemu.QemuHypervisor` today, Firecracker on bare-metal KVM hosts later)
implements. Its verbs are what a VMM offers either way: launch, restore, save, cancel a save,
pause and resume the vCPUs, adopt a VMM an earlier agent run launched, kill, supervise, and
per-VM stats. How a driver talks to its VMM (QEMU's QMP, Firecracker's API socket) is its own
business: a handle shows callers its spec and pid only. Errors raised by drivers are the
`VmError` tree below:

    VmError
    ├── VmLaunchError      the VMM process did not start or died before its API answered
    ├── VmExited           the VMM process is gone while an operation needed it
    ├── QmpError           the VMM's API answered a command with an error
    ├── MigrationFailed    a snapshot (save) or restore did not complete
    └── SocketPathTooLong  a unix socket path exceeds the kernel's 107-byte limit
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.vmm.process import VmProcess

Accel = Literal["kvm", "tcg"]
DiskFormat = Literal["raw", "qcow2"]
LaunchHook = Callable[[int], Awaitable[None]]
"""Called with the VMM's pid as soon as the process exists (`Hypervisor.launch`)."""

UNIX_PATH_MAX = 107
"""`sun_path` holds 108 bytes including the terminating NUL."""


class VmError(Exception):
    """Root of the VMM driver's errors."""


class VmLaunchError(VmError):
    """The VMM process did not start, or exited before its API socket answered."""

    def __init__(
        self, message: str, *, command: list[str], exit_code: int | None, output_tail: str
    ) -> None:
        super().__init__(f"{message} (exit code {exit_code}): {output_tail[-800:]}")
        self.command = command
        self.exit_code = exit_code
        self.output_tail = output_tail


class VmExited(VmError):
    """The VMM process exited while an operation still needed it."""

    def __init__(self, pid: int, exit_code: int | None, output_tail: str = "") -> None:
        super().__init__(f"VMM process {pid} exited (code {exit_code}) {output_tail[-800:]}")
        self.pid = pid
        self.exit_code = exit_code
        self.output_tail = output_tail


class QmpError(VmError):
    """QMP answered a command with `{"error": ...}`."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MigrationFailed(VmError):
    """An outgoing (snapshot) or incoming (restore) migration ended in a state other than done."""

    def __init__(self, direction: Literal["save", "restore"], status: str, detail: str) -> None:
        super().__init__(f"{direction} failed: status {status}: {detail}")
        self.direction = direction
        self.status = status
        self.detail = detail


class SocketPathTooLong(VmError):
    """A unix socket path is too long for `sun_path`; use a shorter data directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"unix socket path has {len(str(path))} bytes (max {UNIX_PATH_MAX}): {path}"
        )
        self.path = path


@dataclass(frozen=True, slots=True)
class RamSpec:
    """Where guest RAM lives.

    `file=None`: anonymous host memory. Otherwise a memory-backend-file on `file`: `share=True`
    (MAP_SHARED) makes the file *be* the RAM, as the VM that creates a template does;
    `share=False` (MAP_PRIVATE) maps it copy-on-write, as clones do, so the file never changes.
    """

    file: Path | None = None
    share: bool = False


@dataclass(frozen=True, slots=True)
class VmSpec:
    """Everything needed to start one VMM process. Restoring a snapshot needs the same spec
    (devices, memory size, kernel) as the VM that was saved, plus `incoming=True`."""

    name: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    disk: Path
    disk_format: DiskFormat
    run_dir: Path
    """Holds the QMP socket, pid file, serial log and the VMM's own output."""
    vcpus: int = 1
    memory_mib: int = 256
    ram: RamSpec = field(default_factory=RamSpec)
    netns: str | None = None
    tap: str | None = None
    slot: int | None = None
    """The slot the VM runs in: a confined VMM's uid is derived from it (unique per running VM)."""
    mac: str = "02:fc:00:00:00:01"
    incoming: bool = False
    """Start paused, waiting for `Hypervisor.restore`."""

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "vmm.pid"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def output_log(self) -> Path:
        return self.run_dir / "vmm.log"


@dataclass(eq=False, slots=True)
class VmHandle:
    """One running VMM process, as its driver launched or adopted it. Callers see what was run
    (`spec`) and the process (`pid`); drivers subclass it with what they talk to the VMM over."""

    spec: VmSpec
    pid: int


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What `Hypervisor.save` wrote."""

    state_bytes: int
    """The state file's size (small when the RAM stayed in a shared file)."""
    downtime_ms: int | None = None
    """For a save of a running guest (a live migration: RAM copied while it runs, then the
    vCPUs stopped for what changed meanwhile), how long they were stopped, as the VMM saw it."""


@dataclass(frozen=True, slots=True)
class VmStats:
    """What the host sees a VMM use (`Hypervisor.stats`), for the metrics sampler."""

    cpu_s: float
    """CPU time (user + system) of the VMM process since it started, all its threads."""
    rss_bytes: int
    """The VMM process's resident memory (guest RAM it touched, and its own)."""


class Hypervisor(Protocol):
    """A VMM driver. The caller sets deadlines (`anyio.fail_after`) around every call."""

    @property
    def accel(self) -> Accel: ...

    async def launch(self, spec: VmSpec, *, on_launch: LaunchHook | None = None) -> VmHandle:
        """Launch the VMM and return once its API answers (the guest runs unless
        `spec.incoming`). `on_launch(pid)` is awaited as soon as the process exists, before
        anything waits on it (the agent records the pid there, so a crash cannot orphan the
        VMM); if it raises, the VMM is killed. :raise VmLaunchError:"""
        ...

    async def adopt(self, spec: VmSpec, process: VmProcess) -> VmHandle:
        """Take back a VMM that an earlier agent run launched with `spec` (start-up recovery):
        `process` holds it (a pidfd opened before it was identified); its API is reconnected.
        The guest is left as it is found (see `resume`, `cancel_save`).
        :raise VmError: its API does not answer."""
        ...

    async def restore(self, vm: VmHandle, state_file: Path, *, ignore_shared: bool) -> None:
        """Load `state_file` into a VM launched with `incoming=True`, then run it.
        :raise MigrationFailed: :raise VmExited:"""
        ...

    async def prepare_save(self, vm: VmHandle, *, ignore_shared: bool) -> None:
        """Set up what `save` needs while the guest still runs (it never stops the guest, so
        it may run alongside the guest's own preparation). Optional: `save` does it if not."""
        ...

    async def pause(self, vm: VmHandle) -> None:
        """Stop the guest's vCPUs (the VMM and the guest's memory stay). :raise VmError:"""
        ...

    async def resume(self, vm: VmHandle) -> None:
        """Let a paused guest run again (nothing happens to a running one). :raise VmError:"""
        ...

    async def save(self, vm: VmHandle, state_file: Path, *, ignore_shared: bool) -> SaveResult:
        """Write a paused guest's device state (and RAM, unless `ignore_shared` and the RAM is
        a shared file) to `state_file`; return once every byte is in it. The VM stays paused.
        :raise MigrationFailed: :raise VmExited:"""
        ...

    async def cancel_save(self, vm: VmHandle) -> None:
        """Abandon a save that failed, was interrupted or may still be writing (waiting until
        the VMM stopped writing), and let the guest run again: whatever state a save left the
        VM in, afterwards it runs. :raise VmError:"""
        ...

    async def kill(self, vm: VmHandle) -> int | None:
        """Kill the VMM process, wait for it to exit, remove what it was given (its cgroup),
        return its exit status."""
        ...

    async def supervise(self, vm: VmHandle) -> int | None:
        """Wait for the VMM to exit on its own, keeping its output bounded meanwhile (the
        guest's serial log); return its exit status (None for an adopted VMM). Run by the
        capsule's exit watcher, and raced against envd's readiness after a launch."""
        ...

    def stats(self, vm: VmHandle) -> VmStats | None:
        """What the VMM uses now (a few /proc reads; no call into the VMM), or None once it is
        gone."""
        ...
