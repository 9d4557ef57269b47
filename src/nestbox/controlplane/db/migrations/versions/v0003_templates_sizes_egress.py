"""Template kinds and makers, capsule sizes and internet egress (issue 12).

`templates` gets `created_by` (who made it: a user id, an API key's id or `platform`); two
platform templates are seeded beside `minimal`: `minimal-base` (the same image as a base
template: a capsule boots it cold with the vCPUs and memory it asks for) and `base` (a snapshot
template of 1 vCPU and 512 MiB with git, node, pip, a C toolchain, ...; its host builds it on
first use). `capsules` gets `template_type` (base | snapshot: whose vCPUs and memory the
capsule has), `allow_internet_access` and `egress_allow` (its egress setting, shown by
`GET /v1/capsules/{id}` and kept for every resume).

Columns are added and dropped in place (no batch copy: on SQLite, replacing `capsules` would
cascade to the rows that reference it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PLATFORM_TEAM_ID = "team-" + "0" * 25
BASE_TEMPLATE_ID = "tpl-" + "0" * 24 + "1"
MINIMAL_BASE_TEMPLATE_ID = "tpl-" + "0" * 24 + "2"
ID = sa.String(40)
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("templates", sa.Column("created_by", sa.String(128), nullable=True))
    op.add_column(
        "capsules",
        sa.Column("template_type", sa.String(16), nullable=False, server_default="snapshot"),
    )
    op.add_column(
        "capsules",
        sa.Column("allow_internet_access", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("capsules", sa.Column("egress_allow", JSON, nullable=False, server_default="[]"))
    templates = sa.table(
        "templates",
        sa.column("id", ID),
        sa.column("team_id", ID),
        sa.column("name", sa.String),
        sa.column("type", sa.String),
        sa.column("vcpus", sa.Integer),
        sa.column("memory_mb", sa.Integer),
        sa.column("size_bytes", sa.BigInteger),
        sa.column("default_user", sa.String),
        sa.column("default_env", JSON),
        sa.column("metadata", JSON),
        sa.column("created_by", sa.String),
        sa.column("created_at", TS),
    )
    now = datetime.now(UTC)
    common = {
        "team_id": PLATFORM_TEAM_ID,
        "size_bytes": 0,
        "default_user": "root",
        "default_env": {},
        "metadata": {},
        "created_by": "platform",
        "created_at": now,
    }
    op.bulk_insert(
        templates,
        [
            {"id": BASE_TEMPLATE_ID, "name": "base", "type": "snapshot", "vcpus": 1,
             "memory_mb": 512, **common},
            {"id": MINIMAL_BASE_TEMPLATE_ID, "name": "minimal-base", "type": "base",
             "vcpus": None, "memory_mb": None, **common},
        ],
    )  # fmt: skip
    op.execute(
        sa.text("UPDATE templates SET created_by = 'platform' WHERE team_id = :team").bindparams(
            team=PLATFORM_TEAM_ID
        )
    )


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM templates WHERE id IN (:a, :b)").bindparams(
            a=BASE_TEMPLATE_ID, b=MINIMAL_BASE_TEMPLATE_ID
        )
    )
    op.drop_column("capsules", "egress_allow")
    op.drop_column("capsules", "allow_internet_access")
    op.drop_column("capsules", "template_type")
    op.drop_column("templates", "created_by")
