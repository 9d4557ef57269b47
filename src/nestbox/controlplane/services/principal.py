"""Who a request acts for, once its credentials are checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.controlplane.db.audit import AuditEvent
from nestbox.controlplane.errors import Forbidden

if TYPE_CHECKING:
    from nestbox.protocol.accounts import Role


@dataclass(frozen=True, slots=True)
class Principal:
    """A user session (JWT) or a team API key, acting in one team.

    An API key acts as the user who made it, with that user's current role in the key's team;
    if that user has left the team, is disabled or gone, the key no longer works. Role and admin
    flag always come from the database, never from the token alone.
    """

    team_id: str
    role: Role
    user_id: str | None
    email: str = ""
    name: str = ""
    is_admin: bool = False
    api_key_id: str | None = None

    @property
    def is_session(self) -> bool:
        return self.api_key_id is None

    def require(self, role: Role) -> None:
        """:raise Forbidden: the principal's role in its team is below `role`."""
        if not self.role.at_least(role):
            raise Forbidden(f"this needs the {role} role in the team (you are {self.role})")

    def require_admin(self) -> None:
        """:raise Forbidden: not a platform admin."""
        if not self.is_admin:
            raise Forbidden("this needs a platform admin")

    def audit(
        self, action: str, resource_type: str, resource_id: str = "", **kw: object
    ) -> AuditEvent:
        """An audit event done by this principal (in its team unless `team_id=` says)."""
        return AuditEvent(
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            team_id=str(kw.pop("team_id", self.team_id)),
            actor_type="api_key" if self.api_key_id else "user",
            actor_id=self.api_key_id or self.user_id or "",
            actor_name=self.email,
            scope=str(kw.pop("scope", "team")),
            metadata=dict(kw),
        )
