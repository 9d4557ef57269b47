"""Every table of the control plane, after Wrenn's schema (wrenn-surface §1.13). Rows (`*Row`)
never leave `db/`: repositories turn them into plain records.

Ids are strings (`team-…`, `usr-…`, `cl-…`; see `protocol/ids.py`). Secrets are stored as
SHA-256 hex only (API keys, host registration and refresh tokens), except the agent and proxy
tokens the control plane must present to its agents, which are sealed (AES-GCM,
`secretbox`). Deleting a team is soft (`deleted_at`); deleting a user removes their
memberships. The migrations create exactly these tables; a test compares the two on SQLite
and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (SQLAlchemy resolves Mapped[] at runtime)
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from nestbox.controlplane.db.base import Base, BigId, utcnow

ID = String(40)
HASH = String(64)
"""SHA-256 hex."""


class TeamRow(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    slug: Mapped[str] = mapped_column(String(16), unique=True)
    is_byoc: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    """Always lower case."""
    password_hash: Mapped[str | None] = mapped_column(String(256))
    name: Mapped[str] = mapped_column(String(100), default="")
    is_admin: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default="active")
    """active | disabled"""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TeamMemberRow(Base):
    __tablename__ = "team_members"

    team_id: Mapped[str] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    """owner | admin | member"""
    is_default: Mapped[bool] = mapped_column(default=False)
    """The team a login lands in."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(HASH, unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]


class HostRow(Base):
    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    type: Mapped[str] = mapped_column(String(16), default="regular")
    """regular | byoc (a team's own host, used only for that team)"""
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(64), default="")
    availability_zone: Mapped[str] = mapped_column(String(64), default="")
    arch: Mapped[str] = mapped_column(String(32), default="")
    cpu_cores: Mapped[int] = mapped_column(default=0)
    memory_mb: Mapped[int] = mapped_column(default=0)
    disk_gb: Mapped[int] = mapped_column(default=0)
    address: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """protocol.hosts.HostStatus"""
    last_heartbeat_at: Mapped[datetime | None]
    load: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The last heartbeat's HeartbeatRequest, what the scheduler places capsules by."""
    agent_token_enc: Mapped[str | None] = mapped_column(String(255))
    """The agent token (RPCs, X-Agent-Token), sealed (`secretbox`); the agent keeps its hash."""
    proxy_token_enc: Mapped[str | None] = mapped_column(String(255))
    """The proxy token (the agent's /proxy/, X-Nestbox-Proxy-Token), sealed likewise."""
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class HostTokenRow(Base):
    """A one-time registration token for a host agent."""

    __tablename__ = "host_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(HASH, unique=True)
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class HostRefreshTokenRow(Base):
    """A host's refresh token; rotated (the old one revoked) on every use."""

    __tablename__ = "host_refresh_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(HASH, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class TemplateRow(Base):
    """What capsules are made from. Platform templates (e.g. `minimal`) belong to the platform
    team and are visible to every team; snapshot templates belong to one team."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(16), default="snapshot")
    """base | snapshot"""
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    """The host holding a team's snapshot template; None for platform templates (every host)."""
    vcpus: Mapped[int | None]
    memory_mb: Mapped[int | None]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    default_user: Mapped[str] = mapped_column(String(64), default="root")
    default_env: Mapped[dict[str, Any]] = mapped_column(default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CapsuleRow(Base):
    __tablename__ = "capsules"
    __table_args__ = (
        Index("ix_capsules_team_id_status", "team_id", "status"),
        Index("ix_capsules_host_id_status", "host_id", "status"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    template: Mapped[str] = mapped_column(String(128))
    template_id: Mapped[str | None] = mapped_column(ForeignKey("templates.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16))
    """The SDK's status values: pending, starting, running, pausing, paused, … (§2.2)"""
    vcpus: Mapped[int]
    memory_mb: Mapped[int]
    disk_mb: Mapped[int]
    timeout_sec: Mapped[int] = mapped_column(default=0)
    """Inactivity auto-pause; 0 = never."""
    guest_ip: Mapped[str] = mapped_column(String(64), default="")
    host_ip: Mapped[str] = mapped_column(String(64), default="")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    last_active_at: Mapped[datetime | None]
    last_updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditLogRow(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_team_id_id", "team_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str | None] = mapped_column(ID)
    """No foreign key: the trail outlives what it describes."""
    actor_type: Mapped[str] = mapped_column(String(16))
    """user | api_key | host | system"""
    actor_id: Mapped[str] = mapped_column(ID, default="")
    actor_name: Mapped[str] = mapped_column(String(254), default="")
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(String(128), default="")
    action: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16), default="team")
    """team | admin"""
    status: Mapped[str] = mapped_column(String(16), default="success")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
