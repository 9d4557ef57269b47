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
else 5 min), the bucket still filling included as a partial average.

One `Sampler` per runtime samples every running capsule in one pass each interval: one wake-up
a second for the agent whatever the number of capsules (a loop per capsule was N wake-ups a
second: 100 on a host of 100 idle capsules). The runtime adds a capsule when its run starts and
cancels its `Sampling` before a pause and when the run ends; the loop runs only while some
capsule is sampled. Each capsule still gets a point every interval, measured over the time since
its previous one.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
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


log = logging.getLogger(__name__)


class Sampling:
    """One capsule's place in a `Sampler`: what to read, and its previous reading."""

    def __init__(self, capsule_id: str, ring: MetricsRing, stats: Callable[[], VmStats | None],
                 disk: Path, vcpus: int) -> None:  # fmt: skip
        self.capsule_id, self.ring, self.stats = capsule_id, ring, stats
        self.disk, self.vcpus = disk, vcpus
        self.previous = stats()
        self.last = time.monotonic()
        self.cancelled = self.previous is None

    def cancel(self) -> None:
        """No more points (idempotent): the sampler drops it at its next pass."""
        self.cancelled = True

    def sample(self) -> None:
        """Add a point to the ring; cancelled once the VM is gone (`stats()` is None)."""
        current = self.stats()
        if current is None or self.previous is None:
            self.cancelled = True
            return
        now = time.monotonic()
        busy_s = current.cpu_s - self.previous.cpu_s
        cpu = 100.0 * busy_s / max(now - self.last, 1e-3) / max(self.vcpus, 1)
        self.ring.add(
            MetricPoint(
                ts_unix_ms=int(time.time() * 1000),
                cpu_pct=round(cpu, 2),
                mem_bytes=current.rss_bytes,
                disk_bytes=allocated_bytes(self.disk),
            )
        )
        self.previous, self.last = current, now


class Sampler:
    """Samples every added capsule each `interval_s`, in one task (see the module's text).

    `spawn` starts the loop in its owner's task group when the first capsule is added; the loop
    ends when none is left."""

    def __init__(
        self, interval_s: float, spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], object]
    ) -> None:
        self.interval_s = interval_s
        self._spawn = spawn
        self._sampled: list[Sampling] = []
        self._running = False

    def add(self, capsule_id: str, ring: MetricsRing, stats: Callable[[], VmStats | None],
            disk: Path, vcpus: int) -> Sampling:  # fmt: skip
        """Sample this capsule from the next pass on (its first reading is taken now)."""
        sampling = Sampling(capsule_id, ring, stats, disk, vcpus)
        self._sampled.append(sampling)
        if not self._running:
            self._running = True
            self._spawn(self._loop)
        return sampling

    def __len__(self) -> int:
        return sum(not s.cancelled for s in self._sampled)

    async def _loop(self) -> None:
        try:
            # On a grid of `interval_s` from the start, so passes do not drift later.
            start = anyio.current_time()
            while True:
                self._sampled = [s for s in self._sampled if not s.cancelled]
                if not self._sampled:
                    return
                now = anyio.current_time()
                ticks = math.floor((now - start) / self.interval_s) + 1
                await anyio.sleep_until(start + ticks * self.interval_s)
                self.sample_all()
        finally:
            self._running = False

    def sample_all(self) -> None:
        """One pass over every capsule (synchronous: a few /proc reads and a stat each)."""
        for sampling in self._sampled:
            if sampling.cancelled:
                continue
            try:
                sampling.sample()
            except Exception as err:  # one capsule's failure must never stop the others
                sampling.cancel()
                log.warning("metrics sampler failed: %r", err,
                            extra={"capsule_id": sampling.capsule_id})  # fmt: skip
