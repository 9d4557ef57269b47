"""The template build queue and its logs (issue 12): table `builds`, one row per build, which
workers claim (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL) and which holds the build's
progress (`current_step`, `logs`), outcome and the defaults its template gets.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ID = sa.String(40)
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("id", ID),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("created_by", ID, nullable=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("base_template", sa.String(128), nullable=False),
        sa.Column("recipe", JSON, nullable=False),
        sa.Column("healthcheck", sa.Text(), nullable=True),
        sa.Column("vcpus", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("skip_pre_post", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("logs", JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("archive", sa.String(16), nullable=True),
        sa.Column("capsule_id", ID, nullable=True),
        sa.Column("host_id", ID, nullable=True),
        sa.Column("template_id", ID, nullable=True),
        sa.Column("template_type", sa.String(16), nullable=True),
        sa.Column("default_user", sa.String(64), nullable=False),
        sa.Column("default_env", JSON, nullable=False),
        sa.Column("default_workdir", sa.String(4096), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_builds"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_builds_team_id_teams"
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], ondelete="SET NULL", name="fk_builds_created_by_users"
        ),
    )
    op.create_index("ix_builds_status_created_at", "builds", ["status", "created_at"])
    op.create_index("ix_builds_team_id_created_at", "builds", ["team_id", "created_at"])


def downgrade() -> None:
    op.drop_table("builds")
