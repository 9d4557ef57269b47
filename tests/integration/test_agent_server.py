"""The agent's uvicorn protocol on loopback: a request head must complete in time; an idle
kept-alive connection is not affected (no root, no VM)."""

from __future__ import annotations

import asyncio
import socket
import time

import anyio
import uvicorn

from nestbox.hostagent.server import protocol_class, split_listen
from tests.conftest import free_port

HEAD_TIMEOUT_S = 0.5


async def app(scope: dict[str, object], receive: object, send: object) -> None:
    assert scope["type"] == "http"
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


def closed_after(sock: socket.socket, within: float) -> float | None:
    sock.settimeout(within)
    started = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    return time.monotonic() - started


async def test_head_timeout_closes_slow_heads_only() -> None:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            http=protocol_class(HEAD_TIMEOUT_S), timeout_keep_alive=60)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn has no event to wait on)
            await anyio.sleep(0.01)

        def scenario() -> tuple[float | None, float | None, float | None]:
            with socket.create_connection(("127.0.0.1", port)) as silent:
                silent_closed = closed_after(silent, 3)
            with socket.create_connection(("127.0.0.1", port)) as slow:
                slow.sendall(b"GET / HTTP/1.1\r\n")
                slow_closed = closed_after(slow, 3)
            with socket.create_connection(("127.0.0.1", port)) as kept:
                kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(b"ok"):
                    data += kept.recv(4096)
                idle_closed = closed_after(kept, 4 * HEAD_TIMEOUT_S)
            return silent_closed, slow_closed, idle_closed

        silent, slow, idle = await anyio.to_thread.run_sync(scenario)
        assert silent is not None
        assert silent < HEAD_TIMEOUT_S + 1
        assert slow is not None
        assert slow < HEAD_TIMEOUT_S + 1
        assert idle is None  # between requests the keep-alive timeout applies, not this one
    finally:
        server.should_exit = True
        await task


def test_split_listen() -> None:
    assert split_listen("127.0.0.1:9726") == ("127.0.0.1", 9726)
    assert split_listen("[::1]:9726") == ("::1", 9726)
