"""Capsules: what the control plane knows of each one (its team, host, template, machine and
status). The host agent holds the truth about a capsule's VM; these rows follow it through the
lifecycle services, the host monitor and the reconciler.

`destroyed` is a status of rows only: a capsule its user destroyed is kept (for the audit trail
and usage) but is gone from every read the API makes. Updates can be made conditional on the
status and `last_updated` the caller read (`expect=`), so a background loop never overwrites a
change an API call made meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update

from nestbox.controlplane.db.base import utcnow
from nestbox.controlplane.db.models import CapsuleRow
from nestbox.protocol.metadata import KEY

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

DESTROYED = "destroyed"
"""Status of a capsule its user destroyed: never shown, never counted."""
HOLDS_RESOURCES = ("pending", "starting", "running", "pausing", "resuming", "snapshotting")
"""Statuses whose capsule holds (or is about to hold) memory and vCPUs on its host."""


@dataclass(frozen=True, slots=True)
class Capsule:
    id: str
    team_id: str
    host_id: str | None
    template: str
    template_id: str | None
    status: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    timeout_sec: int
    guest_ip: str
    host_ip: str
    created_at: datetime
    started_at: datetime | None
    last_active_at: datetime | None
    last_updated: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    template_type: str = "snapshot"
    allow_internet_access: bool = False
    egress_allow: tuple[str, ...] = ()
    auto_resume: bool = False
    ttl_sec: int = 0
    on_timeout: str = "pause"
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PageKey:
    """Where a page of `page_team` starts: after the capsule with this (created_at, id)."""

    created_at: datetime
    id: str


@dataclass(frozen=True, slots=True)
class Committed:
    """What one host's capsules hold: their count, vCPUs, memory and disk."""

    capsules: int = 0
    vcpus: int = 0
    memory_mb: int = 0
    disk_mb: int = 0


@dataclass(frozen=True, slots=True)
class Expect:
    """An update's precondition: the row still has this status and `last_updated`."""

    status: str
    last_updated: datetime | None = None


def _record(row: CapsuleRow) -> Capsule:
    return Capsule(
        id=row.id, team_id=row.team_id, host_id=row.host_id, template=row.template,
        template_id=row.template_id, status=row.status, vcpus=row.vcpus,
        memory_mb=row.memory_mb, disk_mb=row.disk_mb, timeout_sec=row.timeout_sec,
        guest_ip=row.guest_ip, host_ip=row.host_ip, created_at=row.created_at,
        started_at=row.started_at, last_active_at=row.last_active_at,
        last_updated=row.last_updated, metadata=dict(row.meta), auto_resume=row.auto_resume,
        template_type=row.template_type, allow_internet_access=row.allow_internet_access,
        egress_allow=tuple(row.egress_allow or ()),
        ttl_sec=row.ttl_sec, on_timeout=row.on_timeout, expires_at=row.expires_at,
    )  # fmt: skip


class CapsuleRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(
        self,
        capsule_id: str,
        *,
        team_id: str,
        host_id: str,
        template: str,
        template_id: str | None,
        vcpus: int,
        memory_mb: int,
        disk_mb: int,
        timeout_sec: int,
        metadata: dict[str, str],
        **extra: Any,
    ) -> Capsule:
        """A `pending` row; `extra` sets the lifetime columns (auto_resume, ttl_sec, ...)."""
        now = utcnow()
        row = CapsuleRow(
            id=capsule_id, team_id=team_id, host_id=host_id, template=template,
            template_id=template_id, status="pending", vcpus=vcpus, memory_mb=memory_mb,
            disk_mb=disk_mb, timeout_sec=timeout_sec, guest_ip="", host_ip="", meta=metadata,
            created_at=now, last_updated=now, **extra,
        )  # fmt: skip
        self._s.add(row)
        await self._s.flush()
        return _record(row)

    async def get(self, capsule_id: str) -> Capsule | None:
        """Any capsule, destroyed ones included."""
        row = await self._s.get(CapsuleRow, capsule_id)
        return _record(row) if row is not None else None

    async def visible(self, team_id: str, capsule_id: str) -> Capsule | None:
        """The capsule if it belongs to `team_id` and was not destroyed."""
        row = await self._s.scalar(
            select(CapsuleRow).where(CapsuleRow.id == capsule_id, CapsuleRow.team_id == team_id,
                                     CapsuleRow.status != DESTROYED)
        )  # fmt: skip
        return _record(row) if row is not None else None

    async def list_team(self, team_id: str) -> list[Capsule]:
        rows = await self._s.scalars(
            select(CapsuleRow)
            .where(CapsuleRow.team_id == team_id, CapsuleRow.status != DESTROYED)
            .order_by(CapsuleRow.created_at, CapsuleRow.id)
        )
        return [_record(r) for r in rows]

    async def page_team(
        self,
        team_id: str,
        *,
        statuses: Iterable[str] | None = None,
        metadata: dict[str, str] | None = None,
        after: PageKey | None = None,
        limit: int | None = None,
    ) -> list[Capsule]:
        """The team's capsules (not destroyed) in (created_at, id) order: only `statuses`,
        only those whose metadata holds every pair of `metadata`, only after `after` (keyset
        paging: a capsule created meanwhile sorts after every page already read), at most
        `limit`."""
        query = select(CapsuleRow).where(
            CapsuleRow.team_id == team_id, CapsuleRow.status != DESTROYED
        )
        if statuses is not None:
            query = query.where(CapsuleRow.status.in_(tuple(statuses)))
        for key, value in (metadata or {}).items():
            if KEY.fullmatch(key) is None:  # no capsule holds it, and no JSON path may name it
                return []
            query = query.where(CapsuleRow.meta[key].as_string() == value)
        if after is not None:
            query = query.where(
                or_(
                    CapsuleRow.created_at > after.created_at,
                    and_(CapsuleRow.created_at == after.created_at, CapsuleRow.id > after.id),
                )
            )
        query = query.order_by(CapsuleRow.created_at, CapsuleRow.id)
        if limit is not None:
            query = query.limit(limit)
        return [_record(r) for r in await self._s.scalars(query)]

    async def expired(self, now: datetime, statuses: Iterable[str]) -> list[Capsule]:
        """Capsules in `statuses` whose lifetime ended by `now` (services/lifetime.py)."""
        rows = await self._s.scalars(
            select(CapsuleRow)
            .where(CapsuleRow.expires_at <= now, CapsuleRow.status.in_(tuple(statuses)))
            .order_by(CapsuleRow.expires_at, CapsuleRow.id)
        )
        return [_record(r) for r in rows]

    async def on_host(
        self, host_id: str, *, statuses: Iterable[str] | None = None
    ) -> list[Capsule]:
        """The host's capsules (not destroyed), optionally only those in `statuses`."""
        query = select(CapsuleRow).where(CapsuleRow.host_id == host_id)
        if statuses is None:
            query = query.where(CapsuleRow.status != DESTROYED)
        else:
            query = query.where(CapsuleRow.status.in_(tuple(statuses)))
        return [_record(r) for r in await self._s.scalars(query.order_by(CapsuleRow.id))]

    async def count_by_host(self, host_ids: Iterable[str]) -> dict[str, int]:
        """How many capsules (not destroyed, as `on_host`) each of `host_ids` has; a host with
        none is left out."""
        ids = tuple(host_ids)
        if not ids:
            return {}
        rows = await self._s.execute(
            select(CapsuleRow.host_id, func.count())
            .where(CapsuleRow.host_id.in_(ids), CapsuleRow.status != DESTROYED)
            .group_by(CapsuleRow.host_id)
        )
        return {str(host): int(n) for host, n in rows.all()}

    async def count_on_host(self, host_id: str) -> dict[str, int]:
        """How many of the host's capsules are in each status."""
        rows = await self._s.execute(
            select(CapsuleRow.status, func.count())
            .where(CapsuleRow.host_id == host_id)
            .group_by(CapsuleRow.status)
        )
        return {str(status): int(n) for status, n in rows.all()}

    async def count_holding(self, team_id: str) -> int:
        """How many of the team's capsules hold resources (what its quota counts)."""
        return int(await self._s.scalar(
            select(func.count()).select_from(CapsuleRow)
            .where(CapsuleRow.team_id == team_id, CapsuleRow.status.in_(HOLDS_RESOURCES))
        ) or 0)  # fmt: skip

    async def in_status(self, statuses: Iterable[str], *, before: datetime) -> list[Capsule]:
        """Capsules in `statuses` unchanged since `before` (stuck ones, for the reconciler)."""
        rows = await self._s.scalars(
            select(CapsuleRow)
            .where(CapsuleRow.status.in_(tuple(statuses)), CapsuleRow.last_updated <= before)
            .order_by(CapsuleRow.id)
        )
        return [_record(r) for r in rows]

    async def destroy_team(self, team_id: str) -> None:
        """Every capsule of the team becomes `destroyed` (the team is being deleted)."""
        await self._s.execute(
            update(CapsuleRow)
            .where(CapsuleRow.team_id == team_id, CapsuleRow.status != DESTROYED)
            .values(status=DESTROYED, host_ip="", last_updated=utcnow())
        )

    async def committed(self) -> dict[str, Committed]:
        """Per host: what its capsules that hold resources add up to."""
        rows = await self._s.execute(
            select(CapsuleRow.host_id, func.count(), func.sum(CapsuleRow.vcpus),
                   func.sum(CapsuleRow.memory_mb), func.sum(CapsuleRow.disk_mb))
            .where(CapsuleRow.status.in_(HOLDS_RESOURCES), CapsuleRow.host_id.is_not(None))
            .group_by(CapsuleRow.host_id)
        )  # fmt: skip
        return {
            str(host): Committed(int(n), int(v or 0), int(m or 0), int(d or 0))
            for host, n, v, m, d in rows.all()
        }

    async def update(self, capsule_id: str, *, expect: Expect | None = None, **values: Any) -> bool:
        """Set columns (`metadata=` for the JSON column); False if `expect` no longer holds.
        `destroyed` is final: a destroyed row is never changed again (a call that finishes
        after its team was deleted must not bring the capsule back)."""
        if "metadata" in values:
            values["meta"] = values.pop("metadata")
        values.setdefault("last_updated", utcnow())
        query = update(CapsuleRow).where(CapsuleRow.id == capsule_id)
        if values.get("status") != DESTROYED:
            query = query.where(CapsuleRow.status != DESTROYED)
        if expect is not None:
            query = query.where(CapsuleRow.status == expect.status)
            if expect.last_updated is not None:
                query = query.where(CapsuleRow.last_updated == expect.last_updated)
        result = await self._s.execute(query.values(**values))
        return bool(getattr(result, "rowcount", 0))

    async def set_status_on_host(
        self, host_id: str, status: str, *, among: Iterable[str]
    ) -> list[str]:
        """Every capsule of `host_id` whose status is in `among` gets `status`; their ids."""
        ids = list(await self._s.scalars(
            select(CapsuleRow.id).where(CapsuleRow.host_id == host_id,
                                        CapsuleRow.status.in_(tuple(among)))
        ))  # fmt: skip
        if ids:
            await self._s.execute(
                update(CapsuleRow).where(CapsuleRow.id.in_(ids))
                .values(status=status, last_updated=utcnow())
            )  # fmt: skip
        return ids
