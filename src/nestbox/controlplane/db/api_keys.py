"""Team API keys. Only the SHA-256 of a key is stored, plus its first characters for display."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from nestbox.controlplane.db.models import ApiKeyRow, TeamMemberRow, TeamRow, UserRow
from nestbox.protocol.ids import IdPrefix, new_id

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    team_id: str
    name: str
    key_prefix: str
    created_by: str | None
    created_at: datetime
    last_used_at: datetime | None


def _record(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        team_id=row.team_id,
        name=row.name,
        key_prefix=row.key_prefix,
        created_by=row.created_by,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


class ApiKeyRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(
        self, team_id: str, name: str, key_hash: str, key_prefix: str, created_by: str | None
    ) -> ApiKey:
        row = ApiKeyRow(
            id=new_id(IdPrefix.API_KEY),
            team_id=team_id,
            name=name,
            key_hash=key_hash,
            key_prefix=key_prefix,
            created_by=created_by,
        )
        self._s.add(row)
        await self._s.flush()
        return _record(row)

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, if its team still exists."""
        row = await self._s.scalar(
            select(ApiKeyRow)
            .join(TeamRow, TeamRow.id == ApiKeyRow.team_id)
            .where(ApiKeyRow.key_hash == key_hash, TeamRow.deleted_at.is_(None))
        )
        return _record(row) if row is not None else None

    async def get(self, team_id: str, key_id: str) -> ApiKey | None:
        row = await self._s.scalar(
            select(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.team_id == team_id)
        )
        return _record(row) if row is not None else None

    async def list(self, team_id: str) -> list[ApiKey]:
        rows = await self._s.scalars(
            select(ApiKeyRow)
            .where(ApiKeyRow.team_id == team_id)
            .order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        )
        return [_record(r) for r in rows]

    async def delete(self, team_id: str, key_id: str) -> bool:
        result = await self._s.execute(
            delete(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.team_id == team_id)
        )
        return bool(getattr(result, "rowcount", 0))

    async def touch(self, key_id: str, when: datetime) -> None:
        await self._s.execute(
            update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=when)
        )

    async def delete_by_creator(self, team_id: str, user_id: str) -> tuple[str, ...]:
        """Revoke every key `user_id` made in `team_id` (they left it); the ids revoked."""
        ids = tuple(await self._s.scalars(
            select(ApiKeyRow.id).where(ApiKeyRow.team_id == team_id,
                                       ApiKeyRow.created_by == user_id)
        ))  # fmt: skip
        if ids:
            await self._s.execute(delete(ApiKeyRow).where(ApiKeyRow.id.in_(ids)))
        return ids

    async def delete_by_hash(self, key_hash: str) -> bool:
        result = await self._s.execute(delete(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash))
        return bool(getattr(result, "rowcount", 0))

    async def delete_team(self, team_id: str) -> None:
        await self._s.execute(delete(ApiKeyRow).where(ApiKeyRow.team_id == team_id))

    async def admin_held(self, team_id: str) -> bool:
        """Whether a key of `team_id` works for an active platform admin (made by one who is
        still a member): the operator's way in, so the team must not be deleted."""
        found = await self._s.scalar(
            select(ApiKeyRow.id)
            .join(UserRow, UserRow.id == ApiKeyRow.created_by)
            .join(TeamMemberRow, (TeamMemberRow.team_id == ApiKeyRow.team_id)
                  & (TeamMemberRow.user_id == ApiKeyRow.created_by))
            .where(ApiKeyRow.team_id == team_id, UserRow.is_admin.is_(True),
                   UserRow.status == "active")
            .limit(1)
        )  # fmt: skip
        return found is not None
