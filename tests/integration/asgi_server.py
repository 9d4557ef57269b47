"""Serve an ASGI app with uvicorn on 127.0.0.1 inside a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
import uvicorn

from nestbox.controlplane.__main__ import KEEPALIVE_IDLE_S

LOOPBACK = "127.0.0.1"


@contextlib.asynccontextmanager
async def serve(app: object, port: int) -> AsyncIterator[uvicorn.Server]:
    """uvicorn on 127.0.0.1:`port` until the block ends. A plain asyncio task, not a task
    group: pytest-asyncio runs a fixture's set-up and tear-down in different tasks."""
    # Idle keep-alive connections stay open as long as the real servers keep them (the
    # control plane's and the agent's 620 s), longer than any client pool here keeps them
    # (the control plane's agent pool: 90 s), so the client always closes first. uvicorn's 5 s
    # default closed a pooled connection just as a request went out on it (the in-process
    # loop busy at the deadline): the request failed unanswered, 503 host_unavailable.
    config = uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", lifespan="off",  # type: ignore[arg-type]
                            timeout_keep_alive=KEEPALIVE_IDLE_S)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        with anyio.fail_after(10):
            while not server.started:
                if task.done():
                    task.result()
                await anyio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        with anyio.fail_after(10):
            await task
