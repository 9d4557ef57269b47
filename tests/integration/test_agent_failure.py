"""An agent whose background work fails while it serves stops and says so, instead of living on
as a server whose every answer is "the agent is starting or stopping" (no root, no VM: the
agent's real app and server over the fake system)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from nestbox.hostagent.app import AgentApp
from nestbox.hostagent.auth import local_auth
from nestbox.hostagent.server import AgentFailed, serve
from tests.conftest import free_port
from tests.fakes.host import settings_for
from tests.fakes.system import FakeSystem

if TYPE_CHECKING:
    from pathlib import Path

WITHIN_S = 30.0


async def test_a_failure_in_the_managers_task_group_stops_the_agent(tmp_path: Path) -> None:
    port = free_port()
    settings = settings_for(tmp_path).model_copy(update={"listen": f"127.0.0.1:{port}"})
    app = AgentApp(settings, local_auth(settings), system=FakeSystem())

    async def boom() -> None:
        raise RuntimeError("a background task broke")

    with anyio.fail_after(WITHIN_S):
        async with anyio.create_task_group() as tg:
            failed: list[BaseException] = []

            async def run() -> None:
                try:
                    await serve(app, settings)
                except AgentFailed as err:
                    failed.append(err)

            tg.start_soon(run)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", trust_env=False
            ) as client:
                while True:
                    try:
                        health = (await client.get("/health")).json()
                    except httpx.TransportError:
                        health = {}
                    if health.get("status") == "ok":
                        break
                    await anyio.sleep(0.05)
            assert app.manager is not None
            app.manager._tg.start_soon(boom)  # what an escaped error in a stream's pump did
    assert len(failed) == 1, "serve() returned without an error"
    assert "a background task broke" in repr(failed[0].__cause__)
    assert app.manager is None
    async with httpx.AsyncClient(trust_env=False) as client:
        with pytest.raises(httpx.TransportError):  # nothing listens any more
            await client.get(f"http://127.0.0.1:{port}/health", timeout=2)
