"""Run the control plane app in-process for a test: its lifespan (database, migrations, services)
in a task of its own, and an httpx client talking ASGI to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette

from nestbox.controlplane.services.container import Services

BASE = "http://cp.test"


@dataclass
class RunningCP:
    app: Starlette
    client: httpx.AsyncClient

    @property
    def services(self) -> Services:
        return self.app.state.services  # type: ignore[no-any-return]  # set by the lifespan


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[RunningCP]:
    """The app's lifespan runs in its own task (pytest-asyncio sets a fixture up and tears it
    down in different tasks, and the lifespan's task group must enter and exit in one)."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def lifespan() -> None:
        async with app.router.lifespan_context(app):
            started.set()
            await stop.wait()

    task = asyncio.create_task(lifespan())
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
        raise RuntimeError("the lifespan ended before it started")
    if not started.is_set():
        waiter.cancel()
        raise TimeoutError("the control plane did not start in 60 s")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield RunningCP(app=app, client=client)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@dataclass(frozen=True)
class Account:
    """A signed-up user: their session and personal team."""

    token: str
    user_id: str
    team_id: str
    email: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def signup(client: httpx.AsyncClient, email: str, name: str = "") -> Account:
    r = await client.post(
        "/v1/auth/signup", json={"email": email, "password": "correct horse", "name": name}
    )
    assert r.status_code == 201, r.text
    doc = r.json()
    return Account(token=doc["token"], user_id=doc["user_id"], team_id=doc["team_id"],
                   email=doc["email"])  # fmt: skip


async def new_key(client: httpx.AsyncClient, account: Account, name: str = "k") -> dict[str, str]:
    r = await client.post("/v1/api-keys", json={"name": name}, headers=account.headers)
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["key"]}
