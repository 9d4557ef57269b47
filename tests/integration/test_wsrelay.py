"""`common.wsrelay` served by uvicorn on loopback in front of a `websockets` server (the
upstream): close codes each way, message size limits, backpressure both ways, credentials and
handshake refusals. Both port proxies run this relay (their own tests: test_proxy.py,
cp/test_cp_proxy.py)."""

from __future__ import annotations

import http
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from nestbox.common.wsrelay import RelayLimits, relay_websocket
from nestbox.protocol.errors import ErrorCode
from tests.conftest import eventually, free_port
from tests.integration.asgi_server import LOOPBACK, serve

CHAT = Subprotocol("chat")
BLOCK = 256 * 1024
NOISE = os.urandom(BLOCK - 4)
"""Incompressible: permessage-deflate (the client's default) would otherwise shrink a message
of one repeated byte to almost nothing on the wire, and sockets would hold thousands."""


def block(i: int) -> bytes:
    return i.to_bytes(4, "big") + NOISE


@dataclass
class Upstream:
    """The upstream server: runs `behaviour` per connection; records requests and the close
    code and reason each connection ended with (1006: no close frame)."""

    behaviour: Callable[[ServerConnection], Awaitable[None]] | None = None
    requests: list[Request] = field(default_factory=list)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    refuse: bool = False

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.requests.append(ws.request)
        try:
            if self.behaviour is not None:
                await self.behaviour(ws)
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        self.closes.append((ws.close_code, ws.close_reason))

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if self.refuse:
            return ws.respond(http.HTTPStatus.FORBIDDEN, "go away\n")
        return None


@dataclass
class Relay:
    """The relay as an ASGI app; each session's cancel scope is kept (to cancel it)."""

    upstream_port: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    sessions: list[anyio.CancelScope] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        query = scope["query_string"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        with anyio.CancelScope() as session:
            self.sessions.append(session)
            await relay_websocket(
                scope, receive, send, address=f"{LOOPBACK}:{self.upstream_port}",
                target=scope["raw_path"] + (b"?" + query if query else b""), headers=headers,
                **self.kwargs,
            )  # fmt: skip


def chat_if_offered(ws: ServerConnection, offered: Any) -> Subprotocol | None:
    return CHAT if CHAT in offered else None


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Upstream, Relay, str]]:
    up = Upstream()
    async with ws_serve(up.handle, LOOPBACK, 0, select_subprotocol=chat_if_offered,
                        max_size=2**24, process_request=up.process_request) as server:  # fmt: skip
        relay = Relay(server.sockets[0].getsockname()[1])
        port = free_port()
        async with serve(relay, port):
            yield up, relay, f"ws://{LOOPBACK}:{port}"


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "close-me":
            await ws.close(4001, "bye")
            return
        await ws.send(message)


async def client_close(ws: ClientConnection) -> tuple[int, str]:
    """The close frame the client got (code, reason)."""

    async def read_all() -> None:
        while True:
            await ws.recv()

    with pytest.raises(ConnectionClosed) as closed:
        await read_all()
    assert closed.value.rcvd is not None, closed.value
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_messages_and_closes_pass_through_both_ways(
    stack: tuple[Upstream, Relay, str],
) -> None:
    up, relay, url = stack
    up.behaviour = echo
    relay.kwargs = {"credentials": [("X-Nestbox-Proxy-Token", "real")]}
    forged = {"X-Agent-Token": "forged", "X-Nestbox-Proxy-Token": "forged", "X-Mine": "1"}
    async with ws_connect(f"{url}/a/{{b}}/?q=%2e", subprotocols=[CHAT],
                          additional_headers=forged) as ws:  # fmt: skip
        assert ws.subprotocol == CHAT
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01")
        assert await ws.recv() == b"\x00\x01"
        await ws.send("close-me")
        assert await client_close(ws) == (4001, "bye")
    seen = up.requests[0]
    assert seen.path == "/a/{b}/?q=%2e"
    assert seen.headers.get_all("x-nestbox-proxy-token") == ["real"]
    assert "x-agent-token" not in seen.headers
    assert seen.headers["x-mine"] == "1"

    async with ws_connect(url, subprotocols=[CHAT]) as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
        await ws.close(4002, "client done")
    await eventually(lambda: (4002, "client done") in up.closes)


async def test_upstream_gone_without_a_close_frame_is_1011(
    stack: tuple[Upstream, Relay, str],
) -> None:
    up, _, url = stack

    async def vanish(ws: ServerConnection) -> None:
        await ws.recv()
        ws.transport.abort()

    up.behaviour = vanish
    async with ws_connect(url) as ws:
        await ws.send("x")
        assert await client_close(ws) == (1011, "upstream connection lost")


async def test_a_client_message_over_the_limit_is_1009_and_the_upstream_gets_1001(
    stack: tuple[Upstream, Relay, str],
) -> None:
    up, relay, url = stack
    up.behaviour = echo
    relay.kwargs = {"limits": RelayLimits(max_message=1024)}
    async with ws_connect(url) as ws:
        await ws.send(b"b" * 1024)  # at the limit: relayed
        assert await ws.recv() == b"b" * 1024
        await ws.send("é" * 600)  # 600 characters, 1200 bytes
        code, _ = await client_close(ws)
    assert code == 1009
    await eventually(lambda: up.closes)
    assert up.closes[0][0] == 1001


async def test_an_upstream_message_over_the_limit_is_1011_for_the_client(
    stack: tuple[Upstream, Relay, str],
) -> None:
    up, relay, url = stack

    async def big(ws: ServerConnection) -> None:
        await ws.send(b"b" * 2000)
        await ws.wait_closed()

    up.behaviour = big
    relay.kwargs = {"limits": RelayLimits(max_message=1024)}
    async with ws_connect(url) as ws:
        code, reason = await client_close(ws)
    assert code == 1011
    assert reason.startswith("upstream error:")
    await eventually(lambda: up.closes)
    assert up.closes[0][0] == 1009  # the upstream is told it sent too much


async def test_cancelling_the_relay_closes_both_sides_with_1001(
    stack: tuple[Upstream, Relay, str],
) -> None:
    up, relay, url = stack
    up.behaviour = echo
    async with ws_connect(url) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        relay.sessions[0].cancel()
        assert await client_close(ws) == (1001, "proxy closing")
    await eventually(lambda: up.closes)
    assert up.closes[0] == (1001, "proxy closing")


async def test_a_client_that_vanishes_closes_the_upstream(
    stack: tuple[Upstream, Relay, str],
) -> None:
    up, _, url = stack
    up.behaviour = echo
    ws = await ws_connect(url)
    await ws.send("x")
    assert await ws.recv() == "x"
    ws.transport.abort()
    await eventually(lambda: up.closes, within=15)
    # uvicorn reports a lost connection as 1005 (no status): a normal close upstream
    assert up.closes[0][0] in (1000, 1001)


async def stalled(count: Callable[[], int], limit: int) -> int:
    """Wait until `count()` stops growing (the sender is blocked) and return it."""
    last = -1
    while (now := count()) != last:
        assert now < limit, "the sender never blocked: something buffers without bound"
        last = now
        await anyio.sleep(0.5)
    return now


async def test_a_slow_client_blocks_the_upstream(stack: tuple[Upstream, Relay, str]) -> None:
    up, _, url = stack
    sent = 0
    limit = 400  # 100 MiB

    async def flood(ws: ServerConnection) -> None:
        nonlocal sent
        while sent < limit:
            await ws.send(block(sent))
            sent += 1
        await ws.wait_closed()

    up.behaviour = flood
    async with ws_connect(url, max_size=2**24) as ws:
        with anyio.fail_after(60):
            held = await stalled(lambda: sent, limit)
        assert held * BLOCK < 64 * 2**20  # queues and socket buffers only
        for i in range(held):  # everything arrives, in order, once the client reads
            assert (await ws.recv())[:4] == i.to_bytes(4, "big")


async def test_a_slow_upstream_blocks_the_client(stack: tuple[Upstream, Relay, str]) -> None:
    up, _, url = stack
    release = anyio.Event()
    got: list[bytes] = []

    async def slow(ws: ServerConnection) -> None:
        await release.wait()
        async for message in ws:
            assert isinstance(message, bytes)
            got.append(message[:4])

    up.behaviour = slow
    sent = 0
    limit = 400
    async with ws_connect(url, max_size=2**24) as ws:

        async def flood() -> None:
            nonlocal sent
            while sent < limit:
                await ws.send(block(sent))
                sent += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            with anyio.fail_after(60):
                held = await stalled(lambda: sent, limit)
            assert held * BLOCK < 64 * 2**20
            tg.cancel_scope.cancel()
        release.set()
        await eventually(lambda: len(got) >= held)
        assert got[:held] == [i.to_bytes(4, "big") for i in range(held)]


async def test_handshake_refusals(stack: tuple[Upstream, Relay, str]) -> None:
    up, relay, url = stack
    up.refuse = True
    with pytest.raises(InvalidStatus) as refused:  # the upstream's own answer comes back
        async with ws_connect(url):
            pass
    response = refused.value.response
    assert (response.status_code, response.body) == (403, b"go away\n")
    assert response.headers["content-type"].startswith("text/plain")

    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    relay.upstream_port = free_port()  # nothing listens
    limits = RelayLimits(dial_attempts=3, dial_backoff_s=0.1)
    relay.kwargs = {"limits": limits, "sleep": fake_sleep, "unreachable": "nothing listens",
                    "error_code": ErrorCode.AGENT_ERROR}  # fmt: skip
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(url):
            pass
    response = refused.value.response
    assert response.status_code == 502
    assert json.loads(response.body) == {
        "error": {"code": "agent_error", "message": "nothing listens"}
    }
    assert sleeps == [0.1, 0.2]  # three attempts
    assert isinstance(response.headers, Headers)
