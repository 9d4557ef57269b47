"""Teams and their memberships (the aggregate: a team with its members and their roles).

A soft-deleted team (`deleted_at` set) is gone for every read here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update

from nestbox.controlplane.db.base import utcnow
from nestbox.controlplane.db.models import TeamMemberRow, TeamRow, UserRow
from nestbox.protocol.accounts import Role
from nestbox.protocol.ids import IdPrefix, new_id

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class Team:
    id: str
    name: str
    slug: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Membership:
    """One user's place in one team."""

    team: Team
    user_id: str
    role: Role
    is_default: bool
    joined_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    """One row of a team's member list."""

    user_id: str
    email: str
    name: str
    role: Role
    joined_at: datetime


def _team(row: TeamRow) -> Team:
    return Team(id=row.id, name=row.name, slug=row.slug, created_at=row.created_at)


def _membership(team: TeamRow, m: TeamMemberRow) -> Membership:
    return Membership(
        team=_team(team),
        user_id=m.user_id,
        role=Role(m.role),
        is_default=m.is_default,
        joined_at=m.created_at,
    )


def new_slug() -> str:
    """Wrenn's immutable team slug: 12 hex characters shown as `a1b2c3-d1e2f3`."""
    raw = secrets.token_hex(6)
    return f"{raw[:6]}-{raw[6:]}"


class TeamRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(self, name: str, *, team_id: str | None = None) -> Team:
        row = TeamRow(id=team_id or new_id(IdPrefix.TEAM), name=name, slug=new_slug())
        self._s.add(row)
        await self._s.flush()
        return _team(row)

    async def get(self, team_id: str) -> Team | None:
        row = await self._s.get(TeamRow, team_id)
        return _team(row) if row is not None and row.deleted_at is None else None

    async def lock(self, team_id: str) -> None:
        """Hold the team's row until the transaction ends, so that checks of the team's totals
        (its capsule quota) are serialised across processes (PostgreSQL: `FOR UPDATE`; SQLite
        serialises every writing transaction already)."""
        await self._s.execute(select(TeamRow.id).where(TeamRow.id == team_id).with_for_update())

    async def rename(self, team_id: str, name: str) -> None:
        await self._s.execute(update(TeamRow).where(TeamRow.id == team_id).values(name=name))

    async def soft_delete(self, team_id: str) -> None:
        await self._s.execute(
            update(TeamRow).where(TeamRow.id == team_id).values(deleted_at=utcnow())
        )
        # Nobody lands in a deleted team at login any more.
        await self._s.execute(
            update(TeamMemberRow).where(TeamMemberRow.team_id == team_id).values(is_default=False)
        )

    async def list_all(self) -> list[tuple[Team, int]]:
        """Every live team with its member count (platform admins)."""
        count = (
            select(func.count())
            .where(TeamMemberRow.team_id == TeamRow.id)
            .correlate(TeamRow)
            .scalar_subquery()
        )
        rows = await self._s.execute(
            select(TeamRow, count).where(TeamRow.deleted_at.is_(None)).order_by(TeamRow.created_at)
        )
        return [(_team(t), int(n)) for t, n in rows]

    # ── memberships ──

    async def add_member(
        self, team_id: str, user_id: str, role: Role, *, is_default: bool = False
    ) -> Membership:
        m = TeamMemberRow(team_id=team_id, user_id=user_id, role=role, is_default=is_default)
        self._s.add(m)
        await self._s.flush()
        team = await self._s.get(TeamRow, team_id)
        assert team is not None
        return _membership(team, m)

    async def membership(self, team_id: str, user_id: str) -> Membership | None:
        row = await self._s.execute(
            select(TeamRow, TeamMemberRow)
            .join(TeamMemberRow, TeamMemberRow.team_id == TeamRow.id)
            .where(
                TeamRow.id == team_id,
                TeamMemberRow.user_id == user_id,
                TeamRow.deleted_at.is_(None),
            )
        )
        found = row.first()
        return _membership(*found) if found is not None else None

    async def memberships(self, user_id: str) -> list[Membership]:
        """The user's live teams, the default one first, then oldest first."""
        rows = await self._s.execute(
            select(TeamRow, TeamMemberRow)
            .join(TeamMemberRow, TeamMemberRow.team_id == TeamRow.id)
            .where(TeamMemberRow.user_id == user_id, TeamRow.deleted_at.is_(None))
            .order_by(TeamMemberRow.is_default.desc(), TeamMemberRow.created_at, TeamRow.id)
        )
        return [_membership(t, m) for t, m in rows]

    async def members(self, team_id: str) -> list[Member]:
        rows = await self._s.execute(
            select(TeamMemberRow, UserRow)
            .join(UserRow, UserRow.id == TeamMemberRow.user_id)
            .where(TeamMemberRow.team_id == team_id)
            .order_by(TeamMemberRow.created_at, UserRow.email)
        )
        return [
            Member(
                user_id=u.id, email=u.email, name=u.name, role=Role(m.role), joined_at=m.created_at
            )
            for m, u in rows
        ]

    async def set_role(self, team_id: str, user_id: str, role: Role) -> None:
        await self._s.execute(
            update(TeamMemberRow)
            .where(TeamMemberRow.team_id == team_id, TeamMemberRow.user_id == user_id)
            .values(role=role)
        )

    async def remove_member(self, team_id: str, user_id: str) -> None:
        await self._s.execute(
            delete(TeamMemberRow).where(
                TeamMemberRow.team_id == team_id, TeamMemberRow.user_id == user_id
            )
        )
