"""Guest resource usage for `GET /metrics`: CPU from /proc/stat, memory from /proc/meminfo,
disk from statvfs("/"). Read-only; outside a VM it simply reports the machine envd runs on."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
PROC_MEMINFO = Path("/proc/meminfo")
FIRST_SAMPLE_WINDOW_S = 0.1
"""With no earlier sample, CPU use is measured over this short window instead."""


@dataclass(frozen=True, slots=True)
class CpuTimes:
    busy: int
    total: int


@dataclass(frozen=True, slots=True)
class GuestMetrics:
    ts: int
    """Unix seconds when sampled."""
    cpu_count: int
    cpu_used_pct: float
    """Share of all CPUs busy since the previous sample, 0-100."""
    mem_total: int
    mem_used: int
    """Bytes: MemTotal - MemAvailable."""
    disk_total: int
    disk_used: int
    """Bytes of the root filesystem."""

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def parse_cpu_times(stat: str) -> CpuTimes:
    """The aggregate `cpu` line of /proc/stat: idle and iowait count as not busy; guest time is
    already inside user/nice, so it is not added twice."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            return CpuTimes(busy=total - idle, total=total)
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, used) bytes from /proc/meminfo."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            kib[name] = int(parts[0])
    total = kib.get("MemTotal", 0) * 1024
    available = kib.get("MemAvailable", kib.get("MemFree", 0)) * 1024
    return total, total - available


class CpuSampler:
    """Remembers the previous /proc/stat reading, so each sample covers the time since it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # two concurrent /metrics calls share one `_last`
        self._last: CpuTimes | None = None

    def used_pct(self) -> float:
        """Blocking (it may sleep `FIRST_SAMPLE_WINDOW_S` on the first call): run in a thread."""
        with self._lock:
            now = parse_cpu_times(PROC_STAT.read_text())
            last = self._last
            if last is None:
                time.sleep(FIRST_SAMPLE_WINDOW_S)
                last, now = now, parse_cpu_times(PROC_STAT.read_text())
            self._last = now
        total = now.total - last.total
        if total <= 0:
            return 0.0
        return round(100.0 * (now.busy - last.busy) / total, 2)


def read_metrics(cpu: CpuSampler) -> GuestMetrics:
    """One sample of the guest's CPU, memory and root-disk use. Blocking: run in a thread."""
    mem_total, mem_used = parse_meminfo(PROC_MEMINFO.read_text())
    vfs = os.statvfs("/")
    return GuestMetrics(
        ts=int(time.time()),
        cpu_count=len(os.sched_getaffinity(0)),
        cpu_used_pct=cpu.used_pct(),
        mem_total=mem_total,
        mem_used=mem_used,
        disk_total=vfs.f_blocks * vfs.f_frsize,
        disk_used=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
    )
