"""Browser sessions and WebSocket tickets (the dashboard, issue 14).

`web_sessions`: one row per logged-in browser, keyed by the SHA-256 of the opaque token its
HttpOnly cookie holds (the token itself is never stored), naming the user and the team the
session acts in; logging out deletes the row, so a copied cookie dies with it.
`ws_tickets`: short-lived single-use tickets a session trades for one WebSocket handshake (a
browser cannot set headers on one), keyed by their SHA-256; redeeming one deletes it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ID = sa.String(40)
HASH = sa.String(64)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", HASH),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_web_sessions"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], ondelete="CASCADE", name="fk_web_sessions_user_id_users"
        ),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], ondelete="CASCADE", name="fk_web_sessions_team_id_teams"
        ),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])
    op.create_table(
        "ws_tickets",
        sa.Column("id", HASH),
        sa.Column("session_id", HASH, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ws_tickets"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["web_sessions.id"], ondelete="CASCADE",
            name="fk_ws_tickets_session_id_web_sessions",
        ),
    )  # fmt: skip
    op.create_index("ix_ws_tickets_session_id", "ws_tickets", ["session_id"])


def downgrade() -> None:
    op.drop_table("ws_tickets")
    op.drop_table("web_sessions")
