"""First start: with no user in the database, make a platform admin, their team and an API
key, and keep the key in `<data_dir>/admin-api-key` (0600) for the operator.

The admin has no password: set one with `POST /v1/me/password` using the key, then log in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio.to_thread

from nestbox.controlplane.db.audit import AuditEvent
from nestbox.controlplane.services.api_keys import create_key
from nestbox.controlplane.settings import ADMIN_KEY_FILE, write_private
from nestbox.protocol.accounts import Role

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.controlplane.db import Database

log = logging.getLogger(__name__)

ADMIN_NAME = "Admin"
ADMIN_TEAM = "Admin"


@dataclass(frozen=True, slots=True)
class Bootstrapped:
    user_id: str
    team_id: str
    email: str
    api_key: str
    key_file: Path


async def bootstrap_admin(db: Database, data_dir: Path, email: str) -> Bootstrapped | None:
    """Make the first admin if there is no user yet; None if there already is one.
    :raise OSError: the key file cannot be written (nothing is committed then)."""
    async with db.transaction() as tx:
        if await tx.users.count() > 0:
            return None
        user = await tx.users.create(email, ADMIN_NAME, None, is_admin=True)
        team = await tx.teams.create(ADMIN_TEAM)
        await tx.teams.add_member(team.id, user.id, Role.OWNER, is_default=True)
        record, key = await create_key(tx, team.id, "admin", user.id)
        await tx.audit.record(
            AuditEvent(action="bootstrap", resource_type="user", resource_id=user.id,
                       team_id=team.id, scope="admin", metadata={"api_key_id": record.id})
        )  # fmt: skip
        # Written before the commit: if it fails, no admin exists whose key nobody knows.
        key_file = await anyio.to_thread.run_sync(_write_key, data_dir, key)
    log.info("created the first admin", extra={"user_id": user.id})
    return Bootstrapped(user_id=user.id, team_id=team.id, email=email, api_key=key,
                        key_file=key_file)  # fmt: skip


def _write_key(data_dir: Path, key: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / ADMIN_KEY_FILE
    write_private(key_file, key + "\n")
    return key_file
