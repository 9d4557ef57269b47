"""Host-side metrics of one running capsule: CPU, memory and disk of its VM, sampled on the host
(`Hypervisor.stats`: /proc, never the guest or the VMM's API; a sample costs the guest nothing
and works while envd is busy or hung) and from the file system.

- cpu_pct: the VMM's CPU time (user + system) over the interval, of the capsule's vCPUs
  (100 = every vCPU busy; QEMU's own threads are counted too, so TCG may exceed 100).
- mem_bytes: the VMM's resident set (VmRSS).
- disk_bytes: the blocks allocated to the capsule's copy-on-write overlay.

A `MetricsRing` keeps the last `capacity` samples (10 minutes at 1 s). The manager runs one
`sample_loop` per running capsule in its task group and cancels it before a pause.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from nestbox.hostagent.vmm.base import VmStats


@dataclass(frozen=True, slots=True)
class MetricPoint:
    ts_unix_ms: int
    cpu_pct: float
    mem_bytes: int
    disk_bytes: int


class MetricsRing:
    """The latest samples of one capsule, oldest first."""

    def __init__(self, capacity: int = 600) -> None:
        self._points: collections.deque[MetricPoint] = collections.deque(maxlen=capacity)

    def add(self, point: MetricPoint) -> None:
        self._points.append(point)

    def since(self, range_s: float | None = None) -> list[MetricPoint]:
        """Samples of the last `range_s` seconds (all of them when None or 0)."""
        if not range_s:
            return list(self._points)
        oldest = int((time.time() - range_s) * 1000)
        return [p for p in self._points if p.ts_unix_ms >= oldest]


def allocated_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


async def sample_loop(
    ring: MetricsRing,
    stats: Callable[[], VmStats | None],
    disk: Path,
    vcpus: int,
    interval_s: float,
) -> None:
    """Add a sample to `ring` every `interval_s` until cancelled or the VM is gone (`stats()`:
    its `Hypervisor.stats`)."""
    previous = stats()
    last = time.monotonic()
    while previous is not None:
        await anyio.sleep(interval_s)
        current = stats()
        if current is None:
            return
        now = time.monotonic()
        busy_s = current.cpu_s - previous.cpu_s
        cpu = 100.0 * busy_s / max(now - last, 1e-3) / max(vcpus, 1)
        ring.add(
            MetricPoint(
                ts_unix_ms=int(time.time() * 1000),
                cpu_pct=round(cpu, 2),
                mem_bytes=current.rss_bytes,
                disk_bytes=allocated_bytes(disk),
            )
        )
        previous, last = current, now
