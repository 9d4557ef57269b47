"""Template builds: the queue (claimed with `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL;
SQLite ignores the clause and serialises writers with `BEGIN IMMEDIATE` instead), progress and
outcome. Every update of a build a worker runs is conditional on that worker still owning it,
so a worker that lost its build (a cancel, a stale claim taken over) never writes over it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update

from nestbox.controlplane.db.base import utcnow
from nestbox.controlplane.db.models import BuildRow, CapsuleRow

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

PENDING, RUNNING = "pending", "running"


@dataclass(frozen=True, slots=True)
class Build:
    id: str
    team_id: str
    created_by: str | None
    name: str
    base_template: str
    recipe: list[str]
    healthcheck: str | None
    vcpus: int | None
    memory_mb: int | None
    skip_pre_post: bool
    status: str
    current_step: int
    total_steps: int
    error: str | None
    archive: str | None
    capsule_id: str | None
    host_id: str | None
    template_id: str | None
    template_type: str | None
    default_user: str
    default_workdir: str | None
    cancel_requested: bool
    worker: str | None
    attempts: int
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    logs: list[dict[str, Any]] = field(default_factory=list)
    default_env: dict[str, str] = field(default_factory=dict)


def _record(row: BuildRow) -> Build:
    return Build(
        id=row.id, team_id=row.team_id, created_by=row.created_by, name=row.name,
        base_template=row.base_template, recipe=[str(x) for x in row.recipe],
        healthcheck=row.healthcheck, vcpus=row.vcpus, memory_mb=row.memory_mb,
        skip_pre_post=row.skip_pre_post, status=row.status, current_step=row.current_step,
        total_steps=row.total_steps, error=row.error, archive=row.archive,
        capsule_id=row.capsule_id, host_id=row.host_id, template_id=row.template_id,
        template_type=row.template_type, default_user=row.default_user,
        default_workdir=row.default_workdir, cancel_requested=row.cancel_requested,
        worker=row.worker, attempts=row.attempts, heartbeat_at=row.heartbeat_at,
        created_at=row.created_at, started_at=row.started_at, completed_at=row.completed_at,
        logs=[dict(e) for e in row.logs],
        default_env={str(k): str(v) for k, v in row.default_env.items()},
    )  # fmt: skip


class BuildRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(self, **values: Any) -> Build:
        now = utcnow()
        row = BuildRow(**values, created_at=now, updated_at=now)
        self._s.add(row)
        await self._s.flush()
        await self._s.refresh(row)
        return _record(row)

    async def get(self, build_id: str) -> Build | None:
        row = await self._s.get(BuildRow, build_id, populate_existing=True)
        return _record(row) if row is not None else None

    async def newest(self, team_id: str | None, *, limit: int) -> list[Build]:
        """Newest first; every team's when `team_id` is None."""
        query = select(BuildRow)
        if team_id is not None:
            query = query.where(BuildRow.team_id == team_id)
        rows = await self._s.scalars(
            query.order_by(BuildRow.created_at.desc(), BuildRow.id).limit(limit)
        )
        return [_record(r) for r in rows]

    async def claim(self, worker: str, *, stale_before: datetime) -> Build | None:
        """The oldest build to run, now `running` for `worker`: a pending one, or one whose
        worker stopped heartbeating before `stale_before` (its attempt counted again). One row
        is selected and locked (`FOR UPDATE` locks every row a query returns: a larger limit
        would hold back builds another worker could take)."""
        rows = list(await self._s.scalars(
            select(BuildRow)
            .where(or_(BuildRow.status == PENDING,
                       (BuildRow.status == RUNNING) & (BuildRow.heartbeat_at < stale_before)))
            .order_by(BuildRow.created_at, BuildRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ))  # fmt: skip
        if not rows:
            return None
        row = rows[0]
        now = utcnow()
        row.status, row.worker, row.heartbeat_at = RUNNING, worker, now
        row.attempts += 1
        row.started_at = row.started_at or now
        await self._s.flush()
        return _record(row)

    async def update(self, build_id: str, *, worker: str | None = None, **values: Any) -> bool:
        """Set columns; with `worker`, only while the build is running for that worker.
        False if nothing was changed."""
        values.setdefault("updated_at", utcnow())
        query = update(BuildRow).where(BuildRow.id == build_id)
        if worker is not None:
            query = query.where(BuildRow.worker == worker, BuildRow.status == RUNNING)
        result = await self._s.execute(query.values(**values))
        return bool(getattr(result, "rowcount", 0))

    async def heartbeat(self, worker: str, build_ids: Iterable[str]) -> list[str]:
        """Mark the worker's running builds alive; the ids among them someone asked to cancel
        (or that are no longer the worker's)."""
        ids = tuple(build_ids)
        if not ids:
            return []
        now = utcnow()
        await self._s.execute(
            update(BuildRow)
            .where(BuildRow.id.in_(ids), BuildRow.worker == worker, BuildRow.status == RUNNING)
            .values(heartbeat_at=now)
        )
        rows = await self._s.execute(
            select(BuildRow.id, BuildRow.status, BuildRow.worker, BuildRow.cancel_requested)
            .where(BuildRow.id.in_(ids))
        )  # fmt: skip
        found = rows.all()
        lost = {str(i) for i, s, w, c in found if c or s != RUNNING or w != worker}
        gone = set(ids) - {str(i) for i, *_ in found}  # its team was deleted
        return sorted(lost | gone)

    async def request_cancel(self, build_id: str) -> str | None:
        """Ask for a cancel: a pending build is cancelled at once, a running one is flagged
        for its worker. The status afterwards (None: no such build)."""
        row = await self._s.get(BuildRow, build_id, with_for_update=True, populate_existing=True)
        if row is None:
            return None
        if row.status == PENDING:
            row.status, row.completed_at = "cancelled", utcnow()
            row.error = "cancelled before it started"
        elif row.status == RUNNING:
            row.cancel_requested = True
        await self._s.flush()
        return row.status

    async def capsules_using(self, template_id: str, *, exclude: Iterable[str]) -> list[str]:
        """Ids of the capsules made from the template, but those in `exclude` statuses (what
        keeps a template from being deleted)."""
        rows = await self._s.scalars(
            select(CapsuleRow.id)
            .where(CapsuleRow.template_id == template_id,
                   CapsuleRow.status.not_in(tuple(exclude)))
            .order_by(CapsuleRow.id)
        )  # fmt: skip
        return [str(r) for r in rows]
