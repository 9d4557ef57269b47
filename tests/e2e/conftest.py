"""The end-to-end tier's fixtures: the whole platform as real processes, once per database.

`stack` is a control plane process, one host agent process registered with it through the real
flow and the admin's API client, on SQLite and on PostgreSQL (an embedded server, one database):
every test that asks for it runs on both. A test about the agent alone, where the database
plays no part, pins `@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)` and says
why. `stack.extra_agent()` adds a second host for a test that needs two. Capsules are clones of
the session's `minimal` template (`tests/integration/vm/session.py`, one cold boot shared with
the VM tier). `capsule` is one running capsule per stack, made on first use, that tests share
where they do not depend on each other's state: each leaves it running, with nothing of its
own left in it (a module fixture may keep a server there until the module ends).

Both stacks are made together when the first test needs one (`Stacks`) and live until the
tier ends, so the auto-pause test's capsule (`Stack.idle`, created with the stack) idles for
its minute while every other test runs, on both databases at once. The tests run in phases
(`pytest_collection_modifyitems`): everything else, then auto-pause, then the agent-crash
tests (an agent restart restarts its capsules' idle timers), SQLite first in each phase.

After every test its stack is checked healthy again (control plane and agent up, host online,
the shared capsule running, no row stuck), restarting what a test crashed; at the end every
capsule is destroyed through the API and nothing a stack's first agent made is left on the
host, then the processes stop and the PostgreSQL database is dropped.

Needs root and QEMU like the VM tier: without them every test skips with the reason
(`vm_skip_reason()`, through the `vm_settings` fixture); under `NESTBOX_REQUIRE_ALL=1` that
skip is a failure. Slots: this tier's agents use `NESTBOX_TEST_SLOT_FIRST` + 200 to + 399
(100 per database), clear of the VM tier's.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from tests.e2e.stack import Stack, leftovers_beyond, running_stack
from tests.integration.cp.postgres import create_database, drop_database, run_postgres
from tests.integration.vm.conftest import SLOT_FIRST

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.cp.postgres import PostgresServer
    from tests.integration.vm.conftest import BootInfo

HERE = Path(__file__).parent
DATABASES = ("sqlite", "postgres")
SLOTS = {"sqlite": SLOT_FIRST + 200, "postgres": SLOT_FIRST + 300}
PHASE = {"test_auto_pause.py": 2, "test_stack_crash.py": 3}
"""The phase a module's tests run in (others: 1)."""


def database_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    db = callspec.params.get("stack") if callspec is not None else None
    return db if db in DATABASES else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """This tier's tests in phases (see the module's docstring), SQLite first in each, in file
    order within each database."""
    ours = [i for i, item in enumerate(items) if HERE in item.path.parents]

    def position(item: pytest.Item) -> tuple[int, int]:
        db = database_of(item)
        return PHASE.get(item.path.name, 1), DATABASES.index(db) if db else len(DATABASES)

    ordered = sorted((items[i] for i in ours), key=position)  # stable
    for i, item in zip(ours, ordered, strict=True):
        items[i] = item


class BackgroundPostgres:
    """The embedded PostgreSQL server, started in a thread (initdb and start take seconds) so it
    comes up while the SQLite stack starts; `server()` waits for it."""

    def __init__(self) -> None:
        self._ready, self._stop = threading.Event(), threading.Event()
        self._server: PostgresServer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="e2e-postgres", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with run_postgres() as server:
                self._server = server
                self._ready.set()
                self._stop.wait()
        except BaseException as err:  # handed to the test that waits for the server
            self._error = err
        finally:
            self._ready.set()

    def server(self, within: float = 120.0) -> PostgresServer:
        assert self._ready.wait(within), "the embedded PostgreSQL did not start"
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL did not start") from self._error
        return self._server

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class Stacks:
    """The tier's stacks by database: all that the selected tests need, made at the first
    `get`, torn down by `close`."""

    def __init__(self, base: AgentSettings, tmp: pytest.TempPathFactory, wanted: list[str]):
        self.base, self.tmp, self.wanted = base, tmp, wanted
        self._stacks: dict[str, Stack] = {}
        self._postgres: BackgroundPostgres | None = None
        self._failed: BaseException | None = None
        self._exit = contextlib.ExitStack()

    def get(self, db: str) -> Stack:
        if self._failed is not None:  # one failed start, not one per test
            raise RuntimeError("the end-to-end stacks did not start") from self._failed
        if not self._stacks:
            names = sorted({*self.wanted, db}, key=DATABASES.index)
            try:
                if "postgres" in names:  # it comes up while the SQLite stack starts
                    self._postgres = BackgroundPostgres()
                    self._exit.callback(self._postgres.stop)
                for name in names:
                    self._stacks[name] = self._start(name)
            except BaseException as err:
                self._failed = err
                raise
        return self._stacks[db]

    def _start(self, db: str) -> Stack:
        url = None
        if db == "postgres":
            assert self._postgres is not None
            server, name = self._postgres.server(), "e2e_" + secrets.token_hex(4)
            url = anyio.run(create_database, server, name)
            self._exit.callback(lambda: anyio.run(drop_database, server, name))
            # A plain postgresql:// URL, as an operator writes it; the CP picks the async driver.
            url = url.replace("postgresql+asyncpg://", "postgresql://")
        cp = self._exit.enter_context(running_stack(self.tmp.mktemp(f"e2e-{db}"), url))
        agent = cp.add_agent(self.base, slot_first=SLOTS[db], slot_count=20)
        stack = Stack(db, cp, agent, self.base, SLOTS[db])
        self._exit.callback(stack.close)
        self._exit.callback(self._clean, stack)
        stack.wait_online(agent)
        stack.start_idle()
        return stack

    @staticmethod
    def _clean(stack: Stack) -> None:
        """Every capsule destroyed through the API; nothing the first agent made is left."""
        stack.healthy()
        for capsule in stack.api.get("/v1/capsules").json():
            stack.destroy(capsule["id"])
        left = leftovers_beyond(stack.agent, keep=set())
        assert left == {k: [] for k in left}, left

    def close(self) -> None:
        self._exit.close()


@pytest.fixture(scope="package")
def stacks(
    request: pytest.FixtureRequest,
    vm_settings: AgentSettings,
    minimal_template: tuple[Template, BootInfo],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stacks]:
    wanted = {db for item in request.session.items if HERE in item.path.parents
              and (db := database_of(item))}  # fmt: skip
    registry = Stacks(vm_settings, tmp_path_factory, sorted(wanted, key=DATABASES.index))
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture(params=DATABASES)
def stack(request: pytest.FixtureRequest, stacks: Stacks) -> Iterator[Stack]:
    """The stack on this database; after the test it is healthy again (`Stack.healthy`)."""
    stack = stacks.get(request.param)
    yield stack
    stack.healthy()


@pytest.fixture
def capsule(stack: Stack) -> str:
    """The stack's shared running capsule (on its first agent; made on first use)."""
    return stack.shared_capsule()
