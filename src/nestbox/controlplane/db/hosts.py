"""Hosts and their credentials (the aggregate: a host, its one-time registration tokens and its
rotating refresh tokens). Token secrets are stored as SHA-256 hex only; the agent and proxy
tokens (what the control plane presents to the agent) must be sent, so they are kept sealed
(`secretbox`; the services seal and open them, this module only stores the sealed text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update

from nestbox.controlplane.db.models import HostRefreshTokenRow, HostRow, HostTokenRow
from nestbox.protocol.ids import IdPrefix, new_id

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    type: str
    team_id: str | None
    provider: str
    availability_zone: str
    arch: str
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    address: str
    status: str
    """protocol.hosts.HostStatus"""
    last_heartbeat_at: datetime | None
    agent_token_enc: str | None
    """Sealed (`secretbox`, context `host_context(id, "agent_token")`)."""
    proxy_token_enc: str | None
    """Sealed likewise (`"proxy_token"`); None for a host registered before proxy tokens."""
    created_at: datetime
    load: dict[str, Any] = field(default_factory=dict)


def _record(row: HostRow) -> Host:
    return Host(
        id=row.id, type=row.type, team_id=row.team_id, provider=row.provider,
        availability_zone=row.availability_zone, arch=row.arch, cpu_cores=row.cpu_cores,
        memory_mb=row.memory_mb, disk_gb=row.disk_gb, address=row.address, status=row.status,
        last_heartbeat_at=row.last_heartbeat_at, agent_token_enc=row.agent_token_enc,
        proxy_token_enc=row.proxy_token_enc, created_at=row.created_at, load=dict(row.load),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Registration:
    """What an agent registers with (from `HostRegisterRequest`)."""

    address: str
    arch: str
    cpu_cores: int
    memory_mb: int
    disk_gb: int


class HostRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(
        self,
        *,
        type_: str,
        team_id: str | None,
        provider: str,
        availability_zone: str,
        created_by: str | None,
        status: str,
    ) -> Host:
        row = HostRow(
            id=new_id(IdPrefix.HOST), type=type_, team_id=team_id, provider=provider,
            availability_zone=availability_zone, created_by=created_by, status=status,
            load={}, meta={},
        )  # fmt: skip
        self._s.add(row)
        await self._s.flush()
        await self._s.refresh(row)
        return _record(row)

    async def get(self, host_id: str) -> Host | None:
        row = await self._s.get(HostRow, host_id)
        return _record(row) if row is not None else None

    async def listed(self, *, team_id: str | None = None, everyone: bool = False) -> list[Host]:
        """Every host (`everyone`), else the hosts of `team_id` (its BYOC machines)."""
        query = select(HostRow).order_by(HostRow.created_at, HostRow.id)
        if not everyone:
            query = query.where(HostRow.team_id == team_id)
        return [_record(r) for r in await self._s.scalars(query)]

    async def with_status(self, *statuses: str) -> list[Host]:
        query = select(HostRow).where(HostRow.status.in_(statuses)).order_by(HostRow.id)
        return [_record(r) for r in await self._s.scalars(query)]

    async def delete(self, host_id: str) -> None:
        await self._s.execute(delete(HostRow).where(HostRow.id == host_id))

    # ── registration ──

    async def add_registration_token(
        self, host_id: str, token_hash: str, expires_at: datetime, created_by: str | None
    ) -> None:
        """A new one-time token; earlier unused ones of the host stop working."""
        await self._s.execute(
            delete(HostTokenRow).where(HostTokenRow.host_id == host_id,
                                       HostTokenRow.used_at.is_(None))
        )  # fmt: skip
        self._s.add(HostTokenRow(id=new_id(IdPrefix.HOST_TOKEN), host_id=host_id,
                                 token_hash=token_hash, created_by=created_by,
                                 expires_at=expires_at))  # fmt: skip
        await self._s.flush()

    async def registration_token_host(self, token_hash: str, now: datetime) -> str | None:
        """The host a live registration token is for (without spending it), else None."""
        query = select(HostTokenRow).where(HostTokenRow.token_hash == token_hash)
        row = await self._s.scalar(query)
        if row is None or row.used_at is not None or row.expires_at <= now:
            return None
        return row.host_id

    async def use_registration_token(self, token_hash: str, now: datetime) -> str | None:
        """Spend a registration token: the host id, or None if unknown, used or expired."""
        row = await self._s.scalar(
            select(HostTokenRow).where(HostTokenRow.token_hash == token_hash).with_for_update()
        )
        if row is None or row.used_at is not None or row.expires_at <= now:
            return None
        row.used_at = now
        await self._s.flush()
        return row.host_id

    async def register(
        self,
        host_id: str,
        reg: Registration,
        *,
        agent_token_enc: str,
        proxy_token_enc: str,
        now: datetime,
    ) -> Host:
        """Record the agent's machine, address and (sealed) tokens; the host is online from
        now on."""
        await self._s.execute(
            update(HostRow).where(HostRow.id == host_id).values(
                address=reg.address, arch=reg.arch, cpu_cores=reg.cpu_cores,
                memory_mb=reg.memory_mb, disk_gb=reg.disk_gb, agent_token_enc=agent_token_enc,
                proxy_token_enc=proxy_token_enc, status="online", last_heartbeat_at=now,
                updated_at=now,
            )
        )  # fmt: skip
        # Earlier refresh tokens belong to an earlier registration of this host.
        await self._s.execute(
            update(HostRefreshTokenRow)
            .where(HostRefreshTokenRow.host_id == host_id, HostRefreshTokenRow.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        host = await self.get(host_id)
        assert host is not None
        return host

    async def add_refresh_token(self, host_id: str, token_hash: str, expires_at: datetime) -> None:
        self._s.add(HostRefreshTokenRow(id=new_id(IdPrefix.REFRESH_TOKEN), host_id=host_id,
                                        token_hash=token_hash, expires_at=expires_at))  # fmt: skip
        await self._s.flush()

    async def spend_refresh_token(self, token_hash: str, now: datetime) -> str | None:
        """Revoke a refresh token and return its host id; None if unknown, revoked or expired."""
        row = await self._s.scalar(
            select(HostRefreshTokenRow)
            .where(HostRefreshTokenRow.token_hash == token_hash)
            .with_for_update()
        )
        if row is None or row.revoked_at is not None or row.expires_at <= now:
            return None
        row.revoked_at = now
        await self._s.flush()
        return row.host_id

    # ── liveness ──

    async def heartbeat(self, host_id: str, load: dict[str, Any], now: datetime) -> str | None:
        """Store a heartbeat; the host's status before it (None: no such host). An
        unreachable or offline host is online again; a draining one stays draining."""
        row = await self._s.get(HostRow, host_id, with_for_update=True)
        if row is None:
            return None
        before = row.status
        row.load = load
        row.last_heartbeat_at = now
        if before in ("unreachable", "offline", "pending"):
            row.status = "online"
        await self._s.flush()
        return before

    async def mark_unreachable(self, host_id: str, silent_since: datetime) -> bool:
        """Online or draining -> unreachable, unless a heartbeat came after `silent_since`."""
        result = await self._s.execute(
            update(HostRow)
            .where(HostRow.id == host_id, HostRow.status.in_(("online", "draining")),
                   HostRow.last_heartbeat_at <= silent_since)
            .values(status="unreachable")
        )  # fmt: skip
        return bool(getattr(result, "rowcount", 0))
