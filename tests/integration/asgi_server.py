"""Serve an ASGI app with uvicorn on 127.0.0.1 inside a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
import uvicorn

LOOPBACK = "127.0.0.1"


@contextlib.asynccontextmanager
async def serve(app: object, port: int) -> AsyncIterator[uvicorn.Server]:
    """uvicorn on 127.0.0.1:`port` until the block ends. A plain asyncio task, not a task
    group: pytest-asyncio runs a fixture's set-up and tear-down in different tasks."""
    config = uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", lifespan="off")  # type: ignore[arg-type]
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
