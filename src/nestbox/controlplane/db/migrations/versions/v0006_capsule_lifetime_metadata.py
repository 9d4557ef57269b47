"""Capsule lifetime, auto-resume and list paging (issue 13).

`capsules` gets `auto_resume` (a guest call to the paused capsule resumes it first), `ttl_sec`
and `on_timeout` (an absolute lifetime per run, then `pause` or `destroy`), `expires_at` (when
the current run's lifetime ends; NULL = none), and an index on (team_id, created_at, id): the
key `GET /v1/capsules` pages by. User metadata stays in the existing `metadata` column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "capsules",
        sa.Column("auto_resume", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column(
        "capsules", sa.Column("ttl_sec", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column(
        "capsules",
        sa.Column("on_timeout", sa.String(16), nullable=False, server_default="pause"),
    )
    op.add_column("capsules", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_capsules_team_id_created_at_id", "capsules", ["team_id", "created_at", "id"]
    )
    op.create_index("ix_capsules_expires_at", "capsules", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_capsules_expires_at", table_name="capsules")
    op.drop_index("ix_capsules_team_id_created_at_id", table_name="capsules")
    with op.batch_alter_table("capsules") as batch:
        batch.drop_column("expires_at")
        batch.drop_column("on_timeout")
        batch.drop_column("ttl_sec")
        batch.drop_column("auto_resume")
