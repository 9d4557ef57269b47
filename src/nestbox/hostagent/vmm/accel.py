"""Choosing the accelerator: KVM only where it runs stock guest kernels, TCG everywhere else.

`/dev/kvm` alone proves nothing: on the PVM-backed machines we run on (themselves VMs) it exists
and answers, but only patched guest kernels run on it, and a stock kernel crawls then dies. A
real KVM host exposes `vmx` (Intel) or `svm` (AMD) in `/proc/cpuinfo`; we require both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nestbox.hostagent.vmm.base import Accel, VmError

CPUINFO = Path("/proc/cpuinfo")
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True, slots=True)
class AccelChoice:
    accel: Accel
    reason: str

    def qemu_args(self, *, tb_size_mib: int = 0) -> list[str]:
        """`tb_size_mib` bounds TCG's translation cache (QEMU 7.2's default is 1 GiB or an
        eighth of host RAM, whichever is less, touched as code is translated); 0 keeps it."""
        if self.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        tcg = f"tcg,tb-size={tb_size_mib}" if tb_size_mib else "tcg"
        return ["-accel", tcg, "-cpu", "max"]


def _virt_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags & {"vmx", "svm"}


def choose_accel(
    setting: Literal["auto", "kvm", "tcg"],
    *,
    cpuinfo: Path = CPUINFO,
    kvm_device: Path = KVM_DEVICE,
) -> AccelChoice:
    """Resolve the `accel` setting to what QEMU will use, with the reason in words.

    :raise VmError: `kvm` was asked for but `/dev/kvm` is not usable.
    """
    flags = _virt_flags(cpuinfo)
    kvm_usable = kvm_device.exists() and os.access(kvm_device, os.R_OK | os.W_OK)
    if setting == "tcg":
        return AccelChoice("tcg", "accel=tcg set in the settings")
    if setting == "kvm":
        if not kvm_usable:
            raise VmError(
                f"accel=kvm set in the settings but {kvm_device} is missing or not read-writable"
            )
        return AccelChoice("kvm", "accel=kvm set in the settings")
    if flags and kvm_usable:
        return AccelChoice("kvm", f"{kvm_device} present and the CPU has {'/'.join(sorted(flags))}")
    if kvm_usable:
        return AccelChoice(
            "tcg",
            f"{kvm_device} exists but the CPU has no vmx/svm flag (a nested or PVM backend that "
            "cannot run stock guest kernels); using TCG software emulation",
        )
    return AccelChoice("tcg", f"{kvm_device} is missing; using TCG software emulation")
