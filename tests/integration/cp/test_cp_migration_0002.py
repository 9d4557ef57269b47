"""Migration 0002 on both backends: a database from before it, holding a host whose agent
token is plain text, comes out with the token sealed (and back on a downgrade)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection

from nestbox.controlplane.db import Database
from nestbox.controlplane.db.base import JSONDoc
from nestbox.controlplane.db.session import alembic_config
from nestbox.controlplane.secretbox import SecretBox, host_context, load_secret_key

pytestmark = pytest.mark.postgres  # touches database behaviour (CONTRIBUTING.md)

HOST_ID = "host-" + "1" * 25
PLAIN = "nba_" + "ab" * 32
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _to(revision: str, key: bytes | None = None, *, down: bool = False) -> Any:
    def run(conn: Connection) -> None:
        config = alembic_config(conn, secret_key=key)
        (command.downgrade if down else command.upgrade)(config, revision)

    return run


def _hosts(conn: Connection) -> dict[str, Any]:
    row = conn.execute(sa.text("SELECT * FROM hosts WHERE id = :id"), {"id": HOST_ID})
    return dict(row.mappings().one())


@pytest.mark.fresh_db
async def test_plaintext_tokens_are_sealed_and_opened_again(db: str, tmp_path: Path) -> None:
    database = Database(db)
    try:
        async with database.engine.begin() as conn:
            await conn.run_sync(_to("0001"))
            hosts = sa.table("hosts", *(sa.column(c) for c in (
                "id", "type", "provider", "availability_zone", "arch", "cpu_cores", "memory_mb",
                "disk_gb", "address", "status", "agent_token")),
                sa.column("load", JSONDoc), sa.column("metadata", JSONDoc),
                sa.column("created_at", sa.DateTime(timezone=True)),
                sa.column("updated_at", sa.DateTime(timezone=True)))  # fmt: skip
            await conn.execute(hosts.insert().values(
                id=HOST_ID, type="regular", provider="", availability_zone="", arch="x86_64",
                cpu_cores=2, memory_mb=1024, disk_gb=10, address="127.0.0.1:9726",
                status="online", agent_token=PLAIN, load={}, metadata={}, created_at=NOW,
                updated_at=NOW,
            ))  # fmt: skip

        with pytest.raises(RuntimeError, match="needs the control plane's secret key"):
            await database.migrate()  # a token to seal and no key: nothing changes
        async with database.engine.connect() as conn:
            assert (await conn.run_sync(_hosts))["agent_token"] == PLAIN

        key = load_secret_key(tmp_path / "nb")
        await database.migrate(secret_key=key)
        async with database.engine.connect() as conn:
            row = await conn.run_sync(_hosts)
        assert "agent_token" not in row
        assert row["proxy_token_enc"] is None  # the host must register again to proxy
        sealed = row["agent_token_enc"]
        assert sealed.startswith("v1.")
        assert PLAIN not in sealed
        assert SecretBox(key).open(sealed, host_context(HOST_ID, "agent_token")) == PLAIN
        async with database.transaction() as tx:
            host = await tx.hosts.get(HOST_ID)
        assert host is not None
        assert host.agent_token_enc == sealed

        async with database.engine.begin() as conn:
            await conn.run_sync(_to("0001", key, down=True))
        async with database.engine.connect() as conn:
            row = await conn.run_sync(_hosts)
        assert row["agent_token"] == PLAIN
        assert "agent_token_enc" not in row
    finally:
        await database.aclose()
