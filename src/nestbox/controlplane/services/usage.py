"""Per-day usage of a team (`GET /v1/capsules/usage`): vCPU-minutes and MiB-minutes of memory
its capsules ran, from their run intervals (`capsule_runs`: a row per stretch of `running`,
`pausing` or `snapshotting`, opened and closed by triggers on every status change, at the
row's `last_updated`). Each interval is cut at UTC midnights and counted at the size the
capsule had while it ran; an interval still open counts up to now. Paused, stopped and
destroyed time costs nothing.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING

from nestbox.controlplane.errors import InvalidRequest
from nestbox.protocol.metrics import UsagePoint, UsageView

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.controlplane.db import Database
    from nestbox.controlplane.services.principal import Principal

DEFAULT_DAYS = 30
MAX_DAYS = 366


def parse_day(value: str | None, name: str) -> date | None:
    """:raise InvalidRequest: not YYYY-MM-DD."""
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date (YYYY-MM-DD)") from None


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


class UsageService:
    def __init__(
        self, db: Database, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._db = db
        self.clock = clock

    async def usage(self, principal: Principal, first: date | None, last: date | None) -> UsageView:
        """Days `first`..`last` (UTC, both included; default the last 30 days).
        :raise InvalidRequest: `first` after `last`, or more than 366 days."""
        now = self.clock()
        last = last or now.date()
        first = first or last - timedelta(days=DEFAULT_DAYS - 1)
        if first > last:
            raise InvalidRequest("from must not be after to")
        days = (last - first).days + 1
        if days > MAX_DAYS:
            raise InvalidRequest(f"at most {MAX_DAYS} days at once")
        start, end = midnight(first), midnight(last) + timedelta(days=1)
        async with self._db.transaction() as tx:
            runs = await tx.usage.runs(principal.team_id, start, end)
        cpu = [0.0] * days
        ram = [0.0] * days
        for run in runs:
            begin = max(run.started_at, start)
            stop = min(run.ended_at or now, end)
            while begin < stop:
                index = (begin.date() - first).days
                cut = min(stop, midnight(begin.date()) + timedelta(days=1))
                minutes = (cut - begin).total_seconds() / 60
                cpu[index] += minutes * run.vcpus
                ram[index] += minutes * run.memory_mb
                begin = cut
        points = [
            UsagePoint(date=first + timedelta(days=i), cpu_minutes=round(cpu[i], 4),
                       ram_mb_minutes=round(ram[i], 4))
            for i in range(days)
        ]  # fmt: skip
        return UsageView.model_validate({"from": first, "to": last, "points": points})
