"""Reading `GET /v1/events/stream` in a test: a task collects the events of one stream, over
real HTTP (httpx's ASGI transport buffers whole answers, so a stream needs a served app)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from tests.conftest import eventually


@dataclass
class Stream:
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ended: bool = False

    def kinds(self, resource_id: str | None = None) -> list[str]:
        return [e["event"] for e in self.events if resource_id is None
                or (e.get("resource") or {}).get("id") == resource_id]  # fmt: skip

    async def wait_for(self, kind: str, resource_id: str | None = None, *,
                       within: float = 30) -> dict[str, Any]:  # fmt: skip
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e["event"] == kind and (
                resource_id is None or (e.get("resource") or {}).get("id") == resource_id)),
                None)  # fmt: skip

        return await eventually(found, within=within, what=f"event {kind} {resource_id}")


@contextlib.asynccontextmanager
async def open_stream(url: str, headers: dict[str, str]) -> AsyncIterator[Stream]:
    """Events of `url`/v1/events/stream as `headers`' caller, from `connected` on."""
    stream = Stream()

    async def read(client: httpx.AsyncClient) -> None:
        data: list[str] = []
        try:
            async with client.stream("GET", "/v1/events/stream", headers=headers) as r:
                assert r.status_code == 200, await r.aread()
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith(":"):
                        stream.comments.append(line)
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif line == "" and data:
                        stream.events.append(json.loads("\n".join(data)))
                        data = []
        finally:
            stream.ended = True

    client = httpx.AsyncClient(base_url=url, timeout=None, trust_env=False)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(read, client)
        await stream.wait_for("connected")
        try:
            yield stream
        finally:
            tg.cancel_scope.cancel()
