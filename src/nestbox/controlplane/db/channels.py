"""Notification channels and their outbox (`channel_deliveries`).

The outbox is claimed by a compare-and-set on `next_attempt_at` (a lease): whichever control
plane moves it first delivers, the others see no row changed. Only the oldest pending delivery
of a channel is ever due, so a channel's events arrive in the order they were published even
while one of them is being retried.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.orm import aliased

from nestbox.controlplane.db.models import ChannelDeliveryRow, ChannelRow

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    team_id: str
    name: str
    provider: str
    config_enc: str
    event_types: list[str]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    delivery_id: str
    channel_id: str
    event_id: int
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str
    response_status: int | None
    created_at: datetime
    finished_at: datetime | None


def _channel(r: ChannelRow) -> Channel:
    return Channel(r.id, r.team_id, r.name, r.provider, r.config_enc, list(r.event_types),
                   r.created_at, r.updated_at)  # fmt: skip


def _delivery(r: ChannelDeliveryRow) -> Delivery:
    return Delivery(r.id, r.delivery_id, r.channel_id, r.event_id, r.event_type, r.status,
                    r.attempts, r.next_attempt_at, r.last_error, r.response_status,
                    r.created_at, r.finished_at)  # fmt: skip


class ChannelRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    # ── channels ──

    async def create(self, channel: Channel) -> Channel:
        row = ChannelRow(id=channel.id, team_id=channel.team_id, name=channel.name,
                         provider=channel.provider, config_enc=channel.config_enc,
                         event_types=list(channel.event_types), created_at=channel.created_at,
                         updated_at=channel.updated_at)  # fmt: skip
        self._s.add(row)
        await self._s.flush()
        return _channel(row)

    async def get(self, team_id: str, channel_id: str) -> Channel | None:
        row = await self._s.scalar(
            select(ChannelRow).where(ChannelRow.id == channel_id, ChannelRow.team_id == team_id)
        )
        return _channel(row) if row is not None else None

    async def by_id(self, channel_id: str) -> Channel | None:
        row = await self._s.get(ChannelRow, channel_id)
        return _channel(row) if row is not None else None

    async def list_team(self, team_id: str) -> list[Channel]:
        rows = await self._s.scalars(
            select(ChannelRow).where(ChannelRow.team_id == team_id).order_by(ChannelRow.name)
        )
        return [_channel(r) for r in rows]

    async def update(self, team_id: str, channel_id: str, **values: Any) -> Channel | None:
        await self._s.execute(
            update(ChannelRow)
            .where(ChannelRow.id == channel_id, ChannelRow.team_id == team_id)
            .values(**values)
        )
        return await self.get(team_id, channel_id)

    async def delete(self, team_id: str, channel_id: str) -> bool:
        result = await self._s.execute(
            delete(ChannelRow).where(ChannelRow.id == channel_id, ChannelRow.team_id == team_id)
        )
        return bool(getattr(result, "rowcount", 0))

    async def subscribed(self, team_id: str, event_type: str) -> list[str]:
        """Ids of the team's channels that subscribe to `event_type`."""
        rows = await self._s.execute(
            select(ChannelRow.id, ChannelRow.event_types).where(ChannelRow.team_id == team_id)
        )
        return [cid for cid, types in rows.all() if event_type in (types or ())]

    # ── the outbox ──

    async def enqueue(self, channel_id: str, event_id: int, event_type: str, now: datetime) -> None:
        self._s.add(ChannelDeliveryRow(
            delivery_id=str(uuid.uuid4()), channel_id=channel_id, event_id=event_id,
            event_type=event_type, status=PENDING, attempts=0, next_attempt_at=now,
            last_error="", created_at=now,
        ))  # fmt: skip
        await self._s.flush()

    async def due(self, now: datetime, limit: int = 50) -> list[Delivery]:
        """The oldest pending delivery of each channel, where it is due."""
        older = aliased(ChannelDeliveryRow)
        head = ~select(older.id).where(
            and_(older.channel_id == ChannelDeliveryRow.channel_id, older.status == PENDING,
                 older.id < ChannelDeliveryRow.id)
        ).exists()  # fmt: skip
        rows = await self._s.scalars(
            select(ChannelDeliveryRow)
            .where(ChannelDeliveryRow.status == PENDING, head,
                   ChannelDeliveryRow.next_attempt_at <= now)
            .order_by(ChannelDeliveryRow.id).limit(limit)
        )  # fmt: skip
        return [_delivery(r) for r in rows]

    async def claim(self, delivery: Delivery, lease_until: datetime) -> bool:
        """Take `delivery` for one attempt: False if another control plane took it first."""
        result = await self._s.execute(
            update(ChannelDeliveryRow)
            .where(ChannelDeliveryRow.id == delivery.id, ChannelDeliveryRow.status == PENDING,
                   ChannelDeliveryRow.next_attempt_at == delivery.next_attempt_at)
            .values(next_attempt_at=lease_until, attempts=ChannelDeliveryRow.attempts + 1)
        )  # fmt: skip
        return bool(getattr(result, "rowcount", 0))

    async def finish(self, delivery_id: int, **values: Any) -> None:
        await self._s.execute(
            update(ChannelDeliveryRow).where(ChannelDeliveryRow.id == delivery_id).values(**values)
        )

    async def deliveries(self, channel_id: str, limit: int) -> list[Delivery]:
        """The channel's latest deliveries, newest first."""
        rows = await self._s.scalars(
            select(ChannelDeliveryRow)
            .where(ChannelDeliveryRow.channel_id == channel_id)
            .order_by(ChannelDeliveryRow.id.desc()).limit(limit)
        )  # fmt: skip
        return [_delivery(r) for r in rows]

    async def prune(self, before: datetime) -> None:
        """Forget finished deliveries older than `before`."""
        await self._s.execute(
            delete(ChannelDeliveryRow).where(ChannelDeliveryRow.status != PENDING,
                                             ChannelDeliveryRow.created_at < before)
        )  # fmt: skip

    async def next_due(self) -> datetime | None:
        """When the earliest pending delivery is due (None: nothing pending)."""
        found: datetime | None = await self._s.scalar(
            select(func.min(ChannelDeliveryRow.next_attempt_at))
            .where(ChannelDeliveryRow.status == PENDING)
        )  # fmt: skip
        return found
