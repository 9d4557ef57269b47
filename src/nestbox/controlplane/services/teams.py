"""Teams and members. Roles: owner (one per team; may delete it) > admin (manages members and
the name) > member (uses the team's resources). A team the caller does not belong to is
`NotFound`; a team they belong to but may not change is `Forbidden`.

An API key sees only its own team; a user session sees every team the user belongs to.

Removing a member (or a member leaving) revokes the API keys they made in that team. Deleting a
team destroys its capsules (on their agents; the reconciler finishes any its host could not)
and its templates, and revokes its keys; the team that holds a platform admin's API key cannot
be deleted (409 `team_protected`), so the operator is never locked out by a team deletion.

User search finds users who share a team with the caller (by email prefix), or any active user
by their exact email (what adding a member needs); it never lists strangers by prefix.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.errors import (
    Conflict,
    Forbidden,
    HostUnavailable,
    InvalidRequest,
    NotFound,
    TeamProtected,
)
from nestbox.protocol.accounts import (
    Role,
    TeamDetailView,
    TeamMemberView,
    TeamView,
    UserSearchResult,
)
from nestbox.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.db.hosts import Host
    from nestbox.controlplane.db.teams import Member, Team
    from nestbox.controlplane.db.templates import Template
    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Targets

log = logging.getLogger(__name__)

SEARCH_MIN_CHARS = 3
SEARCH_LIMIT = 10
TEARDOWN_PARALLEL = 8
TEARDOWN_TIMEOUT_S = 120.0
"""Per capsule or template: how long a team deletion waits for its agent."""


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
    def __init__(self, db: Database, targets: Targets) -> None:
        self._db = db
        self._targets = targets

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
        """Soft-delete; the team's keys and sessions stop working at once, its capsules are
        destroyed and its templates deleted (on their hosts too).
        :raise TeamProtected: it holds a platform admin's API key."""
        async with self._db.transaction() as tx:
            _, role = await role_in(tx, principal, team_id)
            _require(role, Role.OWNER)
            if await tx.api_keys.admin_held(team_id):
                raise TeamProtected(
                    f"team {team_id} holds a platform admin's API key; revoke that key "
                    "(or make it in another team) before deleting the team"
                )
            capsules = await tx.capsules.list_team(team_id)
            templates = await tx.templates.of_team(team_id)
            host_ids = {c.host_id for c in capsules} | {t.host_id for t in templates}
            hosts = {h.id: h for h in [await tx.hosts.get(i) for i in host_ids if i] if h}
            await tx.capsules.destroy_team(team_id)
            for template in templates:
                await tx.templates.delete(template.id)
            await tx.api_keys.delete_team(team_id)
            await tx.teams.soft_delete(team_id)
            await tx.audit.record(principal.audit(
                "team.delete", "team", team_id, team_id=team_id,
                capsules=[c.id for c in capsules], templates=[t.id for t in templates],
            ))  # fmt: skip
        with anyio.CancelScope(shield=True):  # the rows are gone: finish on the hosts
            await self._teardown(capsules, templates, hosts)

    async def _teardown(
        self, capsules: list[Capsule], templates: list[Template], hosts: dict[str, Host]
    ) -> None:
        """Destroy the capsules and delete the templates on their agents, a few at a time.
        Best effort: a capsule left on a host is destroyed by the reconciler once the host
        answers (its row is `destroyed`), a template left costs disk only."""
        limit = anyio.CapacityLimiter(TEARDOWN_PARALLEL)

        async def one(kind: str, ident: str, host: Host) -> None:
            async with limit:
                try:
                    with anyio.fail_after(TEARDOWN_TIMEOUT_S):
                        agent = self._targets.agent(host)
                        if kind == "capsule":
                            await agent.destroy_capsule(ident)
                        else:
                            await agent.delete_template(ident)
                except AgentCallError as err:
                    if err.code is not ErrorCode.NOT_FOUND:
                        log.warning("team deletion: %s %s stays on host %s for now: %s",
                                    kind, ident, host.id, err.message)  # fmt: skip
                except (HostUnavailable, TimeoutError) as err:
                    log.warning("team deletion: %s %s stays on host %s for now: %r",
                                kind, ident, host.id, err)  # fmt: skip

        async with anyio.create_task_group() as tg:
            for capsule in capsules:
                if capsule.host_id in hosts:
                    tg.start_soon(one, "capsule", capsule.id, hosts[capsule.host_id])
            for template in templates:
                if template.host_id in hosts:
                    tg.start_soon(one, "template", template.id, hosts[template.host_id])

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
            revoked = await tx.api_keys.delete_by_creator(team_id, user_id)
            await tx.audit.record(principal.audit(
                "member.remove", "user", user_id, team_id=team_id, api_keys_revoked=list(revoked)
            ))  # fmt: skip

    async def leave(self, principal: Principal, team_id: str) -> None:
        if principal.user_id is None:
            raise Forbidden("this API key belongs to no member")
        await self.remove_member(principal, team_id, principal.user_id)

    async def search_users(self, principal: Principal, email_prefix: str) -> list[UserSearchResult]:
        """Up to 10 active users who share a team with the caller and whose email starts with
        the prefix, and the active user whose email is exactly it (for adding members)."""
        if len(email_prefix) < SEARCH_MIN_CHARS or "@" not in email_prefix:
            raise InvalidRequest("give at least 3 characters of the email, including the @")
        async with self._db.transaction() as tx:
            if principal.is_session and principal.user_id is not None:
                teams = [m.team.id for m in await tx.teams.memberships(principal.user_id)]
            else:
                teams = [principal.team_id]  # an API key speaks for its own team only
            users = await tx.users.search(email_prefix, in_teams=teams, limit=SEARCH_LIMIT)
            exact = await tx.users.get_by_email(email_prefix)
        if exact is not None and exact.is_active and exact.id not in {u.id for u in users}:
            users = [exact, *users][:SEARCH_LIMIT]
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
