"""Hosts' agent tokens sealed at rest, and a second token for the agents' port proxy.

`hosts.agent_token` (plain text) becomes `hosts.agent_token_enc` (sealed with AES-GCM under the
control plane's secret key, `controlplane/secretbox.py`), and `hosts.proxy_token_enc` is new
(empty for hosts registered before: they serve no proxied requests until they register again).

Sealing existing tokens needs the key: `Database.migrate(secret_key=…)` passes it (the control
plane does), or `alembic -x secret_key_file=<data_dir>/secret-key …` by hand. Without it the
upgrade refuses to run when there is a token to seal, and the downgrade when there is one to
open. Columns are added and dropped in place (no batch copy of `hosts`: on SQLite, dropping
the table a copy replaces would cascade to its tokens and capsules).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import context, op

from nestbox.controlplane.secretbox import SecretBox, host_context

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HOSTS = sa.table(
    "hosts",
    sa.column("id", sa.String),
    sa.column("agent_token", sa.String),
    sa.column("agent_token_enc", sa.String),
)


def _box() -> SecretBox | None:
    key = context.config.attributes.get("secret_key")
    if key is None:
        path = context.get_x_argument(as_dictionary=True).get("secret_key_file")
        if path:
            key = bytes.fromhex(Path(path).read_text().strip())
    return SecretBox(key) if key is not None else None


def _need_box(what: str) -> SecretBox:
    box = _box()
    if box is None:
        raise RuntimeError(
            f"migration 0002 must {what} the hosts' agent tokens and needs the control plane's "
            "secret key (alembic -x secret_key_file=<NESTBOX_DIR>/secret-key)"
        )
    return box


def upgrade() -> None:
    op.add_column("hosts", sa.Column("agent_token_enc", sa.String(255), nullable=True))
    op.add_column("hosts", sa.Column("proxy_token_enc", sa.String(255), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(HOSTS.c.id, HOSTS.c.agent_token).where(HOSTS.c.agent_token.is_not(None))
    ).all()
    if rows:
        box = _need_box("seal")
        for host_id, token in rows:
            sealed = box.seal(token, host_context(host_id, "agent_token"))
            conn.execute(HOSTS.update().where(HOSTS.c.id == host_id).values(agent_token_enc=sealed))
    op.drop_column("hosts", "agent_token")


def downgrade() -> None:
    op.add_column("hosts", sa.Column("agent_token", sa.String(128), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(HOSTS.c.id, HOSTS.c.agent_token_enc).where(HOSTS.c.agent_token_enc.is_not(None))
    ).all()
    if rows:
        box = _need_box("open")
        for host_id, sealed in rows:
            token = box.open(sealed, host_context(host_id, "agent_token"))
            conn.execute(HOSTS.update().where(HOSTS.c.id == host_id).values(agent_token=token))
    op.drop_column("hosts", "proxy_token_enc")
    op.drop_column("hosts", "agent_token_enc")
