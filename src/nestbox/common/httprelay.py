"""The HTTP relay of every proxy of both programs: the control plane's public port proxy and its
E2B envd gateway, the agent's port proxy and its `/envd/` gateway. An ASGI `http` scope (the
client) on one side, an httpx client (upstream: an agent, a capsule's port, envd) on the other.
What each proxy decides (which requests, whose credentials, where to) stays with it; how bytes
and headers pass is here, once (the WebSocket twin is `common/wsrelay.py`).

Host side only: it imports `httpx`, which the guest image does not have. envd never imports
this module (an import-linter contract and `tests/unit/test_wsrelay.py` check it).

Request. The request line is exactly the `target` bytes the caller checked (httpcore's "target"
extension: httpx would normalise a path in the URL, whose only job is where to connect). The
body, when the client announced one (`Content-Length` or `Transfer-Encoding`), is streamed as
it arrives, one ASGI message at a time; a client that hangs up meanwhile ends the upstream
request and nothing is answered. No header is added but what the caller passes (no
`User-Agent`, `Accept` or `Accept-Encoding` of httpx's own).

Headers. `request_headers` gives the client's without the hop-by-hop ones (and those its
`Connection` names), `Host`, `Expect` and the control plane's credentials at the agents
(`X-Agent-Token`, `X-Nestbox-Proxy-Token`), whatever the client sent, plus what the caller
drops; the caller then adds its own credential. The answer's headers lose the same hop-by-hop
ones; `answer` may rewrite (`Location`) or drop any other.

Answer. Status and headers as the upstream gave them, then its body chunks as they come
(`aiter_raw`: undecoded), each sent before the next is read: nothing is buffered beyond one
chunk, so a server stream flows and any size takes constant memory (the ASGI server's `send`
waits while the client's socket is full). An upstream that breaks its answer off breaks ours
off too: no last chunk, and the ASGI server closes the connection (uvicorn logs it), so a client
never takes a cut answer (a half-read file) for a whole one. Once the request body is in, a
client disconnect cancels the relay and closes the upstream response (uvicorn would otherwise
swallow our sends while we read an endless stream).

Errors. When no answer came (connect refused after the client's own retries, the upstream
closed or reset before its status line) `relay_http` raises the `httpx.HTTPError` before
anything was sent to the client: each proxy answers it in its own shape and status.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import anyio
import httpx

from nestbox.protocol.hosts import AGENT_TOKEN_HEADER, PROXY_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence

    from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "expect", "host",
})  # fmt: skip
"""About one connection (or, `Host` and `Expect`, one hop): never passed either way."""
CREDENTIAL_HEADERS: Final = frozenset({AGENT_TOKEN_HEADER.lower(), PROXY_TOKEN_HEADER.lower()})
"""The control plane's credentials at an agent: never passed on from a client."""


def forwardable(
    headers: Iterable[tuple[str, str]], drop: Collection[str] = ()
) -> list[tuple[str, str]]:
    """`headers` with lower-case names, without the hop-by-hop ones, those the `Connection`
    header names, and `drop` (lower case)."""
    items = [(k.lower(), v) for k, v in headers]
    named = {t.strip().lower() for k, v in items if k == "connection" for t in v.split(",")}
    return [(k, v) for k, v in items if k not in HOP_BY_HOP and k not in named and k not in drop]


def request_headers(scope: Scope, drop: Collection[str] = ()) -> list[tuple[str, str]]:
    """The client's headers as they may go upstream: `forwardable`, and never our credentials.
    The caller adds its own credential after."""
    raw: Iterable[tuple[bytes, bytes]] = scope.get("headers") or []
    decoded = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]
    return forwardable(decoded, CREDENTIAL_HEADERS.union(drop))


class DialRetry(httpx.AsyncBaseTransport):
    """Retries a request whose connection could not be made (nothing was sent yet): the agent's
    capsule ports, whose socat forwarder starts up to a second after the guest program listens.
    Sleeps `backoff_s * attempt` after each failed connect but the last."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        attempts: int,
        backoff_s: float,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._inner, self._attempts, self._backoff_s, self._sleep = (
            inner,
            attempts,
            backoff_s,
            sleep,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self._attempts):
            try:
                return await self._inner.handle_async_request(request)
            except httpx.ConnectError:
                await self._sleep(self._backoff_s * attempt)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def new_client(
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    max_connections: int | None = None,
    max_idle: int = 100,
    idle_s: float = 120.0,
    connect_s: float = 30.0,
    pool_s: float | None = None,
    dial_attempts: int = 1,
    dial_backoff_s: float = 0.1,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> httpx.AsyncClient:
    """A relay's upstream pool: HTTP/1.1 only, no proxy or certificates from the environment,
    no redirects followed, no read timeout (streams may idle), connects retried
    `dial_attempts` times. `transport` (tests) replaces the network."""
    inner = transport or httpx.AsyncHTTPTransport(
        http1=True, http2=False, verify=False, trust_env=False, retries=0,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_idle,
                            keepalive_expiry=idle_s),
    )  # fmt: skip
    if dial_attempts > 1:
        inner = DialRetry(inner, attempts=dial_attempts, backoff_s=dial_backoff_s, sleep=sleep)
    return httpx.AsyncClient(
        transport=inner, trust_env=False, follow_redirects=False,
        timeout=httpx.Timeout(None, connect=connect_s, pool=pool_s),
    )  # fmt: skip


class LazyClient:
    """A relay's one upstream pool, made by `make` on first use (so inside the server's event
    loop) and closed by `aclose` (a later use makes a new one)."""

    def __init__(self, make: Callable[[], httpx.AsyncClient]) -> None:
        self._make = make
        self._client: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self._make()
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def relay_http(
    scope: Scope,
    receive: Receive,
    send: Send,
    client: httpx.AsyncClient,
    *,
    url: str,
    target: bytes,
    headers: Sequence[tuple[str, str]],
    answer: Callable[[str, str], str | None] | None = None,
    name: str = "",
) -> None:
    """Relay one request to `url` (where to connect; the request line is `target`) with exactly
    `headers` (`request_headers` and the caller's credential), and its answer back (headers
    through `answer(name, value)`: the value to send, or None to drop it). `name` says which
    upstream in log lines.

    :raise httpx.HTTPError: the upstream gave no answer; nothing was sent to the client.
    :raise httpx.InvalidURL: `url` is not one.
    """
    body = _RequestBody(receive, scope)
    request = httpx.Request(
        str(scope["method"]), url, headers=list(headers),
        content=body.stream() if body.present else None, extensions={"target": target},
    )  # fmt: skip
    try:
        response = await client.send(request, stream=True)
    except _ClientGone:
        return
    try:
        out = []
        for key, value in forwardable(response.headers.multi_items()):
            kept = answer(key, value) if answer is not None else value
            if kept is not None:
                out.append((key.encode("latin-1"), kept.encode("latin-1")))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        async with anyio.create_task_group() as tg:
            if body.complete:  # else the body stream is still the one reading `receive`
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as err:  # the upstream broke its answer off: so does ours
                log.warning("the answer of %s broke off: %r", name or url, err)
                tg.cancel_scope.cancel()
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tg.cancel_scope.cancel()
    finally:
        await response.aclose()


class _ClientGone(Exception):
    """The client hung up while we read its request body."""


class _RequestBody:
    """The client's request body as an async iterator; remembers whether it was all read."""

    def __init__(self, receive: Receive, scope: Scope) -> None:
        self._receive = receive
        names = {bytes(k).lower() for k, _ in scope.get("headers") or []}
        self.present = b"content-length" in names or b"transfer-encoding" in names
        self.complete = not self.present

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.complete = True
                return


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
