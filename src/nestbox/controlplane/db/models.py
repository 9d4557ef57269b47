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

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from nestbox.controlplane.db.base import Base, BigId, JSONDoc, utcnow

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
    created_by: Mapped[str | None] = mapped_column(String(128))
    """Who made it: a user id, an API key id, or `platform`."""


class CapsuleRow(Base):
    __tablename__ = "capsules"
    __table_args__ = (
        Index("ix_capsules_team_id_status", "team_id", "status"),
        Index("ix_capsules_host_id_status", "host_id", "status"),
        Index("ix_capsules_team_id_created_at_id", "team_id", "created_at", "id"),
        Index("ix_capsules_expires_at", "expires_at"),
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
    template_type: Mapped[str] = mapped_column(String(16), default="snapshot")
    """base | snapshot: a snapshot template's vCPUs and memory win over the create's."""
    allow_internet_access: Mapped[bool] = mapped_column(default=False)
    egress_allow: Mapped[list[str]] = mapped_column(JSONDoc, default=list)
    """With internet access: the only CIDRs / host names it may reach (empty = any public)."""
    auto_resume: Mapped[bool] = mapped_column(default=False)
    """A guest call (exec, files, PTY, processes) to it while paused resumes it first."""
    ttl_sec: Mapped[int] = mapped_column(default=0)
    """Lifetime of each run (from create, resume or a timeout change); 0 = none."""
    on_timeout: Mapped[str] = mapped_column(String(16), default="pause")
    """pause | destroy: what happens at `expires_at`."""
    expires_at: Mapped[datetime | None]
    """When the current run's lifetime ends (services/lifetime.py); None = never."""


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


class EventRow(Base):
    """A published event (`services/events.py`): the SSE streams and channels read it by id."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str | None] = mapped_column(ID)
    """None: a shared host's event (platform admins see it)."""
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ChannelRow(Base):
    """A team's notification channel (webhook, slack, discord)."""

    __tablename__ = "channels"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(16))
    config_enc: Mapped[str] = mapped_column(Text)
    """The provider config (URL, signing secret) as JSON, sealed (`secretbox`)."""
    event_types: Mapped[list[str]] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ChannelDeliveryRow(Base):
    """The outbox: one event for one channel, retried with backoff until delivered or given
    up. Delivered in `id` order per channel."""

    __tablename__ = "channel_deliveries"
    __table_args__ = (
        Index("ix_channel_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_channel_deliveries_channel_id_id", "channel_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(36), unique=True)
    """`X-Wrenn-Delivery`: the same on every attempt, so a receiver can drop repeats."""
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(BigId, ForeignKey("events.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    """pending | delivered | failed"""
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str] = mapped_column(String(500), default="")
    response_status: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class CapsuleRunRow(Base):
    """One interval a capsule's VM ran, at its size then. Written by triggers on `capsules`
    (migration 0005), never by code: every status change anywhere is counted."""

    __tablename__ = "capsule_runs"
    __table_args__ = (Index("ix_capsule_runs_team_id_started_at", "team_id", "started_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    capsule_id: Mapped[str] = mapped_column(
        ForeignKey("capsules.id", ondelete="CASCADE"), index=True
    )
    team_id: Mapped[str] = mapped_column(ID)
    vcpus: Mapped[int]
    memory_mb: Mapped[int]
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class StatsSampleRow(Base):
    """What one team held at one instant (`services/stats.py`)."""

    __tablename__ = "stats_samples"
    __table_args__ = (Index("ix_stats_samples_team_id_sampled_at", "team_id", "sampled_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ID)
    sampled_at: Mapped[datetime]
    running_count: Mapped[int]
    vcpus_reserved: Mapped[int]
    memory_mb_reserved: Mapped[int]


class WebSessionRow(Base):
    """A logged-in browser (the dashboard): its cookie's token is stored as SHA-256 only."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(HASH, primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class WsTicketRow(Base):
    """A single-use ticket a browser session trades for one WebSocket handshake."""

    __tablename__ = "ws_tickets"

    id: Mapped[str] = mapped_column(HASH, primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("web_sessions.id", ondelete="CASCADE"), index=True
    )
    expires_at: Mapped[datetime]


class BuildRow(Base):
    """A template build (`services/builds.py`): its configuration, progress and outcome, and
    its place in the queue. Workers claim `pending` rows, and `running` rows whose worker
    stopped heartbeating, with `SELECT ... FOR UPDATE SKIP LOCKED` (PostgreSQL)."""

    __tablename__ = "builds"
    __table_args__ = (
        Index("ix_builds_status_created_at", "status", "created_at"),
        Index("ix_builds_team_id_created_at", "team_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(128))
    base_template: Mapped[str] = mapped_column(String(128))
    recipe: Mapped[list[Any]] = mapped_column(JSONDoc, default=list)
    healthcheck: Mapped[str | None] = mapped_column(Text)
    vcpus: Mapped[int | None]
    memory_mb: Mapped[int | None]
    skip_pre_post: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending | running | success | failed | cancelled"""
    current_step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    logs: Mapped[list[Any]] = mapped_column(JSONDoc, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    archive: Mapped[str | None] = mapped_column(String(16))
    """The uploaded archive's kind (tar, tar.gz, zip); its file is `<builds dir>/<id>.archive`."""
    capsule_id: Mapped[str | None] = mapped_column(ID)
    host_id: Mapped[str | None] = mapped_column(ID)
    template_id: Mapped[str | None] = mapped_column(ID)
    template_type: Mapped[str | None] = mapped_column(String(16))
    default_user: Mapped[str] = mapped_column(String(64), default="root")
    default_env: Mapped[dict[str, Any]] = mapped_column(default=dict)
    default_workdir: Mapped[str | None] = mapped_column(String(4096))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(String(64))
    """The control-plane process running it (a random id per process)."""
    attempts: Mapped[int] = mapped_column(default=0)
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
