"""The caller's own account (`/v1/me`), the audit trail, and platform administration of users
and teams (platform admins only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.errors import InvalidRequest, NotFound, Unauthorized
from nestbox.controlplane.services.auth import hash_password_async, verify_password_async
from nestbox.protocol.accounts import (
    AdminTeamView,
    AdminUserView,
    MeView,
    Role,
    UserStatus,
)
from nestbox.protocol.audit import AuditEntryView

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.audit import AuditEntry
    from nestbox.controlplane.db.users import User
    from nestbox.controlplane.services.principal import Principal


def audit_view(entry: AuditEntry) -> AuditEntryView:
    e = entry.event
    return AuditEntryView(
        id=entry.id, team_id=e.team_id, actor_type=e.actor_type, actor_id=e.actor_id,
        actor_name=e.actor_name, resource_type=e.resource_type, resource_id=e.resource_id,
        action=e.action, scope=e.scope, status=e.status, metadata=e.metadata,
        created_at=entry.created_at,
    )  # fmt: skip


def admin_user_view(user: User) -> AdminUserView:
    return AdminUserView(id=user.id, email=user.email, name=user.name, is_admin=user.is_admin,
                         status=UserStatus(user.status), created_at=user.created_at)  # fmt: skip


class AccountService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def me(self, principal: Principal) -> MeView:
        user = await self._user(principal)
        return MeView(
            id=user.id, email=user.email, name=user.name, is_admin=user.is_admin,
            has_password=user.password_hash is not None, team_id=principal.team_id,
            role=principal.role, created_at=user.created_at,
        )  # fmt: skip

    async def rename(self, principal: Principal, name: str) -> MeView:
        async with self._db.transaction() as tx:
            await tx.users.update(self._user_id(principal), name=name)
        return await self.me(principal)

    async def set_password(self, principal: Principal, current: str | None, new: str) -> None:
        """Change the password, or set the first one (e.g. the bootstrap admin's).
        :raise Unauthorized: `current` is missing or wrong for a user who has a password."""
        user = await self._user(principal)
        if user.password_hash is not None and (
            current is None or not await verify_password_async(current, user.password_hash)
        ):
            raise Unauthorized("the current password is wrong")
        new_hash = await hash_password_async(new)
        async with self._db.transaction() as tx:
            await tx.users.update(user.id, password_hash=new_hash)
            await tx.audit.record(principal.audit("user.password", "user", user.id))

    async def audit_log(
        self, principal: Principal, *, everyone: bool, limit: int, before: int | None
    ) -> list[AuditEntryView]:
        """The team's trail (team admins) or, with `everyone`, all of it (platform admins)."""
        if everyone:
            principal.require_admin()
        else:
            principal.require(Role.ADMIN)
        async with self._db.transaction() as tx:
            entries = await tx.audit.list(None if everyone else principal.team_id, limit=limit,
                                          before_id=before)  # fmt: skip
        return [audit_view(e) for e in entries]

    # ── platform administration ──

    async def list_users(
        self, principal: Principal, *, limit: int, offset: int
    ) -> list[AdminUserView]:
        principal.require_admin()
        async with self._db.transaction() as tx:
            return [admin_user_view(u) for u in await tx.users.list_all(limit=limit, offset=offset)]

    async def update_user(
        self,
        principal: Principal,
        user_id: str,
        *,
        status: UserStatus | None,
        is_admin: bool | None,
    ) -> AdminUserView:
        """:raise InvalidRequest: an admin disabling or demoting themselves (no lock-outs)."""
        principal.require_admin()
        if user_id == principal.user_id and (status is UserStatus.DISABLED or is_admin is False):
            raise InvalidRequest("you cannot disable or demote yourself")
        async with self._db.transaction() as tx:
            user = await tx.users.update(
                user_id, status=str(status) if status is not None else None, is_admin=is_admin
            )
            if user is None:
                raise NotFound("user", user_id)
            await tx.audit.record(
                principal.audit("user.update", "user", user_id, scope="admin",
                                user_status=user.status, is_admin=user.is_admin)
            )  # fmt: skip
        return admin_user_view(user)

    async def list_teams(self, principal: Principal) -> list[AdminTeamView]:
        principal.require_admin()
        async with self._db.transaction() as tx:
            teams = await tx.teams.list_all()
        return [
            AdminTeamView(id=t.id, name=t.name, slug=t.slug, created_at=t.created_at, members=n)
            for t, n in teams
        ]

    async def _user(self, principal: Principal) -> User:
        async with self._db.transaction() as tx:
            user = await tx.users.get(self._user_id(principal))
        if user is None:
            raise NotFound("user", principal.user_id or "")
        return user

    @staticmethod
    def _user_id(principal: Principal) -> str:
        if principal.user_id is None:
            raise NotFound("user", "of this API key")
        return principal.user_id
