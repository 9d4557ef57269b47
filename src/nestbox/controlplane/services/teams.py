"""Teams and members. Roles: owner (one per team; may delete it) > admin (manages members and
the name) > member (uses the team's resources). A team the caller does not belong to is
`NotFound`; a team they belong to but may not change is `Forbidden`.

An API key sees only its own team; a user session sees every team the user belongs to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.errors import Conflict, Forbidden, InvalidRequest, NotFound
from nestbox.protocol.accounts import (
    Role,
    TeamDetailView,
    TeamMemberView,
    TeamView,
    UserSearchResult,
)

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.teams import Member, Team
    from nestbox.controlplane.services.principal import Principal

SEARCH_MIN_CHARS = 3


def team_view(team: Team, role: Role | None = None) -> TeamView:
    return TeamView(id=team.id, name=team.name, slug=team.slug, created_at=team.created_at,
                    role=role)  # fmt: skip


def member_view(m: Member) -> TeamMemberView:
    return TeamMemberView(user_id=m.user_id, email=m.email, name=m.name, role=m.role,
                          joined_at=m.joined_at)  # fmt: skip


async def role_in(tx: Tx, principal: Principal, team_id: str) -> tuple[Team, Role]:
    """The team and the principal's role in it. :raise NotFound: not visible to them."""
    team = await tx.teams.get(team_id)
    if team is not None:
        if team_id == principal.team_id:
            return team, principal.role
        if principal.is_session and principal.user_id is not None:
            membership = await tx.teams.membership(team_id, principal.user_id)
            if membership is not None:
                return team, membership.role
    raise NotFound("team", team_id)


class TeamService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def teams_of(self, principal: Principal) -> list[TeamView]:
        async with self._db.transaction() as tx:
            if not principal.is_session or principal.user_id is None:
                team, role = await role_in(tx, principal, principal.team_id)
                return [team_view(team, role)]
            return [
                team_view(m.team, m.role) for m in await tx.teams.memberships(principal.user_id)
            ]

    async def create(self, principal: Principal, name: str) -> TeamView:
        """A new team owned by the caller. :raise Forbidden: not a user session."""
        if not principal.is_session or principal.user_id is None:
            raise Forbidden("teams are made by users: use a session token, not an API key")
        async with self._db.transaction() as tx:
            team = await tx.teams.create(name)
            await tx.teams.add_member(team.id, principal.user_id, Role.OWNER)
            await tx.audit.record(principal.audit("team.create", "team", team.id, team_id=team.id))
        return team_view(team, Role.OWNER)

    async def get(self, principal: Principal, team_id: str) -> TeamDetailView:
        async with self._db.transaction() as tx:
            team, role = await role_in(tx, principal, team_id)
            members = await tx.teams.members(team_id)
        return TeamDetailView(team=team_view(team, role), members=[member_view(m) for m in members])

    async def rename(self, principal: Principal, team_id: str, name: str) -> TeamView:
        async with self._db.transaction() as tx:
            _, role = await role_in(tx, principal, team_id)
            _require(role, Role.ADMIN)
            await tx.teams.rename(team_id, name)
            await tx.audit.record(
                principal.audit("team.rename", "team", team_id, team_id=team_id, name=name)
            )
        return team_view(await self._team(team_id), role)

    async def delete(self, principal: Principal, team_id: str) -> None:
        """Soft-delete; the team's keys and sessions stop working at once."""
        async with self._db.transaction() as tx:
            _, role = await role_in(tx, principal, team_id)
            _require(role, Role.OWNER)
            await tx.teams.soft_delete(team_id)
            await tx.audit.record(principal.audit("team.delete", "team", team_id, team_id=team_id))

    async def members(self, principal: Principal, team_id: str) -> list[TeamMemberView]:
        async with self._db.transaction() as tx:
            await role_in(tx, principal, team_id)
            return [member_view(m) for m in await tx.teams.members(team_id)]

    async def add_member(
        self, principal: Principal, team_id: str, email: str, role: Role
    ) -> TeamMemberView:
        """:raise NotFound: no account with that email. :raise Conflict: already a member."""
        if role is Role.OWNER:
            raise InvalidRequest("a team has one owner; add members as admin or member")
        async with self._db.transaction() as tx:
            _, my_role = await role_in(tx, principal, team_id)
            _require(my_role, Role.ADMIN)
            user = await tx.users.get_by_email(email)
            if user is None or not user.is_active:
                raise NotFound("user", email)
            if await tx.teams.membership(team_id, user.id) is not None:
                raise Conflict(f"{email} is already a member")
            await tx.teams.add_member(team_id, user.id, role)
            await tx.audit.record(
                principal.audit("member.add", "user", user.id, team_id=team_id, role=str(role))
            )
            members = await tx.teams.members(team_id)
        return next(member_view(m) for m in members if m.user_id == user.id)

    async def set_role(self, principal: Principal, team_id: str, user_id: str, role: Role) -> None:
        if role is Role.OWNER:
            raise InvalidRequest("ownership cannot be given by a role change")
        async with self._db.transaction() as tx:
            _, my_role = await role_in(tx, principal, team_id)
            _require(my_role, Role.ADMIN)
            await self._not_owner(tx, team_id, user_id)
            await tx.teams.set_role(team_id, user_id, role)
            await tx.audit.record(
                principal.audit("member.role", "user", user_id, team_id=team_id, role=str(role))
            )

    async def remove_member(self, principal: Principal, team_id: str, user_id: str) -> None:
        async with self._db.transaction() as tx:
            _, my_role = await role_in(tx, principal, team_id)
            if user_id != principal.user_id:
                _require(my_role, Role.ADMIN)
            await self._not_owner(tx, team_id, user_id)
            await tx.teams.remove_member(team_id, user_id)
            await tx.audit.record(
                principal.audit("member.remove", "user", user_id, team_id=team_id)
            )

    async def leave(self, principal: Principal, team_id: str) -> None:
        if principal.user_id is None:
            raise Forbidden("this API key belongs to no member")
        await self.remove_member(principal, team_id, principal.user_id)

    async def search_users(self, principal: Principal, email_prefix: str) -> list[UserSearchResult]:
        """Up to 10 active users whose email starts with the prefix (for adding members)."""
        if len(email_prefix) < SEARCH_MIN_CHARS or "@" not in email_prefix:
            raise InvalidRequest("give at least 3 characters of the email, including the @")
        async with self._db.transaction() as tx:
            users = await tx.users.search(email_prefix)
        return [UserSearchResult(user_id=u.id, email=u.email) for u in users]

    async def _team(self, team_id: str) -> Team:
        async with self._db.transaction() as tx:
            team = await tx.teams.get(team_id)
        if team is None:
            raise NotFound("team", team_id)
        return team

    @staticmethod
    async def _not_owner(tx: Tx, team_id: str, user_id: str) -> None:
        membership = await tx.teams.membership(team_id, user_id)
        if membership is None:
            raise NotFound("member", user_id)
        if membership.role is Role.OWNER:
            raise Forbidden("the owner cannot be removed or demoted")


def _require(role: Role, needed: Role) -> None:
    if not role.at_least(needed):
        raise Forbidden(f"this needs the {needed} role in the team (you are {role})")
