"""Team API keys: made by any member, shown in full once, listed by prefix, revoked by their
maker or a team admin. Another team's key is `NotFound`.

The operator's key (the one in `<data_dir>/admin-api-key`) cannot be revoked through the API
(409 `conflict`): it is what `make run` and the operator's scripts hold, and an API call (a
fuzzer's, a script's) must not lock the operator out; `nestbox-cp admin reset-key` rotates it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from nestbox.controlplane.errors import Conflict, Forbidden, NotFound
from nestbox.controlplane.services.auth import key_hash
from nestbox.protocol.accounts import ApiKeyView, Role
from nestbox.protocol.ids import API_KEY_DISPLAY_CHARS, new_api_key

if TYPE_CHECKING:
    from pathlib import Path

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
    def __init__(self, db: Database, operator_key_file: Path | None = None) -> None:
        self._db = db
        self._operator_key_file = operator_key_file

    async def _operator_key_hash(self) -> str | None:
        """The hash of the key in the operator's key file, if there is one."""
        if self._operator_key_file is None:
            return None
        try:
            text = await anyio.Path(self._operator_key_file).read_text()
        except (FileNotFoundError, PermissionError):
            return None
        return key_hash(text.strip()) if text.strip() else None

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
            operator = await self._operator_key_hash()
            held = await tx.api_keys.by_hash(operator) if operator is not None else None
            if held is not None and held.id == key.id:
                raise Conflict(
                    "this is the operator's key (admin-api-key in the data directory); rotate "
                    "it with `nestbox-cp admin reset-key` instead of revoking it"
                )
            await tx.api_keys.delete(principal.team_id, key_id)
            await tx.audit.record(principal.audit("api_key.revoke", "api_key", key_id))
