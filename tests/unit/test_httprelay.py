"""`common.httprelay`, the one HTTP relay of both programs' proxies, driven directly: a fake ASGI
client (`receive`/`send`) on one side, an httpx transport standing in for the upstream on the
other. Streaming both ways without buffering (lockstep, and a tracemalloc peak), an upstream that
breaks off or never answers, a client that hangs up during the body or the answer, headers."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from nestbox.common.httprelay import forwardable, new_client, relay_http, request_headers

Message = dict[str, Any]
Answer = Callable[[httpx.Request], Awaitable[httpx.Response]]
CHUNK = 64 * 1024
NEVER = anyio.Event()  # never set: a client that stays connected and silent


class Upstream(httpx.AsyncBaseTransport):
    """The upstream server: hands each request to `answer`."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.answer(request)


class Body(httpx.AsyncByteStream):
    """A streamed answer body; records whether the relay closed it."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.closed = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed.set()


def scope(headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method, "headers": headers, "path": "/x", "raw_path": b"/x"}


class Client:
    """The downstream side: `receive` gives `body` (then waits on `gone`, and reports a
    disconnect once it is set); `send` keeps the answer's start and hashes its body."""

    def __init__(self, body: AsyncIterator[bytes] | None = None) -> None:
        self.body = body
        self.gone = anyio.Event()
        self.start: Message | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self.ended = False
        self.chunks = 0
        self.on_chunk: Callable[[int], None] = lambda n: None

    async def receive(self) -> Message:
        if self.body is not None:
            try:
                chunk = await self.body.__anext__()
            except StopAsyncIteration:
                self.body = None
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        chunk = message["body"]
        if chunk:
            self.size += len(chunk)
            self.digest.update(chunk)
            self.chunks += 1
            self.on_chunk(self.chunks)
        if not message["more_body"]:
            self.ended = True


async def relay(
    client: Client, serve: Answer, headers: list[tuple[bytes, bytes]] | None = None, **kw: Any
) -> Upstream:
    upstream = Upstream(serve)
    async with new_client(transport=upstream) as http:
        with anyio.fail_after(30):
            await relay_http(
                scope(headers if headers is not None else [(b"transfer-encoding", b"chunked")]),
                client.receive, client.send, http, url="http://upstream/",
                target=b"/raw/%2e?q={}", headers=[("x-hop", "kept")], **kw,
            )  # fmt: skip
    return upstream


async def blocks(count: int, size: int = CHUNK) -> AsyncIterator[bytes]:
    for i in range(count):
        yield bytes([i % 251]) * size


def digest_of(count: int, size: int = CHUNK) -> str:
    h = hashlib.sha256()
    for i in range(count):
        h.update(bytes([i % 251]) * size)
    return h.hexdigest()


async def test_streams_both_ways_one_chunk_at_a_time() -> None:
    """Lockstep: the client hands over request chunk n+1 only once the upstream has read chunk
    n, and the upstream makes answer chunk n+1 only once the client has got chunk n. A relay
    that buffered either way would wait forever (fail_after)."""
    n = 6
    read = [anyio.Event() for _ in range(n)]
    got = [anyio.Event() for _ in range(n)]

    async def request_body() -> AsyncIterator[bytes]:
        for i in range(n):
            if i:
                await read[i - 1].wait()
            yield b"up%d" % i

    async def answer(request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        i = 0
        async for chunk in request.stream:
            assert chunk == b"up%d" % i
            read[i].set()
            i += 1
        assert i == n

        async def down() -> AsyncIterator[bytes]:
            for j in range(n):
                if j:
                    await got[j - 1].wait()
                yield b"down%d" % j

        return httpx.Response(200, stream=Body(down()))

    client = Client(request_body())
    client.on_chunk = lambda count: got[count - 1].set()
    await relay(client, answer)
    assert client.start is not None
    assert client.start["status"] == 200
    assert (client.chunks, client.ended) == (n, True)


async def test_large_bodies_take_constant_memory() -> None:
    """32 MiB up and 32 MiB down through the relay; tracemalloc's peak stays under 2 MiB."""
    count = 512  # of 64 KiB
    seen: dict[str, Any] = {}

    async def answer(request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        h, size = hashlib.sha256(), 0
        async for chunk in request.stream:
            h.update(chunk)
            size += len(chunk)
        seen.update(size=size, sha=h.hexdigest())
        return httpx.Response(200, stream=Body(blocks(count)))

    client = Client(blocks(count))
    tracemalloc.start()
    try:
        await relay(client, answer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == {"size": count * CHUNK, "sha": digest_of(count)}
    assert (client.size, client.digest.hexdigest()) == (count * CHUNK, digest_of(count))
    assert peak < 2 * 1024 * 1024, peak


async def test_an_upstream_that_breaks_off_breaks_the_answer_off_and_is_closed() -> None:
    body: list[Body] = []

    async def broken() -> AsyncIterator[bytes]:
        yield b"half"
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    async def answer(request: httpx.Request) -> httpx.Response:
        body.append(Body(broken()))
        return httpx.Response(200, headers={"content-type": "text/plain"}, stream=body[0])

    client = Client()
    await relay(client, answer, headers=[])
    assert (client.size, client.ended) == (4, False)  # never a cut answer that looks whole
    assert body[0].closed.is_set()


async def test_no_answer_raises_before_anything_is_sent() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = Client()
    with pytest.raises(httpx.ConnectError):
        await relay(client, answer, headers=[])
    assert client.start is None


async def test_a_client_gone_during_the_answer_stops_reading_the_upstream() -> None:
    body: list[Body] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1024
            await anyio.lowlevel.checkpoint()

    async def answer(request: httpx.Request) -> httpx.Response:
        body.append(Body(endless()))
        return httpx.Response(200, stream=body[0])

    client = Client()

    def hang_up(count: int) -> None:
        if count == 3:
            client.gone.set()

    client.on_chunk = hang_up
    await relay(client, answer, headers=[])  # returns (fail_after guards it)
    assert client.chunks >= 3
    assert body[0].closed.is_set()


async def test_a_client_gone_during_the_request_body_ends_the_request_unanswered() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for _ in request.stream:
            pass
        raise AssertionError("the body was passed off as complete")

    async def half() -> AsyncIterator[bytes]:
        yield b"first"
        client.body = None  # then a disconnect
        client.gone.set()
        yield b"never"

    client = Client(half())
    await relay(client, answer)
    assert client.start is None


async def test_headers_both_ways() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await request.aread()
        headers = [("Connection", "close, X-Up-Private"), ("X-Up-Private", "1"),
                   ("Keep-Alive", "5"), ("Location", "/there"), ("X-Secret", "s"),
                   ("Content-Type", "text/plain")]  # fmt: skip
        return httpx.Response(200, headers=headers, stream=Body(blocks(0)))

    sent = [(b"host", b"public"), (b"connection", b"x-private"), (b"x-private", b"1"),
            (b"expect", b"100-continue"), (b"x-agent-token", b"forged"),
            (b"x-nestbox-proxy-token", b"forged"), (b"content-length", b"0"),
            (b"x-user", b"u")]  # fmt: skip
    headers = request_headers(scope(sent))
    assert headers == [("content-length", "0"), ("x-user", "u")]
    assert request_headers(scope(sent), {"x-user"}) == [("content-length", "0")]

    client = Client(blocks(0))
    rewrite = {"location": "/prefix/there", "x-secret": None}
    upstream = await relay(client, answer, headers=sent, answer=lambda k, v: rewrite.get(k, v))
    request = upstream.requests[0]
    # exactly the caller's headers, Host from the URL and the streamed body's framing: none of
    # httpx's defaults (User-Agent, Accept, Accept-Encoding)
    assert list(request.headers.items()) == [
        ("host", "upstream"),
        ("x-hop", "kept"),
        ("transfer-encoding", "chunked"),
    ]
    assert request.extensions["target"] == b"/raw/%2e?q={}"
    assert client.start is not None
    assert client.start["headers"] == [(b"location", b"/prefix/there"),
                                       (b"content-type", b"text/plain")]  # fmt: skip


def test_forwardable_drops_hop_by_hop_and_connection_named_headers() -> None:
    headers = [
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Type", "text/plain"),
    ]
    assert forwardable(headers) == [("content-type", "text/plain")]
    assert forwardable(headers, {"content-type"}) == []
