"""Events, notification channels and their delivery outbox, capsule run intervals (usage) and
team stats samples (issue 13).

- `events`: every published event (the SSE stream and the channels read them by id).
- `channels`: a team's notification channels; the provider config is sealed (secretbox).
- `channel_deliveries`: the outbox, one row per (event, channel), retried until delivered.
- `capsule_runs`: one row per interval a capsule ran (status running, pausing or snapshotting),
  kept by triggers on `capsules` (insert and status change), so every writer of a status (API
  verbs, reconciler, host monitor, team deletion, …) is counted without calling anything.
  The interval starts and ends at the row's `last_updated` of the change.
- `stats_samples`: what each team held, sampled periodically (`GET /v1/capsules/stats`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ID = sa.String(40)
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

BILLED = "('running', 'pausing', 'snapshotting')"
"""Statuses whose VM runs: the time a capsule spends in them is its usage."""

SQLITE_TRIGGERS = (
    f"""
    CREATE TRIGGER capsule_runs_insert AFTER INSERT ON capsules
    WHEN NEW.status IN {BILLED}
    BEGIN
        INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at)
        VALUES (NEW.id, NEW.team_id, NEW.vcpus, NEW.memory_mb, NEW.last_updated);
    END
    """,
    f"""
    CREATE TRIGGER capsule_runs_update AFTER UPDATE OF status ON capsules
    WHEN NEW.status IS NOT OLD.status
    BEGIN
        UPDATE capsule_runs SET ended_at = NEW.last_updated
        WHERE capsule_id = NEW.id AND ended_at IS NULL AND NEW.status NOT IN {BILLED};
        INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at)
        SELECT NEW.id, NEW.team_id, NEW.vcpus, NEW.memory_mb, NEW.last_updated
        WHERE NEW.status IN {BILLED} AND NOT EXISTS (
            SELECT 1 FROM capsule_runs WHERE capsule_id = NEW.id AND ended_at IS NULL);
    END
    """,
)
POSTGRES_TRIGGERS = (
    f"""
    CREATE FUNCTION capsule_runs_track() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
            RETURN NEW;
        END IF;
        IF NEW.status NOT IN {BILLED} THEN
            UPDATE capsule_runs SET ended_at = NEW.last_updated
            WHERE capsule_id = NEW.id AND ended_at IS NULL;
        ELSIF NOT EXISTS (
            SELECT 1 FROM capsule_runs WHERE capsule_id = NEW.id AND ended_at IS NULL
        ) THEN
            INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at)
            VALUES (NEW.id, NEW.team_id, NEW.vcpus, NEW.memory_mb, NEW.last_updated);
        END IF;
        RETURN NEW;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE TRIGGER capsule_runs_insert AFTER INSERT ON capsules
    FOR EACH ROW EXECUTE FUNCTION capsule_runs_track()
    """,
    """
    CREATE TRIGGER capsule_runs_update AFTER UPDATE OF status ON capsules
    FOR EACH ROW EXECUTE FUNCTION capsule_runs_track()
    """,
)


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", BIGID, autoincrement=True),
        sa.Column("team_id", ID, nullable=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_created_at", "events", ["created_at"])
    op.create_table(
        "channels",
        sa.Column("id", ID),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("config_enc", sa.Text(), nullable=False),
        sa.Column("event_types", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_channels"),
        sa.UniqueConstraint("team_id", "name", name="uq_channels_team_id_name"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_channels_team_id_teams"
        ),
    )
    op.create_table(
        "channel_deliveries",
        sa.Column("id", BIGID, autoincrement=True),
        sa.Column("delivery_id", sa.String(36), nullable=False),
        sa.Column("channel_id", ID, nullable=False),
        sa.Column("event_id", BIGID, nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("last_error", sa.String(500), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_channel_deliveries"),
        sa.UniqueConstraint("delivery_id", name="uq_channel_deliveries_delivery_id"),
        sa.ForeignKeyConstraint(
            ["channel_id"], ["channels.id"], ondelete="CASCADE",
            name="fk_channel_deliveries_channel_id_channels",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], ondelete="CASCADE",
            name="fk_channel_deliveries_event_id_events",
        ),
    )  # fmt: skip
    op.create_index(
        "ix_channel_deliveries_status_next_attempt_at",
        "channel_deliveries",
        ["status", "next_attempt_at"],
    )
    op.create_index(
        "ix_channel_deliveries_channel_id_id", "channel_deliveries", ["channel_id", "id"]
    )
    op.create_table(
        "capsule_runs",
        sa.Column("id", BIGID, autoincrement=True),
        sa.Column("capsule_id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_capsule_runs"),
        sa.ForeignKeyConstraint(
            ["capsule_id"], ["capsules.id"], ondelete="CASCADE",
            name="fk_capsule_runs_capsule_id_capsules",
        ),
    )  # fmt: skip
    op.create_index("ix_capsule_runs_capsule_id", "capsule_runs", ["capsule_id"])
    op.create_index("ix_capsule_runs_team_id_started_at", "capsule_runs", ["team_id", "started_at"])
    op.create_table(
        "stats_samples",
        sa.Column("id", BIGID, autoincrement=True),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("sampled_at", TS, nullable=False),
        sa.Column("running_count", sa.Integer(), nullable=False),
        sa.Column("vcpus_reserved", sa.Integer(), nullable=False),
        sa.Column("memory_mb_reserved", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stats_samples"),
    )
    op.create_index(
        "ix_stats_samples_team_id_sampled_at", "stats_samples", ["team_id", "sampled_at"]
    )
    _capsules_already_running()
    for statement in POSTGRES_TRIGGERS if _postgres() else SQLITE_TRIGGERS:
        op.execute(statement)


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def _capsules_already_running() -> None:
    """Capsules running when this migration runs start their first interval at their last
    change (their time before that is not known)."""
    op.execute(
        "INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at) "
        f"SELECT id, team_id, vcpus, memory_mb, last_updated FROM capsules WHERE status IN {BILLED}"
    )


def downgrade() -> None:
    if _postgres():
        op.execute("DROP TRIGGER IF EXISTS capsule_runs_update ON capsules")
        op.execute("DROP TRIGGER IF EXISTS capsule_runs_insert ON capsules")
        op.execute("DROP FUNCTION IF EXISTS capsule_runs_track()")
    else:
        op.execute("DROP TRIGGER IF EXISTS capsule_runs_update")
        op.execute("DROP TRIGGER IF EXISTS capsule_runs_insert")
    for table in ("stats_samples", "capsule_runs", "channel_deliveries", "channels", "events"):
        op.drop_table(table)
