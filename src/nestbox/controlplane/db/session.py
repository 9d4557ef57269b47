"""The database: one async engine, transactions as units of work, migrations at start.

SQLite (the default, `<data_dir>/cp.db`) runs in WAL mode with a busy timeout and foreign keys
on; every transaction starts `BEGIN IMMEDIATE`, so two writers queue on the lock instead of one
failing with "database is locked" when it upgrades a read. PostgreSQL is reached through asyncpg.
Migrations are Alembic's (`db/migrations/`), applied by `Database.migrate()` on both.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from nestbox.controlplane.db.tx import Tx
from nestbox.controlplane.errors import Conflict

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


class Database:
    """Owns the engine. `async with db.transaction() as tx:` is the only way services touch
    rows: it commits when the block ends and rolls back if it raises."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url, echo=echo, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A unit of work. :raise Conflict: a uniqueness rule was broken at commit."""
        try:
            async with self._sessions() as session, session.begin():
                yield Tx(session)
        except IntegrityError as err:
            log.debug("integrity error", exc_info=True)
            raise Conflict("it conflicts with an existing resource") from err

    async def migrate(self, *, secret_key: bytes | None = None) -> None:
        """Bring the schema to the newest migration (idempotent). `secret_key`: the control
        plane's (`secretbox`), for migrations that seal stored secrets."""
        if self.dialect == "sqlite":
            _sqlite_parent(self.url).mkdir(parents=True, exist_ok=True)
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade, secret_key)

    async def aclose(self) -> None:
        await self.engine.dispose()


def alembic_config(
    connection: Connection | None = None, *, secret_key: bytes | None = None
) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    if secret_key is not None:
        cfg.attributes["secret_key"] = secret_key
    return cfg


def _upgrade(connection: Connection, secret_key: bytes | None) -> None:
    command.upgrade(alembic_config(connection, secret_key=secret_key), "head")


def _sqlite_parent(url: str) -> Path:
    path = url.split(":///", 1)[-1].split("?", 1)[0]
    return Path(path).parent if path and path != ":memory:" else Path(".")


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver, so "begin" below decides how they start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
