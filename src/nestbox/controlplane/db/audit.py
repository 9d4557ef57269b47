"""The audit trail: who did what to which resource, newest last. Rows are only ever added."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from nestbox.controlplane.db.models import AuditLogRow

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What to record. `actor_type` is user | api_key | host | system."""

    action: str
    resource_type: str
    resource_id: str = ""
    team_id: str | None = None
    actor_type: str = "system"
    actor_id: str = ""
    actor_name: str = ""
    scope: str = "team"
    status: str = "success"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    event: AuditEvent
    created_at: datetime


class AuditRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def record(self, event: AuditEvent) -> None:
        self._s.add(
            AuditLogRow(
                team_id=event.team_id,
                actor_type=event.actor_type,
                actor_id=event.actor_id,
                actor_name=event.actor_name,
                resource_type=event.resource_type,
                resource_id=event.resource_id,
                action=event.action,
                scope=event.scope,
                status=event.status,
                meta=dict(event.metadata),
            )
        )
        await self._s.flush()

    async def list(
        self, team_id: str | None, *, limit: int = 100, before_id: int | None = None
    ) -> list[AuditEntry]:
        """Newest first; `team_id=None` lists every team's (platform admins)."""
        query = select(AuditLogRow).order_by(AuditLogRow.id.desc()).limit(limit)
        if team_id is not None:
            query = query.where(AuditLogRow.team_id == team_id)
        if before_id is not None:
            query = query.where(AuditLogRow.id < before_id)
        rows = await self._s.scalars(query)
        return [
            AuditEntry(
                id=r.id,
                created_at=r.created_at,
                event=AuditEvent(
                    action=r.action,
                    resource_type=r.resource_type,
                    resource_id=r.resource_id,
                    team_id=r.team_id,
                    actor_type=r.actor_type,
                    actor_id=r.actor_id,
                    actor_name=r.actor_name,
                    scope=r.scope,
                    status=r.status,
                    metadata=dict(r.meta),
                ),
            )
            for r in rows
        ]
