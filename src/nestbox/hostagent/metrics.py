"""Host-side metrics of one running capsule: CPU, memory and disk of its VM, sampled on the host
(`Hypervisor.stats`: /proc, never the guest or the VMM's API; a sample costs the guest nothing
and works while envd is busy or hung) and from the file system.

- cpu_pct: the VMM's CPU time (user + system) over the interval, of the capsule's vCPUs
  (100 = every vCPU busy; QEMU's own threads are counted too, so TCG may exceed 100).
- mem_bytes: the VMM's resident set (VmRSS).
- disk_bytes: the blocks allocated to the capsule's copy-on-write overlay.

A `MetricsRing` is one capsule's bounded history, in the agent's memory only: it lives as long
as the manager's entry for the capsule, so it is kept through pause and resume (a paused
capsule answers its history, with no points for the paused time) and lost when the capsule is
destroyed or the agent restarts. Three tiers, as Wrenn's: every sample for 10 minutes (600 at
1 s), 30-second averages for 2 hours (240) and 5-minute averages for 24 hours (288), so a
capsule costs at most ~1 100 points whatever its age. `since(range_s)` answers from the finest
tier that covers the range (10 minutes or less: samples; 2 hours or less: 30 s averages;
else 5 min), the bucket still filling included as a partial average. The manager runs one
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


class _Tier:
    """Averages of `step_s`-second buckets, the last `capacity` of them."""

    def __init__(self, step_s: int, capacity: int) -> None:
        self.step_ms = step_s * 1000
        self.done: collections.deque[MetricPoint] = collections.deque(maxlen=capacity)
        self._bucket = -1
        self._sum: list[float] = [0.0, 0.0, 0.0]
        self._n = 0

    def add(self, p: MetricPoint) -> None:
        bucket = p.ts_unix_ms // self.step_ms
        if bucket != self._bucket and self._n:
            self.done.append(self._average())
            self._sum, self._n = [0.0, 0.0, 0.0], 0
        self._bucket = bucket
        self._sum[0] += p.cpu_pct
        self._sum[1] += p.mem_bytes
        self._sum[2] += p.disk_bytes
        self._n += 1

    def _average(self) -> MetricPoint:
        n = self._n
        return MetricPoint(ts_unix_ms=self._bucket * self.step_ms,
                           cpu_pct=round(self._sum[0] / n, 2), mem_bytes=int(self._sum[1] / n),
                           disk_bytes=int(self._sum[2] / n))  # fmt: skip

    def points(self) -> list[MetricPoint]:
        """The finished buckets and the one filling, oldest first."""
        return [*self.done, self._average()] if self._n else list(self.done)


class MetricsRing:
    """One capsule's history (see the module's text), oldest first."""

    RAW_S = 600
    TIERS = ((7200, 30), (86400, 300))
    """(range it serves, bucket seconds)."""

    def __init__(self, capacity: int = 600) -> None:
        self._points: collections.deque[MetricPoint] = collections.deque(maxlen=capacity)
        self._tiers = [_Tier(step, span // step) for span, step in self.TIERS]

    def add(self, point: MetricPoint) -> None:
        self._points.append(point)
        for tier in self._tiers:
            tier.add(point)

    def since(self, range_s: float | None = None) -> list[MetricPoint]:
        """Points of the last `range_s` seconds (the raw samples when None or 0), from the
        finest tier that covers that range."""
        if not range_s:
            return list(self._points)
        if range_s <= self.RAW_S:
            points = list(self._points)
        else:
            points = self._tiers[-1].points()
            for (span, _), tier in zip(self.TIERS, self._tiers, strict=True):
                if range_s <= span:
                    points = tier.points()
                    break
        oldest = int((time.time() - range_s) * 1000)
        return [p for p in points if p.ts_unix_ms >= oldest]


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
