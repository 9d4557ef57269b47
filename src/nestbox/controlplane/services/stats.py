"""Team stats (`GET /v1/capsules/stats`): what a team holds now, its peaks over 30 days, and a
time series, from samples the stats loop writes every `stats_interval_s` (one row per team
that holds anything; a team holding nothing writes nothing and reads as zero).

"Holding" is what the quota counts: capsules pending, starting, running, pausing, resuming or
snapshotting, their vCPUs and memory. The series has one bucket per step of the range (5m:
10 s, 1h: 1 min, 6h: 5 min, 24h: 15 min, 30d: 6 h; never finer than the sampling), each the
highest sample in it; a bucket no sample fell in takes the sample just before it when that is
at most two sampling intervals older (jitter), else zero.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.db.usage import Held
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.metrics import (
    METRICS_RANGES,
    STATS_RANGES,
    MetricPointView,
    MetricsView,
    StatsCurrent,
    StatsPeaks,
    StatsSeries,
    StatsView,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from nestbox.controlplane.db import Database
    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Targets
    from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

log = logging.getLogger(__name__)

STEPS_S = {"5m": 10, "1h": 60, "6h": 300, "24h": 900, "30d": 6 * 3600}
PEAK_WINDOW = timedelta(days=30)
KEEP = timedelta(days=31)
PRUNE_EVERY_S = 3600.0
GONE = (CapsuleStatus.STOPPED, CapsuleStatus.ERROR)
"""Statuses whose VM is gone from its host: no metrics to ask for."""


class StatsService:
    def __init__(
        self,
        db: Database,
        *,
        interval_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self.interval_s = interval_s
        self.clock = clock

    async def sample(self) -> int:
        """Write one sample per team holding anything; how many."""
        now = self.clock()
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                held = await tx.usage.held()
                await tx.usage.add_samples(now, held)
        return len(held)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample every `interval_s` until cancelled (and prune once an hour)."""
        task_status.started()
        last_prune = -math.inf
        while True:
            await anyio.sleep(self.interval_s)
            try:
                await self.sample()
                if anyio.current_time() - last_prune > PRUNE_EVERY_S:
                    async with self._db.transaction() as tx:
                        await tx.usage.prune_samples(self.clock() - KEEP)
                    last_prune = anyio.current_time()
            except Exception as err:  # the next round tries again
                log.error("stats sample failed: %r", err)

    async def stats(self, principal: Principal, range_: str) -> StatsView:
        span = timedelta(seconds=STATS_RANGES[range_])
        step = max(STEPS_S[range_], math.ceil(self.interval_s))
        now = self.clock()
        first = _floor(now - span, step)
        async with self._db.transaction() as tx:
            current = (await tx.usage.held(principal.team_id)).get(principal.team_id, Held())
            peaks = await tx.usage.peaks(principal.team_id, now - PEAK_WINDOW)
            # One step more, for the carry into the first bucket.
            samples = await tx.usage.samples(principal.team_id, first - 2 * timedelta(seconds=step))
        labels: list[datetime] = []
        series: list[Held] = []
        carry: tuple[datetime, Held] | None = None
        index = 0
        bucket = first
        while bucket <= now:
            end = bucket + timedelta(seconds=step)
            best: Held | None = None
            while index < len(samples) and samples[index].sampled_at < end:
                s = samples[index]
                if s.sampled_at >= bucket:
                    best = _max(best, s.held)
                carry = (s.sampled_at, s.held)
                index += 1
            if best is None and carry is not None and \
                    bucket - carry[0] <= timedelta(seconds=2 * self.interval_s):  # fmt: skip
                best = carry[1]
            labels.append(bucket)
            series.append(best or Held())
            bucket = end
        if series:  # the newest bucket shows at least what is held now
            series[-1] = _max(series[-1], current)
        top = _max(Held(peaks.running_count, peaks.vcpus, peaks.memory_mb), current)
        return StatsView(
            range=range_,  # type: ignore[arg-type]  # checked against STATS_RANGES
            current=StatsCurrent(running_count=current.running_count,
                                 vcpus_reserved=current.vcpus,
                                 memory_mb_reserved=current.memory_mb),
            peaks=StatsPeaks(running_count=top.running_count, vcpus=top.vcpus,
                             memory_mb=top.memory_mb),
            series=StatsSeries(labels=labels, running=[h.running_count for h in series],
                               vcpus=[h.vcpus for h in series],
                               memory_mb=[h.memory_mb for h in series]),
        )  # fmt: skip


def _floor(at: datetime, step: int) -> datetime:
    seconds = math.floor(at.timestamp() / step) * step
    return datetime.fromtimestamp(seconds, UTC)


def _max(a: Held | None, b: Held) -> Held:
    if a is None:
        return b
    return Held(max(a.running_count, b.running_count), max(a.vcpus, b.vcpus),
                max(a.memory_mb, b.memory_mb))  # fmt: skip


class CapsuleMetrics:
    """`GET /v1/capsules/{id}/metrics`: the samples its host agent keeps (`hostagent/metrics.py`:
    in the agent's memory, kept through pause and resume, downsampled for long ranges). A
    paused capsule answers the history it has; a host that has forgotten the capsule (an
    agent restart) answers none."""

    def __init__(self, targets: Targets) -> None:
        self._targets = targets

    async def metrics(self, principal: Principal, capsule_id: str, range_: str) -> MetricsView:
        """:raise NotFound: :raise HostUnavailable: its host does not answer."""
        capsule, host = await self._targets.find(principal, capsule_id)
        points: list[pb.MetricPoint] = []
        if host is not None and capsule.status not in GONE:
            try:
                points = await self._targets.agent(host).capsule_metrics(
                    capsule_id, METRICS_RANGES[range_]
                )
            except AgentCallError as err:
                if err.code is not ErrorCode.NOT_FOUND:
                    raise
        return MetricsView(
            sandbox_id=capsule_id, range=range_,  # type: ignore[arg-type]  # checked against METRICS_RANGES
            points=[MetricPointView(timestamp_unix=p.ts_unix_ms // 1000, cpu_pct=p.cpu_pct,
                                    mem_bytes=p.mem_bytes, disk_bytes=p.disk_bytes)
                    for p in points],
        )  # fmt: skip
