"""Metrics, stats and usage on the public API (the `wrenn` SDK's `capsules.metrics`,
`capsules.stats`, `capsules.usage`; sdk-request-map §2.3):

    GET /v1/capsules/{id}/metrics?range=5m|10m|1h|2h|6h|12h|24h    -> MetricsView
    GET /v1/capsules/stats?range=5m|1h|6h|24h|30d                   -> StatsView
    GET /v1/capsules/usage?from=YYYY-MM-DD&to=YYYY-MM-DD            -> UsageView
"""

from __future__ import annotations

import datetime as dt  # noqa: TC003 (pydantic resolves annotations at runtime)
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MetricsRange = Literal["5m", "10m", "1h", "2h", "6h", "12h", "24h"]
StatsRange = Literal["5m", "1h", "6h", "24h", "30d"]
METRICS_RANGES: dict[str, int] = {"5m": 300, "10m": 600, "1h": 3600, "2h": 7200,
                                  "6h": 21600, "12h": 43200, "24h": 86400}  # fmt: skip
STATS_RANGES: dict[str, int] = {"5m": 300, "1h": 3600, "6h": 21600, "24h": 86400,
                                "30d": 30 * 86400}  # fmt: skip


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


class MetricPointView(_View):
    timestamp_unix: int
    cpu_pct: float = Field(description="of the capsule's vCPUs (100 = all busy)")
    mem_bytes: int = Field(description="resident memory of the capsule's VM process")
    disk_bytes: int = Field(description="blocks allocated to the capsule's disk overlay")


class MetricsView(_View):
    sandbox_id: str
    range: MetricsRange
    points: list[MetricPointView]


class StatsCurrent(_View):
    running_count: int
    vcpus_reserved: int
    memory_mb_reserved: int


class StatsPeaks(_View):
    """The highest values of the last 30 days."""

    running_count: int
    vcpus: int
    memory_mb: int


class StatsSeries(_View):
    """Parallel arrays, one entry per time bucket (its start, UTC)."""

    labels: list[dt.datetime]
    running: list[int]
    vcpus: list[int]
    memory_mb: list[int]


class StatsView(_View):
    range: StatsRange
    current: StatsCurrent
    peaks: StatsPeaks
    series: StatsSeries


class UsagePoint(_View):
    date: dt.date
    cpu_minutes: float = Field(description="vCPU-minutes the team's capsules ran that UTC day")
    ram_mb_minutes: float = Field(description="MiB-minutes of memory they held running")


class UsageView(_View):
    from_: dt.date = Field(alias="from")
    to: dt.date
    points: list[UsagePoint]
