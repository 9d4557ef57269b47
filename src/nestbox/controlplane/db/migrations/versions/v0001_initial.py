"""Initial schema: teams, users, memberships, API keys, hosts and their tokens, templates,
capsules, audit log; seeds the platform team and the `minimal` template.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PLATFORM_TEAM_ID = "team-" + "0" * 25
MINIMAL_TEMPLATE_ID = "tpl-" + "0" * 25

ID = sa.String(40)
HASH = sa.String(64)
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, TS, nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", ID),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("slug", sa.String(16), nullable=False),
        sa.Column("is_byoc", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _ts("deleted_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
        sa.UniqueConstraint("slug", name="uq_teams_slug"),
    )
    op.create_table(
        "users",
        sa.Column("id", ID),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )
    op.create_table(
        "team_members",
        sa.Column("team_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("team_id", "user_id", name="pk_team_members"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_team_members_team_id_teams"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], ondelete="CASCADE", name="fk_team_members_user_id_users"
        ),
    )
    op.create_index("ix_team_members_user_id", "team_members", ["user_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", ID),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", HASH, nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("created_by", ID, nullable=True),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_api_keys_team_id_teams"
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], ondelete="SET NULL", name="fk_api_keys_created_by_users"
        ),
    )
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    _hosts()
    _templates_and_capsules()
    _audit_log()
    _seed()


def _hosts() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", ID),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("team_id", ID, nullable=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("availability_zone", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("cpu_cores", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("disk_gb", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _ts("last_heartbeat_at", nullable=True),
        sa.Column("load", JSON, nullable=False),
        sa.Column("agent_token", sa.String(128), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_by", ID, nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_hosts"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_hosts_team_id_teams"
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], ondelete="SET NULL", name="fk_hosts_created_by_users"
        ),
    )
    for table in ("host_tokens", "host_refresh_tokens"):
        used = (
            [sa.Column("created_by", ID, nullable=True), _ts("created_at"), _ts("expires_at"),
             _ts("used_at", nullable=True)]
            if table == "host_tokens"
            else [_ts("created_at"), _ts("expires_at"), _ts("revoked_at", nullable=True)]
        )  # fmt: skip
        extra = (
            [
                sa.ForeignKeyConstraint(
                    ["created_by"],
                    ["users.id"],
                    ondelete="SET NULL",
                    name="fk_host_tokens_created_by_users",
                )
            ]
            if table == "host_tokens"
            else []
        )
        op.create_table(
            table,
            sa.Column("id", ID),
            sa.Column("host_id", ID, nullable=False),
            sa.Column("token_hash", HASH, nullable=False),
            *used,
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
            sa.UniqueConstraint("token_hash", name=f"uq_{table}_token_hash"),
            sa.ForeignKeyConstraint(
                ["host_id"], ["hosts.id"], ondelete="CASCADE", name=f"fk_{table}_host_id_hosts"
            ),
            *extra,
        )
        op.create_index(f"ix_{table}_host_id", table, ["host_id"])


def _templates_and_capsules() -> None:
    op.create_table(
        "templates",
        sa.Column("id", ID),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("host_id", ID, nullable=True),
        sa.Column("vcpus", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("default_user", sa.String(64), nullable=False),
        sa.Column("default_env", JSON, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_templates"),
        sa.UniqueConstraint("team_id", "name", name="uq_templates_team_id_name"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_templates_team_id_teams"
        ),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], ondelete="SET NULL", name="fk_templates_host_id_hosts"
        ),
    )
    op.create_table(
        "capsules",
        sa.Column("id", ID),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("host_id", ID, nullable=True),
        sa.Column("template", sa.String(128), nullable=False),
        sa.Column("template_id", ID, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("disk_mb", sa.Integer(), nullable=False),
        sa.Column("timeout_sec", sa.Integer(), nullable=False),
        sa.Column("guest_ip", sa.String(64), nullable=False),
        sa.Column("host_ip", sa.String(64), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("last_active_at", nullable=True),
        _ts("last_updated"),
        sa.PrimaryKeyConstraint("id", name="pk_capsules"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_capsules_team_id_teams"
        ),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], ondelete="SET NULL", name="fk_capsules_host_id_hosts"
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["templates.id"],
            ondelete="SET NULL",
            name="fk_capsules_template_id_templates",
        ),
    )
    op.create_index("ix_capsules_team_id_status", "capsules", ["team_id", "status"])
    op.create_index("ix_capsules_host_id_status", "capsules", ["host_id", "status"])


def _audit_log() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", BIGID, autoincrement=True),
        sa.Column("team_id", ID, nullable=True),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("actor_id", ID, nullable=False),
        sa.Column("actor_name", sa.String(254), nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_team_id_id", "audit_log", ["team_id", "id"])


def _seed() -> None:
    now = datetime.now(UTC)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # SQLite keeps naive UTC (see db/base.py UTCDateTime)
    teams = sa.table(
        "teams",
        sa.column("id", ID),
        sa.column("name", sa.String),
        sa.column("slug", sa.String),
        sa.column("is_byoc", sa.Boolean),
        sa.column("created_at", TS),
    )
    op.bulk_insert(
        teams,
        [{"id": PLATFORM_TEAM_ID, "name": "Platform", "slug": "000000-000000",
          "is_byoc": False, "created_at": now}],
    )  # fmt: skip
    templates = sa.table(
        "templates",
        sa.column("id", ID),
        sa.column("team_id", ID),
        sa.column("name", sa.String),
        sa.column("type", sa.String),
        sa.column("size_bytes", sa.BigInteger),
        sa.column("default_user", sa.String),
        sa.column("default_env", JSON),
        sa.column("metadata", JSON),
        sa.column("created_at", TS),
    )
    op.bulk_insert(
        templates,
        [{"id": MINIMAL_TEMPLATE_ID, "team_id": PLATFORM_TEAM_ID, "name": "minimal",
          "type": "snapshot", "size_bytes": 0, "default_user": "root", "default_env": {},
          "metadata": {}, "created_at": now}],
    )  # fmt: skip


def downgrade() -> None:
    for table in (
        "audit_log",
        "capsules",
        "templates",
        "host_refresh_tokens",
        "host_tokens",
        "hosts",
        "api_keys",
        "team_members",
        "users",
        "teams",
    ):
        op.drop_table(table)
