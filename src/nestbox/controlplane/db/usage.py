"""Capsule run intervals (`capsule_runs`, kept by triggers on `capsules`: migration 0005) and
the team stats samples (`stats_samples`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, or_, select

from nestbox.controlplane.db.capsules import HOLDS_RESOURCES
from nestbox.controlplane.db.models import CapsuleRow, CapsuleRunRow, StatsSampleRow

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class Run:
    capsule_id: str
    vcpus: int
    memory_mb: int
    started_at: datetime
    ended_at: datetime | None
    """None: still running."""


@dataclass(frozen=True, slots=True)
class Held:
    """What a team holds at one instant."""

    running_count: int = 0
    vcpus: int = 0
    memory_mb: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    sampled_at: datetime
    held: Held


class UsageRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def runs(self, team_id: str, start: datetime, end: datetime) -> list[Run]:
        """The team's run intervals that overlap [start, end)."""
        rows = await self._s.scalars(
            select(CapsuleRunRow).where(
                CapsuleRunRow.team_id == team_id, CapsuleRunRow.started_at < end,
                or_(CapsuleRunRow.ended_at.is_(None), CapsuleRunRow.ended_at > start),
            ).order_by(CapsuleRunRow.id)
        )  # fmt: skip
        return [Run(r.capsule_id, r.vcpus, r.memory_mb, r.started_at, r.ended_at) for r in rows]

    # ── stats ──

    async def held(self, team_id: str | None = None) -> dict[str, Held]:
        """Per team (or only `team_id`): its capsules that hold resources, their vCPUs and
        memory. Teams holding nothing are left out."""
        query = (
            select(CapsuleRow.team_id, func.count(), func.sum(CapsuleRow.vcpus),
                   func.sum(CapsuleRow.memory_mb))
            .where(CapsuleRow.status.in_(HOLDS_RESOURCES)).group_by(CapsuleRow.team_id)
        )  # fmt: skip
        if team_id is not None:
            query = query.where(CapsuleRow.team_id == team_id)
        rows = await self._s.execute(query)
        return {str(t): Held(int(n), int(v or 0), int(m or 0)) for t, n, v, m in rows.all()}

    async def add_samples(self, at: datetime, held: dict[str, Held]) -> None:
        self._s.add_all(
            StatsSampleRow(team_id=team, sampled_at=at, running_count=h.running_count,
                           vcpus_reserved=h.vcpus, memory_mb_reserved=h.memory_mb)
            for team, h in held.items()
        )  # fmt: skip
        await self._s.flush()

    async def samples(self, team_id: str, since: datetime) -> list[Sample]:
        rows = await self._s.scalars(
            select(StatsSampleRow)
            .where(StatsSampleRow.team_id == team_id, StatsSampleRow.sampled_at >= since)
            .order_by(StatsSampleRow.sampled_at)
        )
        return [Sample(r.sampled_at, Held(r.running_count, r.vcpus_reserved,
                                          r.memory_mb_reserved)) for r in rows]  # fmt: skip

    async def peaks(self, team_id: str, since: datetime) -> Held:
        row = (await self._s.execute(
            select(func.max(StatsSampleRow.running_count), func.max(StatsSampleRow.vcpus_reserved),
                   func.max(StatsSampleRow.memory_mb_reserved))
            .where(StatsSampleRow.team_id == team_id, StatsSampleRow.sampled_at >= since)
        )).one()  # fmt: skip
        return Held(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))

    async def prune_samples(self, before: datetime) -> None:
        await self._s.execute(delete(StatsSampleRow).where(StatsSampleRow.sampled_at < before))
