"""First start: with no user in the database, make a platform admin, their team and an API
key, and keep the key in `<data_dir>/admin-api-key` (0600) for the operator.

The admin has no password: set one with `POST /v1/me/password` using the key, then log in.

Recovery (`nestbox-cp admin reset-key`): whoever can reach the database is the operator, so
`reset_admin_key` mints a new admin API key from it, whatever happened through the API (the
key revoked, its team deleted, the admin demoted or disabled): for the platform admin (the one
named, else `admin_email` if still an active admin, else the oldest active admin, else
`admin_email` made or restored as one), in a live team they own (a new `Admin` team if none),
written atomically to `<data_dir>/admin-api-key` (0600). The key the file held before is
revoked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio.to_thread

from nestbox.controlplane.db.audit import AuditEvent
from nestbox.controlplane.services.api_keys import create_key
from nestbox.controlplane.services.auth import key_hash
from nestbox.controlplane.settings import ADMIN_KEY_FILE, prepare_data_dir, write_private
from nestbox.protocol.accounts import Role

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.teams import Membership
    from nestbox.controlplane.db.users import User

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


async def reset_admin_key(db: Database, data_dir: Path, email: str,
                          *, named: bool = False) -> Bootstrapped:  # fmt: skip
    """Mint a new platform admin API key from the database and write it to the key file (see
    the module's docstring). `named`: `email` was asked for (`--email`), so that account is
    the one, made or restored as an active admin. :raise OSError: the file cannot be written
    (nothing is committed then)."""
    key_file = data_dir / ADMIN_KEY_FILE
    old = await anyio.to_thread.run_sync(_read_key, key_file)
    async with db.transaction() as tx:
        user = await _operator(tx, email, named=named)
        membership = await _owned_team(tx, user)
        record, key = await create_key(tx, membership.team.id, "admin (reset)", user.id)
        revoked = old is not None and await tx.api_keys.delete_by_hash(key_hash(old))
        await tx.audit.record(AuditEvent(
            action="admin.reset_key", resource_type="api_key", resource_id=record.id,
            team_id=membership.team.id, actor_type="system", scope="admin",
            metadata={"user_id": user.id, "old_key_revoked": revoked},
        ))  # fmt: skip
        # Written before the commit, as at the first start.
        await anyio.to_thread.run_sync(_write_key, data_dir, key)
    log.warning("minted a new admin API key for %s (team %s)", user.email, membership.team.id)
    return Bootstrapped(user_id=user.id, team_id=membership.team.id, email=user.email,
                        api_key=key, key_file=key_file)  # fmt: skip


async def _operator(tx: Tx, email: str, *, named: bool) -> User:
    """The admin a reset key is for, made active and admin if need be."""
    user = await tx.users.get_by_email(email)
    if not named and (user is None or not (user.is_active and user.is_admin)):
        user = await tx.users.first_admin() or user
    if user is None:
        return await tx.users.create(email, ADMIN_NAME, None, is_admin=True)
    if not (user.is_active and user.is_admin):
        log.warning("making %s an active platform admin again", user.email)
        restored = await tx.users.update(user.id, status="active", is_admin=True)
        assert restored is not None
        return restored
    return user


async def _owned_team(tx: Tx, user: User) -> Membership:
    """A live team `user` owns (their default first), else a new `Admin` team."""
    memberships = await tx.teams.memberships(user.id)
    owned = [m for m in memberships if m.role is Role.OWNER]
    if owned:
        return owned[0]
    team = await tx.teams.create(ADMIN_TEAM)
    return await tx.teams.add_member(team.id, user.id, Role.OWNER, is_default=not memberships)


def _read_key(key_file: Path) -> str | None:
    try:
        return key_file.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_key(data_dir: Path, key: str) -> Path:
    prepare_data_dir(data_dir)
    key_file = data_dir / ADMIN_KEY_FILE
    write_private(key_file, key + "\n")
    return key_file
