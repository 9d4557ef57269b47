"""Team API keys: made by any member, shown in full once, listed by prefix, revoked by their
maker or a team admin. Another team's key is `NotFound`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.errors import Forbidden, NotFound
from nestbox.controlplane.services.auth import key_hash
from nestbox.protocol.accounts import ApiKeyView, Role
from nestbox.protocol.ids import API_KEY_DISPLAY_CHARS, new_api_key

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.api_keys import ApiKey
    from nestbox.controlplane.services.principal import Principal


def key_view(key: ApiKey, plaintext: str | None = None) -> ApiKeyView:
    return ApiKeyView(
        id=key.id,
        team_id=key.team_id,
        name=key.name,
        key_prefix=key.key_prefix,
        created_by=key.created_by,
        created_at=key.created_at,
        last_used=key.last_used_at,
        key=plaintext,
    )


async def create_key(tx: Tx, team_id: str, name: str, created_by: str | None) -> tuple[ApiKey, str]:
    """A new API key of the team, in `tx`: its row and its plaintext (stored only hashed; the
    caller shows it once)."""
    plaintext = new_api_key()
    key = await tx.api_keys.create(
        team_id, name, key_hash(plaintext), plaintext[:API_KEY_DISPLAY_CHARS], created_by
    )
    return key, plaintext


class ApiKeyService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, principal: Principal, name: str) -> ApiKeyView:
        """A new key for the principal's team; the answer holds the key, the only time."""
        async with self._db.transaction() as tx:
            key, plaintext = await create_key(tx, principal.team_id, name, principal.user_id)
            await tx.audit.record(principal.audit("api_key.create", "api_key", key.id, name=name))
        return key_view(key, plaintext)

    async def list_keys(self, principal: Principal) -> list[ApiKeyView]:
        async with self._db.transaction() as tx:
            return [key_view(k) for k in await tx.api_keys.list(principal.team_id)]

    async def delete(self, principal: Principal, key_id: str) -> None:
        """:raise NotFound: no such key in the team. :raise Forbidden: a member revoking
        someone else's key."""
        async with self._db.transaction() as tx:
            key = await tx.api_keys.get(principal.team_id, key_id)
            if key is None:
                raise NotFound("API key", key_id)
            mine = key.created_by is not None and key.created_by == principal.user_id
            if not mine and not principal.role.at_least(Role.ADMIN):
                raise Forbidden("only the key's maker or a team admin may revoke it")
            await tx.api_keys.delete(principal.team_id, key_id)
            await tx.audit.record(principal.audit("api_key.revoke", "api_key", key_id))
