"""The database on both backends: migrations applied at start, schema = models, timestamps
always timezone-aware UTC, naive datetimes refused, unique rules → 409."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import StatementError

from nestbox.controlplane.db import Database
from nestbox.controlplane.db.base import Base
from nestbox.controlplane.db.models import AuditLogRow, TeamRow
from nestbox.controlplane.db.session import alembic_config
from nestbox.controlplane.errors import Conflict
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.harness import RunningCP, signup

pytestmark = pytest.mark.postgres  # touches database behaviour (CONTRIBUTING.md)


@pytest.mark.fresh_db
async def test_migrations_run_at_start_and_match_the_models(cp: RunningCP) -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    async with cp.services.db.engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()

        def diff(sync_conn: Connection) -> Any:
            ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)

        differences = await conn.run_sync(diff)
    assert version == head
    assert differences == []


@pytest.mark.fresh_db
async def test_migrating_twice_is_harmless(settings: CPSettings) -> None:
    db = Database(settings.db_url)
    try:
        await db.migrate()
        await db.migrate()
        async with db.transaction() as tx:
            minimal = await tx.templates.find("team-anything", "minimal")
        assert minimal is not None
        assert minimal.platform
        assert minimal.default_user == "root"
    finally:
        await db.aclose()


async def test_timestamps_are_timezone_aware(cp: RunningCP) -> None:
    account = await signup(cp.client, "tz@example.org")
    for path in ("/v1/me", "/v1/teams"):
        r = await cp.client.get(path, headers=account.headers)
        doc = r.json()
        created = (doc if isinstance(doc, dict) else doc[0])["created_at"]
        parsed = datetime.fromisoformat(created)
        assert parsed.utcoffset() == timedelta(0), created
        assert abs(datetime.now(UTC) - parsed) < timedelta(minutes=1)
    async with cp.services.db.transaction() as tx:
        user = await tx.users.get(account.user_id)
        team = await tx.teams.get(account.team_id)
        rows = (await tx.session.scalars(select(AuditLogRow))).all()
    assert user is not None
    assert team is not None
    for value in [user.created_at, team.created_at, *(r.created_at for r in rows)]:
        assert value.tzinfo is not None
        assert value.utcoffset() == timedelta(0)


async def test_other_offsets_are_stored_as_utc(cp: RunningCP) -> None:
    east = datetime(2026, 1, 2, 15, 30, tzinfo=timezone(timedelta(hours=5)))
    async with cp.services.db.transaction() as tx:
        tx.session.add(TeamRow(id="team-tztest", name="tz", slug="tz-test", created_at=east))
    async with cp.services.db.transaction() as tx:
        row = await tx.session.get(TeamRow, "team-tztest", populate_existing=True)
    assert row is not None
    assert row.created_at == east
    assert row.created_at.tzinfo is UTC
    assert row.created_at.hour == 10


async def test_naive_datetimes_are_refused(cp: RunningCP) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with cp.services.db.transaction() as tx:
            tx.session.add(
                TeamRow(id="team-naive", name="n", slug="naive", created_at=datetime(2026, 1, 1))
            )


async def test_unique_violations_are_conflicts(cp: RunningCP) -> None:
    async with cp.services.db.transaction() as tx:
        await tx.users.create("same@example.org", "", None)
    with pytest.raises(Conflict):
        async with cp.services.db.transaction() as tx:
            await tx.users.create("SAME@example.org", "", None)
