"""Metrics, stats and usage (protocol/metrics.py):

    GET /v1/capsules/{capsule_id}/metrics?range=      one capsule's CPU, memory and disk
    GET /v1/capsules/stats?range=                     what the team holds, peaks, a series
    GET /v1/capsules/usage?from=&to=                  per-day CPU- and RAM-minutes

The router must come before the capsules router in `app.ROUTERS`: `/v1/capsules/stats` would
otherwise be taken for a capsule id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.routing import Endpoint, Router, enum_query
from nestbox.controlplane.errors import InvalidRequest
from nestbox.controlplane.services.usage import parse_day
from nestbox.protocol.metrics import (
    METRICS_RANGES,
    STATS_RANGES,
    MetricsView,
    StatsView,
    UsageView,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


def _range(request: Request, allowed: dict[str, int], default: str) -> str:
    value = request.query_params.get("range", default)  # empty is not a range: 400
    if value not in allowed:
        raise InvalidRequest(f"range must be one of: {', '.join(allowed)}")
    return value


async def capsule_metrics(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    range_ = _range(request, METRICS_RANGES, "10m")
    metrics = deps.services(request).metrics
    return deps.json(await metrics.metrics(deps.principal(request), capsule_id, range_))


async def capsule_stats(request: Request) -> Response:
    range_ = _range(request, STATS_RANGES, "1h")
    stats = deps.services(request).stats
    return deps.json(await stats.stats(deps.principal(request), range_))


async def capsule_usage(request: Request) -> Response:
    first = parse_day(request.query_params.get("from"), "from")
    last = parse_day(request.query_params.get("to"), "to")
    view = await deps.services(request).usage.usage(deps.principal(request), first, last)
    return JSONResponse(view.model_dump(mode="json", by_alias=True))


router = Router(
    tag="metrics",
    endpoints=[
        Endpoint("GET", "/v1/capsules/stats", capsule_stats,
                 "What your team's capsules hold now, their peaks and a time series",
                 response=StatsView, query=[enum_query("range", "default 1h", list(STATS_RANGES))],
                 description="Counts capsules pending, starting, running, pausing, resuming or "
                 "snapshotting; peaks are over the last 30 days; series labels are UTC bucket "
                 "starts."),
        Endpoint("GET", "/v1/capsules/usage", capsule_usage,
                 "Per-day vCPU- and memory-minutes your team's capsules ran",
                 response=UsageView,
                 query=[("from", "first UTC day, YYYY-MM-DD (default: 29 days before to)"),
                        ("to", "last UTC day, included (default: today)")],
                 description="Running time (running, pausing, snapshotting) x size, cut at UTC "
                 "midnight; a capsule still running counts up to now. At most 366 days."),
        Endpoint("GET", CAPSULE + "/metrics", capsule_metrics,
                 "A capsule's CPU, memory and disk over time", response=MetricsView,
                 query=[enum_query("range", "default 10m", list(METRICS_RANGES))],
                 description="Kept by its host agent from creation on, through pauses (a paused "
                 "capsule answers its history): 1 s samples for 10 minutes, 30 s averages for "
                 "2 hours, 5-minute averages for 24 hours."),
    ],
)  # fmt: skip
