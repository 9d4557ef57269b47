"""Templates: the platform's (visible to every team, owned by the platform team) and each
team's snapshot templates. A team's own template shadows a platform one of the same name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, select, update

from nestbox.controlplane.db.models import TemplateRow
from nestbox.protocol.ids import IdPrefix, zero_id

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

PLATFORM_TEAM_ID = zero_id(IdPrefix.TEAM)
"""Owner of the platform's templates; seeded by the initial migration, nobody's member."""
MINIMAL_TEMPLATE_ID = zero_id(IdPrefix.TEMPLATE)


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    team_id: str
    name: str
    type: str
    host_id: str | None
    vcpus: int | None
    memory_mb: int | None
    size_bytes: int
    default_user: str
    created_at: datetime
    default_env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_by: str | None = None

    @property
    def platform(self) -> bool:
        return self.team_id == PLATFORM_TEAM_ID


def _record(row: TemplateRow) -> Template:
    return Template(
        id=row.id,
        team_id=row.team_id,
        name=row.name,
        type=row.type,
        host_id=row.host_id,
        vcpus=row.vcpus,
        memory_mb=row.memory_mb,
        size_bytes=row.size_bytes,
        default_user=row.default_user,
        created_at=row.created_at,
        default_env={str(k): str(v) for k, v in row.default_env.items()},
        metadata=dict(row.meta),
        created_by=row.created_by,
    )


class TemplateRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def find(self, team_id: str, name: str) -> Template | None:
        """The template `name` as `team_id` sees it: its own, else the platform's."""
        row = await self._s.scalar(
            select(TemplateRow)
            .where(TemplateRow.name == name, TemplateRow.team_id.in_((team_id, PLATFORM_TEAM_ID)))
            .order_by(case((TemplateRow.team_id == team_id, 0), else_=1))
            .limit(1)
        )
        return _record(row) if row is not None else None

    async def list_visible(self, team_id: str, *, type_: str | None = None) -> list[Template]:
        query = select(TemplateRow).where(TemplateRow.team_id.in_((team_id, PLATFORM_TEAM_ID)))
        if type_ is not None:
            query = query.where(TemplateRow.type == type_)
        rows = await self._s.scalars(query.order_by(TemplateRow.name, TemplateRow.team_id))
        return [_record(r) for r in rows]

    # ── a team's snapshot templates (added for the snapshots service) ──

    async def list_all(self) -> list[Template]:
        """Every team's templates and the platform's (platform admins)."""
        rows = await self._s.scalars(select(TemplateRow).order_by(TemplateRow.team_id,
                                                                  TemplateRow.name))  # fmt: skip
        return [_record(r) for r in rows]

    async def own(self, team_id: str, name: str) -> Template | None:
        """The template `name` of `team_id` itself (never the platform's)."""
        row = await self._s.scalar(
            select(TemplateRow).where(TemplateRow.team_id == team_id, TemplateRow.name == name)
        )
        return _record(row) if row is not None else None

    async def platform_named(self, name: str) -> Template | None:
        return await self.own(PLATFORM_TEAM_ID, name)

    async def of_team(self, team_id: str) -> list[Template]:
        """The team's own templates (never the platform's)."""
        rows = await self._s.scalars(
            select(TemplateRow).where(TemplateRow.team_id == team_id).order_by(TemplateRow.id)
        )
        return [_record(r) for r in rows]

    async def create(
        self,
        *,
        template_id: str,
        team_id: str,
        name: str,
        host_id: str | None,
        vcpus: int | None,
        memory_mb: int | None,
        default_user: str,
        default_env: dict[str, str],
        metadata: dict[str, Any],
        type_: str = "snapshot",
        size_bytes: int = 0,
        created_by: str | None = None,
    ) -> Template:
        row = TemplateRow(
            id=template_id, team_id=team_id, name=name, type=type_, host_id=host_id,
            vcpus=vcpus, memory_mb=memory_mb, size_bytes=size_bytes, default_user=default_user,
            default_env=dict(default_env), meta=dict(metadata), created_by=created_by,
        )  # fmt: skip
        self._s.add(row)
        await self._s.flush()
        await self._s.refresh(row)
        return _record(row)

    async def set_size(self, template_id: str, size_bytes: int) -> None:
        await self._s.execute(
            update(TemplateRow).where(TemplateRow.id == template_id).values(size_bytes=size_bytes)
        )

    async def delete(self, template_id: str) -> None:
        row = await self._s.get(TemplateRow, template_id)
        if row is not None:
            await self._s.delete(row)
            await self._s.flush()
