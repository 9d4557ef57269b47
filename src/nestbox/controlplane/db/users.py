"""Users: accounts, password hashes, platform-admin flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from nestbox.controlplane.db.models import TeamMemberRow, UserRow
from nestbox.protocol.ids import IdPrefix, new_id

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    name: str
    is_admin: bool
    status: str
    password_hash: str | None
    created_at: datetime

    @property
    def is_active(self) -> bool:
        return self.status == "active"


def _record(row: UserRow) -> User:
    return User(
        id=row.id,
        email=row.email,
        name=row.name,
        is_admin=row.is_admin,
        status=row.status,
        password_hash=row.password_hash,
        created_at=row.created_at,
    )


class UserRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(
        self, email: str, name: str, password_hash: str | None, *, is_admin: bool = False
    ) -> User:
        row = UserRow(
            id=new_id(IdPrefix.USER),
            email=email.lower(),
            name=name,
            password_hash=password_hash,
            is_admin=is_admin,
            status="active",
        )
        self._s.add(row)
        await self._s.flush()
        return _record(row)

    async def get(self, user_id: str) -> User | None:
        row = await self._s.get(UserRow, user_id)
        return _record(row) if row is not None else None

    async def get_by_email(self, email: str) -> User | None:
        row = await self._s.scalar(select(UserRow).where(UserRow.email == email.lower()))
        return _record(row) if row is not None else None

    async def count(self) -> int:
        return int(await self._s.scalar(select(func.count()).select_from(UserRow)) or 0)

    async def search(
        self, email_prefix: str, *, in_teams: Sequence[str], limit: int = 10
    ) -> list[User]:
        """Active users whose email starts with `email_prefix` and who belong to one of
        `in_teams`."""
        escaped = email_prefix.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        members = select(TeamMemberRow.user_id).where(TeamMemberRow.team_id.in_(tuple(in_teams)))
        rows = await self._s.scalars(
            select(UserRow)
            .where(UserRow.email.like(escaped + "%", escape="\\"), UserRow.status == "active",
                   UserRow.id.in_(members))
            .order_by(UserRow.email)
            .limit(limit)
        )  # fmt: skip
        return [_record(r) for r in rows]

    async def first_admin(self) -> User | None:
        """The oldest active platform admin."""
        row = await self._s.scalar(
            select(UserRow).where(UserRow.is_admin.is_(True), UserRow.status == "active")
            .order_by(UserRow.created_at, UserRow.id).limit(1)
        )  # fmt: skip
        return _record(row) if row is not None else None

    async def list_all(self, *, limit: int = 1000, offset: int = 0) -> list[User]:
        rows = await self._s.scalars(
            select(UserRow).order_by(UserRow.created_at, UserRow.id).limit(limit).offset(offset)
        )
        return [_record(r) for r in rows]

    async def update(
        self,
        user_id: str,
        *,
        name: str | None = None,
        password_hash: str | None = None,
        status: str | None = None,
        is_admin: bool | None = None,
    ) -> User | None:
        """Change the given fields; None leaves a field as it is."""
        row = await self._s.get(UserRow, user_id)
        if row is None:
            return None
        if name is not None:
            row.name = name
        if password_hash is not None:
            row.password_hash = password_hash
        if status is not None:
            row.status = status
        if is_admin is not None:
            row.is_admin = is_admin
        await self._s.flush()
        return _record(row)
