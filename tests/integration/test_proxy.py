"""The port proxy served by uvicorn on loopback, in front of real servers on 127.0.0.1 standing in
for capsule ports: `python3 -m http.server`, a `websockets` echo server, and a small Starlette
app for bodies, slow answers and endless streams. `FakeTargets` maps capsule ids to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from nestbox.hostagent.proxy import PortProxy
from tests.conftest import HANG_S, free_port
from tests.fakes.targets import FakeTargets
from tests.integration.asgi_server import LOOPBACK, serve

CHAT = Subprotocol("chat")


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture
def targets() -> FakeTargets:
    return FakeTargets({"cl-a": LOOPBACK})


@pytest.fixture
async def proxy(targets: FakeTargets) -> AsyncIterator[tuple[PortProxy, str]]:
    app = PortProxy(targets)
    port = free_port()
    async with serve(app, port):
        yield app, f"http://{LOOPBACK}:{port}"
    await app.aclose()


@pytest.fixture
async def client(proxy: tuple[PortProxy, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy[1], trust_env=False, timeout=30) as c:
        yield c


@pytest.fixture
def site(tmp_path: Path) -> Iterator[int]:
    """`python3 -m http.server` on 127.0.0.1 serving a directory with `dir/file.txt`."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file.txt").write_text("inside\n")
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", LOOPBACK]
    proc = subprocess.Popen(
        [*argv, "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class Upstream:
    """A Starlette app on 127.0.0.1 with the endpoints the tests need."""

    def __init__(self) -> None:
        self.stream_closed = anyio.Event()
        self.release_slow = anyio.Event()
        self.app = Starlette(
            routes=[
                Route("/echo/{rest:path}", self.echo, methods=["GET", "POST"]),
                Route("/slow", self.slow),
                Route("/endless", self.endless),
                Route("/bytes/{n:int}", self.bytes_),
            ]
        )

    async def echo(self, request: Request) -> Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return JSONResponse(
            {
                "path": request.url.path,
                "query": request.url.query,
                "host": request.headers.get("host"),
                "agent_token": request.headers.get("x-agent-token"),
                "size": size,
                "sha256": digest.hexdigest(),
            }
        )

    async def slow(self, request: Request) -> Response:
        await self.release_slow.wait()
        return Response(b"slow done")

    async def endless(self, request: Request) -> Response:
        async def forever() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * 1024
                    await anyio.sleep(0.01)
            finally:
                self.stream_closed.set()

        return StreamingResponse(forever())

    async def bytes_(self, request: Request) -> Response:
        n = request.path_params["n"]

        async def chunks() -> AsyncIterator[bytes]:
            block = hashlib.sha512(b"b").digest() * 1024  # 64 KiB
            for start in range(0, n, len(block)):
                yield block[: min(len(block), n - start)]

        return StreamingResponse(chunks())


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    up = Upstream()
    port = free_port()
    async with serve(up.app, port):
        yield up, port


# ---- HTTP ----------------------------------------------------------------------------------


async def test_directory_redirect_keeps_prefix_and_slash(
    client: httpx.AsyncClient, site: int
) -> None:
    response = await client.get(f"/proxy/cl-a/{site}/dir")
    assert response.status_code == 301
    assert response.headers["location"] == f"/proxy/cl-a/{site}/dir/"
    listing = await client.get(response.headers["location"])
    assert listing.status_code == 200  # no redirect loop: the trailing slash reached the server
    assert "file.txt" in listing.text
    assert (await client.get(f"/proxy/cl-a/{site}/dir/file.txt")).text == "inside\n"
    root = await client.get(f"/proxy/cl-a/{site}")
    assert root.status_code == 200
    assert "dir/" in root.text


async def test_path_query_headers_and_streamed_bodies(
    client: httpx.AsyncClient, upstream: tuple[Upstream, int]
) -> None:
    _, port = upstream
    total = 20 * 1024 * 1024
    block = b"0123456789abcdef" * 4096

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    response = await client.post(
        f"/proxy/cl-a/{port}/echo/a/b/?q=1&r=%20",
        content=body(),
        headers={"X-Agent-Token": "cp-secret"},
    )
    doc = response.json()
    assert doc["path"] == "/echo/a/b/"
    assert doc["query"] == "q=1&r=%20"
    assert doc["host"] == f"{LOOPBACK}:{port}"
    assert doc["agent_token"] is None
    assert doc["size"] == total
    assert doc["sha256"] == hashlib.sha256(block * (total // len(block))).hexdigest()

    n = 30 * 1024 * 1024 + 5
    digest, size = hashlib.sha256(), 0
    async with client.stream("GET", f"/proxy/cl-a/{port}/bytes/{n}") as streamed:
        async for chunk in streamed.aiter_raw():
            digest.update(chunk)
            size += len(chunk)
    block64 = hashlib.sha512(b"b").digest() * 1024
    want = hashlib.sha256()
    for start in range(0, n, len(block64)):
        want.update(block64[: min(len(block64), n - start)])
    assert (size, digest.hexdigest()) == (n, want.hexdigest())


async def test_client_disconnect_stops_the_upstream_stream(
    client: httpx.AsyncClient, upstream: tuple[Upstream, int]
) -> None:
    up, port = upstream
    async with client.stream("GET", f"/proxy/cl-a/{port}/endless") as response:
        async for _ in response.aiter_raw():
            break
    with anyio.fail_after(HANG_S):
        await up.stream_closed.wait()


async def test_502_when_nothing_listens(
    client: httpx.AsyncClient, proxy: tuple[PortProxy, str]
) -> None:
    port = free_port()
    response = await client.get(f"/proxy/cl-a/{port}/")
    assert response.status_code == 502
    assert response.json() == {
        "error": {
            "code": "unavailable",
            "message": f"proxy error: nothing listens on port {port} in capsule cl-a",
        }
    }
    ws_url = proxy[1].replace("http", "ws") + f"/proxy/cl-a/{port}/"
    with pytest.raises(InvalidStatus) as caught:
        async with ws_connect(ws_url, proxy=None):
            pass
    assert caught.value.response.status_code == 502


async def test_404_for_unknown_capsule(client: httpx.AsyncClient) -> None:
    response = await client.get("/proxy/cl-zzz/8000/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_dial_retry_covers_a_late_listener(targets: FakeTargets) -> None:
    """Nothing listens at the first two attempts; the capsule's forwarder comes up during the
    second backoff (as socat does after a restore) and the third attempt connects.

    The listener binds inside that backoff (the proxy's `sleep` is the test's), so no thread
    start or busy scheduler can move it before the second attempt or after the third; the
    backoffs themselves are real sleeps."""
    port = free_port()
    backoffs: list[float] = []
    servers: list[http.server.ThreadingHTTPServer] = []

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, format: str, *args: object) -> None:
            pass

    async def backoff(seconds: float) -> None:
        backoffs.append(seconds)
        if len(backoffs) == 2:  # bound and listening when this returns: the next dial connects
            server = http.server.ThreadingHTTPServer((LOOPBACK, port), Hello)
            servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        await anyio.sleep(seconds)

    app = PortProxy(targets, sleep=backoff)
    proxy_port = free_port()
    try:
        async with (
            serve(app, proxy_port),
            httpx.AsyncClient(trust_env=False, timeout=30) as client,
        ):
            started = time.monotonic()
            response = await client.get(f"http://{LOOPBACK}:{proxy_port}/proxy/cl-a/{port}/")
            elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.text == "hello"
        assert backoffs == [0.1, 0.2]  # two refused dials, then the one that connected
        assert elapsed >= 0.3  # both backoffs were slept
    finally:
        await app.aclose()
        for server in servers:
            server.shutdown()
            server.server_close()


async def test_503_while_draining(
    client: httpx.AsyncClient, upstream: tuple[Upstream, int], targets: FakeTargets
) -> None:
    up, port = upstream
    tracker = targets.tracker("cl-a")
    results: list[object] = []
    async with anyio.create_task_group() as tg:

        async def in_flight() -> None:
            results.append((await client.get(f"/proxy/cl-a/{port}/slow")).text)

        tg.start_soon(in_flight)
        with anyio.fail_after(HANG_S):
            while tracker.statistics().active == 0:  # noqa: ASYNC110 (the state has no event to wait on)
                await anyio.sleep(0.01)

        async def drain() -> None:
            results.append(await tracker.drain(timeout_s=10))

        tg.start_soon(drain)
        with anyio.fail_after(HANG_S):
            while not tracker.statistics().draining:  # noqa: ASYNC110 (the state has no event to wait on)
                await anyio.sleep(0.01)
        refused = await client.get(f"/proxy/cl-a/{port}/echo/x")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "unavailable"
        up.release_slow.set()
    assert sorted(map(str, results)) == ["True", "slow done"]  # the in-flight one finished
    tracker.reset()
    assert (await client.get(f"/proxy/cl-a/{port}/echo/x")).status_code == 200


async def test_evict_drops_cached_targets(
    client: httpx.AsyncClient, upstream: tuple[Upstream, int], proxy: tuple[PortProxy, str]
) -> None:
    app, _ = proxy
    _, port = upstream
    assert (await client.get(f"/proxy/cl-a/{port}/echo/1")).status_code == 200
    assert app.statistics().cached_targets == 1
    await app.evict("cl-a")
    assert app.statistics().cached_targets == 0
    assert (await client.get(f"/proxy/cl-a/{port}/echo/2")).status_code == 200


# ---- WebSocket -----------------------------------------------------------------------------


async def test_websocket_echo_and_close_both_ways(proxy: tuple[PortProxy, str]) -> None:
    closes: list[tuple[int, str]] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        assert ws.request.path == "/echo?x=1"
        assert "x-agent-token" not in ws.request.headers
        try:
            async for message in ws:
                if message == "close-me":
                    await ws.close(4001, "bye")
                    return
                await ws.send(message)
        except ConnectionClosed:
            pass
        if ws.close_code is not None:
            closes.append((ws.close_code, ws.close_reason or ""))

    port = free_port()
    base = proxy[1].replace("http://", "ws://") + f"/proxy/cl-a/{port}"
    async with ws_serve(handler, LOOPBACK, port, subprotocols=[CHAT]):
        headers = {"X-Agent-Token": "cp-secret"}
        async with ws_connect(
            f"{base}/echo?x=1",
            proxy=None,
            subprotocols=[CHAT],
            additional_headers=headers,
        ) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed) as caught:
                await ws.recv()
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4001, "bye")

        with pytest.raises(InvalidStatus) as refused:  # the capsule's own refusal comes back
            async with ws_connect(f"{base}/echo?x=1", proxy=None):
                pass
        assert refused.value.response.status_code == 400

        async with ws_connect(f"{base}/echo?x=1", proxy=None, subprotocols=[CHAT]) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await ws.close(4002, "client done")
        with anyio.fail_after(HANG_S):
            while (4002, "client done") not in closes:  # noqa: ASYNC110 (the state has no event to wait on)
                await anyio.sleep(0.01)


# ---- raw bytes ------------------------------------------------------------------------------


class RawCapsule:
    """A TCP server that records each request line it gets and answers 200 `ok` (or refuses
    a WebSocket upgrade with 400): what the proxy really sent, byte for byte."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.lines.append(head.split(b"\r\n", 1)[0])
            status = b"400 Bad Request" if b"upgrade: websocket" in head.lower() else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\nok")  # fmt: skip
            await writer.drain()
        finally:
            writer.close()


def raw_get(base: str, target: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `target` exactly as given (http.client, no normalising); (status, body)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", target.decode("latin-1"), skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
async def raw_capsule() -> AsyncIterator[tuple[RawCapsule, int]]:
    capsule = RawCapsule()
    server = await asyncio.start_server(capsule.handle, LOOPBACK, 0)
    async with server:
        yield capsule, server.sockets[0].getsockname()[1]


async def test_upstream_gets_the_exact_bytes(
    proxy: tuple[PortProxy, str], raw_capsule: tuple[RawCapsule, int]
) -> None:
    """httpx would re-encode `{`, `}` and `"` and drop dot segments; the proxy sends the
    checked request target as it came, for HTTP and for WebSocket handshakes."""
    capsule, port = raw_capsule
    target = b'/x{y}/%7e/a;b/"q"//?q=%2e%2e/../&r={}'
    status, body = await anyio.to_thread.run_sync(
        raw_get, proxy[1], b"/proxy/cl-a/%d" % port + target
    )
    assert (status, body) == (200, b"ok")
    assert capsule.lines == [b"GET " + target + b" HTTP/1.1"]

    ws_url = proxy[1].replace("http://", "ws://") + f"/proxy/cl-a/{port}/w{{s}}/?a={{b}}"
    with pytest.raises(InvalidStatus):
        async with ws_connect(ws_url, proxy=None):
            pass
    assert capsule.lines[1] == b"GET /w{s}/?a={b} HTTP/1.1"


@pytest.mark.parametrize(
    "rest",
    [
        b"/../../hostagent.v1.HostAgentService/ListCapsules",
        b"/%2e%2e/%2e%2e/hostagent.v1.HostAgentService/ListCapsules",
        b"/%252e%252e/x",
        b"/a\\..\\x",
        b"/..%2f..%2fx",
        b"/a%00b",
    ],
)
async def test_refused_paths_never_reach_the_capsule(
    proxy: tuple[PortProxy, str], raw_capsule: tuple[RawCapsule, int], rest: bytes
) -> None:
    capsule, port = raw_capsule
    status, body = await anyio.to_thread.run_sync(
        raw_get, proxy[1], b"/proxy/cl-a/%d" % port + rest
    )
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert capsule.lines == []
