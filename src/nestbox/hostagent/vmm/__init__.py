"""Hypervisors behind one Protocol (`base.Hypervisor`); QEMU `microvm` is the driver today."""

from __future__ import annotations

from nestbox.hostagent.vmm.accel import AccelChoice, choose_accel
from nestbox.hostagent.vmm.base import (
    Hypervisor,
    MigrationFailed,
    QmpError,
    RamSpec,
    SaveResult,
    VmError,
    VmExited,
    VmHandle,
    VmLaunchError,
    VmSpec,
    VmStats,
)
from nestbox.hostagent.vmm.qemu import QemuHypervisor

__all__ = [
    "AccelChoice",
    "Hypervisor",
    "MigrationFailed",
    "QemuHypervisor",
    "QmpError",
    "RamSpec",
    "SaveResult",
    "VmError",
    "VmExited",
    "VmHandle",
    "VmLaunchError",
    "VmSpec",
    "VmStats",
    "choose_accel",
]
