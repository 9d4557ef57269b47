"""`FakeHypervisor`: the `Hypervisor` protocol with nothing run, for fast lifecycle unit tests.

Each VM is a `FakeVm`: a state (`running`, `paused`, `gone`), whether a save is under way or
done and not cancelled (`saving`), and its guest's envd (`FakeGuest`, served by
`tests.fakes.envd.FakeEnvd`). A save writes the guest's envd token into the state file and a
restore reads it back, so tokens travel through snapshots and templates as they do in a real
guest. Launched VMs get pids above the kernel's largest (`FAKE_PID_BASE`), so no real process
is ever found under them; an adopted VM keeps the real process recovery claimed (a stand-in the
test started), and `kill` kills it.

Every call is recorded (`calls`: verb and VM name). `fail[verb]` makes that verb raise,
`hang` makes it wait until cancelled (a save that hangs is under way, `saving`, as a migration
would be); both after the call is recorded and, for `launch`, after `on_launch`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio

from nestbox.hostagent.vmm.base import (
    Accel,
    LaunchHook,
    SaveResult,
    VmHandle,
    VmSpec,
    VmStats,
)
from tests.fakes.envd import FakeGuest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from nestbox.hostagent.vmm.process import VmProcess

FAKE_PID_BASE = 1 << 22
"""Above the largest pid_max Linux allows: never a real process."""
VmState = Literal["running", "paused", "gone"]


@dataclass(eq=False, slots=True)
class FakeVm(VmHandle):
    guest: FakeGuest
    state: VmState = "running"
    saving: bool = False
    save_set_up: bool | None = None
    exit_code: int | None = None
    exited: anyio.Event = field(default_factory=anyio.Event)
    process: VmProcess | None = None
    """The real process of an adopted VM (a stand-in the test started)."""


@dataclass
class LeftVm:
    """What `adopt` finds behind a pid: a VM an earlier agent run left."""

    guest: FakeGuest = field(default_factory=FakeGuest)
    state: VmState = "running"
    saving: bool = False


class FakeHypervisor:
    """See the module docstring."""

    def __init__(self, accel: Accel = "tcg") -> None:
        self._accel: Accel = accel
        self.vms: list[FakeVm] = []
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, BaseException] = {}
        self.hang: set[str] = set()
        self.new_guest: Callable[[], FakeGuest] = FakeGuest
        """The guest's envd of each launched VM (a test may give it knobs)."""
        self.left: dict[int, LeftVm] = {}
        """pid -> the VM `adopt` finds there (default: a running one with an open envd)."""
        self._pids = itertools.count(FAKE_PID_BASE)

    @property
    def accel(self) -> Accel:
        return self._accel

    # ── what tests look at ──────────────────────────────────────────────────────────────

    def verbs(self, name: str | None = None) -> list[str]:
        """The verbs called (for VM `name` only, when given), in order."""
        return [verb for verb, vm in self.calls if name is None or vm == name]

    def live(self) -> list[FakeVm]:
        return [vm for vm in self.vms if vm.state != "gone"]

    def vm(self, name: str) -> FakeVm:
        """The live VM of capsule `name`."""
        [vm] = [vm for vm in self.live() if vm.spec.name == name]
        return vm

    def guest_for(self, key: str) -> FakeGuest | None:
        """`FakeEnvd`'s lookup: `slot<N>` is the running VM in slot N."""
        for vm in self.live():
            if f"slot{vm.spec.slot}" == key and vm.state == "running":
                return vm.guest
        return None

    def crash(self, vm: FakeVm, code: int = 1) -> None:
        """The VMM exits on its own."""
        self._gone(vm, code)

    # ── the protocol ────────────────────────────────────────────────────────────────────

    async def launch(self, spec: VmSpec, *, on_launch: LaunchHook | None = None) -> VmHandle:
        vm = FakeVm(
            spec=spec, pid=next(self._pids), guest=self.new_guest(),
            state="paused" if spec.incoming else "running",
        )  # fmt: skip
        self.vms.append(vm)
        try:
            if on_launch is not None:
                await on_launch(vm.pid)
            await self._step("launch", vm)
        except BaseException:
            self._gone(vm, None)
            raise
        return vm

    async def adopt(self, spec: VmSpec, process: VmProcess) -> VmHandle:
        left = self.left.get(process.pid, LeftVm())
        vm = FakeVm(spec=spec, pid=process.pid, guest=left.guest, state=left.state,
                    saving=left.saving, process=process)  # fmt: skip
        await self._step("adopt", vm)
        self.vms.append(vm)
        return vm

    async def restore(self, vm: VmHandle, state_file: Path, *, ignore_shared: bool) -> None:
        fake = _fake(vm)
        await self._step("restore", fake)
        assert fake.state == "paused", "restore into a VM launched with incoming=True"
        saved = json.loads(await anyio.Path(state_file).read_text())
        fake.guest.token = saved["token"]
        fake.state = "running"

    async def prepare_save(self, vm: VmHandle, *, ignore_shared: bool) -> None:
        fake = _fake(vm)
        await self._step("prepare_save", fake)
        fake.save_set_up = ignore_shared

    async def pause(self, vm: VmHandle) -> None:
        fake = _fake(vm)
        fake.guest.open_at_pause.append(fake.guest.open_connections)
        await self._step("pause", fake)
        fake.state = "paused"

    async def resume(self, vm: VmHandle) -> None:
        fake = _fake(vm)
        await self._step("resume", fake)
        fake.state = "running"

    async def save(self, vm: VmHandle, state_file: Path, *, ignore_shared: bool) -> SaveResult:
        fake = _fake(vm)
        live = fake.state == "running"  # QEMU copies the RAM, then stops the guest (a fork)
        fake.saving = True  # under way (a hang leaves it so)
        await self._step("save", fake)
        data = json.dumps({"token": fake.guest.token, "vm": vm.spec.name})
        await anyio.Path(state_file).write_text(data)
        fake.state = "paused"
        return SaveResult(state_bytes=len(data), downtime_ms=1 if live else None)

    async def cancel_save(self, vm: VmHandle) -> None:
        fake = _fake(vm)
        await self._step("cancel_save", fake)
        fake.saving = False
        fake.state = "running"

    async def kill(self, vm: VmHandle) -> int | None:
        fake = _fake(vm)
        self.calls.append(("kill", vm.spec.name))
        if fake.process is not None:
            await fake.process.kill()
            fake.process.close()
        self._gone(fake, -9 if fake.exit_code is None else fake.exit_code)
        return fake.exit_code

    async def supervise(self, vm: VmHandle) -> int | None:
        fake = _fake(vm)
        await fake.exited.wait()
        return fake.exit_code

    def stats(self, vm: VmHandle) -> VmStats | None:
        fake = _fake(vm)
        return None if fake.state == "gone" else VmStats(cpu_s=0.5, rss_bytes=64 << 20)

    # ── helpers ─────────────────────────────────────────────────────────────────────────

    async def _step(self, verb: str, vm: FakeVm) -> None:
        self.calls.append((verb, vm.spec.name))
        if verb in self.fail:
            raise self.fail[verb]
        if verb in self.hang:
            await anyio.sleep_forever()

    def _gone(self, vm: FakeVm, code: int | None) -> None:
        if vm.state != "gone":
            vm.state = "gone"
            vm.exit_code = code
            vm.exited.set()


def _fake(vm: VmHandle) -> FakeVm:
    assert isinstance(vm, FakeVm), f"not a fake VM: {vm!r}"
    return vm
