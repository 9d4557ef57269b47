"""`nestbox-agent doctor`'s checks: can this host run capsules, and how fast?

Static checks first (accelerator and why, QEMU, each confinement measure on or off and why, the
data directory's mode, the guest image, networking, egress forwarding on the uplinks, free
slots), then a real round trip: a capsule cloned from the `minimal` template (built first if
missing), its QEMU's confinement as observed in /proc, `uname -a` through envd's
`process.Process/Start`, pause, resume, destroy, each step timed. Nothing is printed here
(that is `cli/doctor.py`); every check becomes a `Check` in the `Report`.

The round trip runs as its own agent id (`<agent_id>dr`) in the last slot of the agent's range,
so it never touches a running agent's capsules, and it removes everything it made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio

from nestbox.hostagent.image.cache import find_image
from nestbox.hostagent.network import SlotPool, cleanup_leftovers, ensure_blackhole, uplink
from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.system import RealSystem
from nestbox.hostagent.vmm import confine, serial
from nestbox.hostagent.vmm.accel import KVM_DEVICE, choose_accel

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nestbox.hostagent.image.layout import GuestImage
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System

T = TypeVar("T")

STEP_DEADLINE_S = 300.0
"""Per round-trip step; the first template build is a cold boot (seconds under TCG)."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    duration_ms: int | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    accel: str = ""
    accel_reason: str = ""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "accel": self.accel, "accel_reason": self.accel_reason,
                "checks": [dataclasses.asdict(c) for c in self.checks]}  # fmt: skip


async def run_doctor(settings: AgentSettings, system: System | None = None) -> Report:
    """Run every check; never raises for a failed check (it is recorded instead)."""
    system = system or RealSystem()
    report = Report()
    image = _static_checks(settings, report)
    if not await _network_check(settings, system, report) or image is None:
        report.checks.append(Check("capsule round trip", False, "skipped: see above"))
        return report
    await _round_trip(_doctor_settings(settings), system, image, report)
    return report


def _static_checks(settings: AgentSettings, report: Report) -> GuestImage | None:
    kvm = KVM_DEVICE.exists()
    report.checks.append(Check("/dev/kvm", True, "present" if kvm else "absent"))
    try:
        accel = choose_accel(settings.accel)
        report.accel, report.accel_reason = accel.accel, accel.reason
        report.checks.append(Check("accelerator", True, f"{accel.accel}: {accel.reason}"))
    except Exception as err:
        report.checks.append(Check("accelerator", False, str(err)))
    for binary in (settings.qemu_binary, "qemu-img"):
        report.checks.append(_binary_check(binary))
    report.checks += _confinement_checks(settings)
    image = find_image(settings)
    if image is None:
        report.checks.append(
            Check(
                "guest image",
                False,
                f"none in {settings.images_dir}; run 'nestbox-agent image build'",
            )
        )
    else:
        report.checks.append(
            Check("guest image", True, f"{image.version} in {image.rootfs.parent}")
        )
    return image


def _confinement_checks(settings: AgentSettings) -> list[Check]:
    """Each confinement measure on or off, with the reason (`vmm/confine.py`)."""
    checks = [
        Check(f"confinement: {item.name}", item.on, ("on: " if item.on else "OFF: ") + item.detail)
        for item in confine.Confinement.probe(settings).items
    ]
    most = settings.serial_log_max_bytes * 3 // 4
    cap = f"on: {most} bytes on disk + what the guest writes in {serial.CHECK_INTERVAL_S:g} s "
    cap += f"at most (serial_log_max_bytes {settings.serial_log_max_bytes})"
    checks.append(Check("confinement: serial log cap", True, cap))
    tb = settings.vm_tcg_tb_size_mib
    code_cache = f"{tb} MiB" if tb else "QEMU's default (up to 1 GiB)"
    checks.append(Check("confinement: TCG code cache", True, code_cache))
    try:
        mode = stat.S_IMODE(settings.data_dir.stat().st_mode)
    except FileNotFoundError:
        detail = f"{settings.data_dir} does not exist yet (the agent creates it 0700)"
        checks.append(Check("data dir mode", True, detail))
    except OSError as err:
        checks.append(Check("data dir mode", False, f"{settings.data_dir}: {err}"))
    else:
        ok = mode & 0o077 == 0
        detail = f"{settings.data_dir} is {mode:04o}" + ("" if ok else " (the agent sets 0700)")
        checks.append(Check("data dir mode", ok, detail))
    return checks


def _observed_confinement(pid: int, settings: AgentSettings) -> Check:
    """What the round trip's QEMU process really runs with."""
    try:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as err:
        return Check("confinement (observed)", False, f"cannot read /proc/{pid}: {err}")
    uid = status["Uid"].split()[0]
    seccomp, cap_eff = status["Seccomp"].strip(), status["CapEff"].strip()
    parent = f"/{settings.cgroup_parent}/{settings.agent_id}/"
    in_cgroup = parent in cgroups
    ok = not settings.confine or (uid != "0" and seccomp == "2" and int(cap_eff, 16) == 0)
    detail = f"uid {uid}, Seccomp {seccomp}, CapEff {cap_eff}, own cgroup: {in_cgroup}"
    return Check("confinement (observed)", ok, detail)


def _binary_check(binary: str) -> Check:
    path = shutil.which(binary)
    if path is None:
        return Check(binary, False, "not found on PATH")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()[:1]
    return Check(binary, out.returncode == 0, f"{path}: {first[0] if first else '?'}")


async def _network_check(settings: AgentSettings, system: System, report: Report) -> bool:
    ok = True
    try:
        await ensure_blackhole(system, settings)
        namespaces = await system.ip("netns", "list")
        mine = [ln for ln in namespaces.splitlines() if ln.startswith(f"nbx-{settings.agent_id}-")]
        report.checks.append(
            Check(
                "networking",
                True,
                f"ip netns/iptables usable; blackhole "
                f"routes for {settings.slot_cidr} and {settings.veth_cidr}",
            )
        )
        forwarding = await uplink.forwarding_state(system, settings)
        report.checks.append(Check("egress forwarding", forwarding.ok, forwarding.describe()))
        stats = SlotPool(settings).statistics()
        report.checks.append(
            Check(
                "free slots",
                stats.total > len(mine),
                f"{stats.total - len(mine)} of {stats.total} free "
                f"({len(mine)} netns of agent {settings.agent_id} exist)",
            )
        )
    except Exception as err:
        ok = False
        report.checks.append(Check("networking", False, f"{err} (the agent must run as root)"))
    return ok


def _doctor_settings(settings: AgentSettings) -> AgentSettings:
    last = settings.slot_first + settings.slot_count - 1
    return settings.model_copy(
        update={"agent_id": (settings.agent_id + "dr")[:8], "slot_first": last, "slot_count": 1}
    )


async def _round_trip(
    settings: AgentSettings, system: System, image: GuestImage, report: Report
) -> None:
    await cleanup_leftovers(system, settings, set())  # an earlier doctor killed half-way
    async with VmRuntime.open(settings, system) as rt:
        try:
            ok, _ = await _step(report, "template minimal", lambda: rt.ensure_template(image))
            ok, clones = await _step(report, "create capsule (clone)", lambda: rt.clone("minimal"))
            if not ok or not clones:
                return
            capsule = clones[0]
            if capsule.pid is not None:
                report.checks.append(_observed_confinement(capsule.pid, settings))
            ok, result = await _step(
                report, "exec uname -a", lambda: capsule.envd.exec("uname", ["-a"])
            )
            if ok and result is not None:
                report.checks[-1].detail = result.stdout.decode(errors="replace").strip()
                report.checks[-1].ok = result.exit_code == 0
            ok, _ = await _step(report, "pause", lambda: rt.pause(capsule.id))
            if ok:
                await _step(report, "resume", lambda: rt.resume(capsule.id))
            await _step(report, "destroy", lambda: rt.destroy(capsule.id))
        finally:
            with anyio.CancelScope(shield=True):
                await rt.destroy_all()
    confine.remove_agent_cgroups(settings)
    with contextlib.suppress(OSError):
        (settings.state_dir / "capsules").rmdir()
        (settings.state_dir / confine.CHROOT_DIR).rmdir()
        settings.state_dir.rmdir()


async def _step(report: Report, name: str, fn: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run one timed step; record it as a Check."""
    started = time.monotonic()
    try:
        with anyio.fail_after(STEP_DEADLINE_S):
            value = await fn()
    except Exception as err:
        detail = f"{type(err).__name__}: {err}"[:1000]
        report.checks.append(Check(name, False, detail, _ms(started)))
        return False, None
    report.checks.append(Check(name, True, "ok", _ms(started)))
    return True, value


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


__all__ = ["Check", "Report", "run_doctor"]
