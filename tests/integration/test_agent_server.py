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


def wait_closed(sock: socket.socket, within: float) -> float:
    """`time.monotonic()` when the server had closed `sock`; fails after `within` seconds."""
    sock.settimeout(within)
    while sock.recv(4096):
        pass
    return time.monotonic()


def is_open(sock: socket.socket) -> bool:
    """True if the peer has not closed `sock` (nothing is waiting to be read on it)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


async def test_head_timeout_closes_slow_heads_only() -> None:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            http=protocol_class(HEAD_TIMEOUT_S), timeout_keep_alive=60)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn has no event to wait on)
            await anyio.sleep(0.01)

        def scenario() -> tuple[float, float, bool, bytes]:
            def request(sock: socket.socket) -> bytes:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(b"ok"):
                    data += sock.recv(4096)
                return data

            with socket.create_connection(("127.0.0.1", port)) as kept:
                request(kept)  # answered, now idle on a kept-alive connection
                before = time.monotonic()  # the head timers below start after this
                with (
                    socket.create_connection(("127.0.0.1", port)) as silent,
                    socket.create_connection(("127.0.0.1", port)) as slow,
                ):
                    slow.sendall(b"GET / HTTP/1.1\r\n")
                    silent_s = wait_closed(silent, 30) - before
                    slow_s = wait_closed(slow, 30) - before
                # A head timer armed on `kept` (it went idle before these two connected) would
                # have fired before theirs: it must still be open, and still serve.
                return silent_s, slow_s, is_open(kept), request(kept)

        silent, slow, kept_open, again = await anyio.to_thread.run_sync(scenario)
        # Closed by the head timeout: not before it, and not much after (a generous bound, for
        # a busy machine; without the timeout they would stay open for the test's 30 s).
        assert HEAD_TIMEOUT_S <= silent < HEAD_TIMEOUT_S + 10
        assert HEAD_TIMEOUT_S <= slow < HEAD_TIMEOUT_S + 10
        assert kept_open  # between requests the keep-alive timeout applies, not this one
        assert again.startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        await task


def test_split_listen() -> None:
    assert split_listen("127.0.0.1:9726") == ("127.0.0.1", 9726)
    assert split_listen("[::1]:9726") == ("::1", 9726)
