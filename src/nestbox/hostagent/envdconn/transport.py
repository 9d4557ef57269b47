"""One capsule's two connection pools to its envd, and how to let go of their idle sockets.

The seed's split (`envdclient/dialer.go`): a *unary* transport whose requests have an overall
2-minute bound (health, init, snapshot prepare, filesystem RPCs, buffered file reads/writes)
and a *streaming* transport without one (process streams, PTYs, streamed file transfers).
Every capsule gets its own pair, so one capsule's traffic never queues behind another's.
Both wait at most 30 s for a response head (the seed's header timeout), except a process Start:
`START_HEADER_TIMEOUT_S`.

`close_idle()` must put FINs on the wire for every idle connection *before* the agent calls
`/snapshot/prepare`: a socket left open across a snapshot is a zombie after restore (new netns,
new TAP). pyqwest cannot close only idle connections, but closing a transport does exactly
that: idle sockets are shut at once, requests in flight keep their connection to the end (checked
by `tests/integration/test_envdconn.py`). So `close_idle()` retires the current pair and makes a
fresh one; streams that were running finish on the retired pair.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport, HTTPVersion, Proxy

from nestbox.hostagent.envdconn.errors import Unavailable, from_connect
from nestbox.protocol.envd import ACCESS_TOKEN_HEADER
from nestbox.protocol.gen.filesystem.filesystem_connect import FilesystemClient
from nestbox.protocol.gen.process.process_connect import ProcessClient

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping

    from pyqwest import Request, Response

UNARY_TIMEOUT_S = 120.0
"""Overall bound of one unary request (the seed's 2 minutes); callers may set tighter ones."""
START_HEADER_TIMEOUT_S = 120.0
"""The response-head bound of a process Start (exec, background, PTY), instead of the seed's
30 s: envd answers a Start once its process is spawned, and the spawns of one capsule share its
one vCPU with the programs they start. Under TCG, 50 Starts of `sh -c 'yes | head'` at once got
their last head after 10-18 s (32 KiB each; envd's own part of the guest's CPU meanwhile 24%,
the started programs' start-up took the rest) and up to 27 s (2-10 MiB each, also through the
whole stack) at host load 4-6: on a busier host the last heads pass 30 s while envd works
normally. Every other call keeps 30 s, so a silent envd is noticed as soon."""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Per-transport pool figures; the defaults are the seed's."""

    max_idle_per_host: int = 10
    idle_timeout_s: float = 90.0
    connect_timeout_s: float = 10.0
    tcp_keepalive_s: float = 30.0
    response_header_timeout_s: float = 30.0
    start_header_timeout_s: float = START_HEADER_TIMEOUT_S
    unary_timeout_s: float = UNARY_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class ConnStatistics:
    generation: int
    """How many times the pools were made: 1, plus one per `close_idle()`."""
    closed: bool


class _HeaderTimeout:
    """A pyqwest transport that bounds the wait for the response *head* only (Go's
    `ResponseHeaderTimeout`): `execute` returns once headers arrive, the body streams after."""

    def __init__(self, inner: HTTPTransport, timeout_s: float) -> None:
        self._inner = inner
        self._timeout_s = timeout_s

    async def execute(self, request: Request) -> Response:
        with anyio.fail_after(self._timeout_s):
            return await self._inner.execute(request)


def _transport(pool: PoolSettings, *, overall_timeout_s: float | None) -> HTTPTransport:
    return HTTPTransport(
        http_version=HTTPVersion.HTTP1,
        timeout=overall_timeout_s,
        connect_timeout=pool.connect_timeout_s,
        pool_idle_timeout=pool.idle_timeout_s,
        pool_max_idle_per_host=pool.max_idle_per_host,
        tcp_keepalive_interval=pool.tcp_keepalive_s,
        follow_redirects=False,
        enable_otel=False,
        # envd is only ever reached directly, whatever HTTP_PROXY says: every address and
        # `localhost` are exempt (pyqwest ignores a bare '*'). Should that ever fail, the
        # "proxy" is the discard port on loopback, so nothing leaves the host.
        proxy=Proxy("http://127.0.0.1:9", no_proxy="0.0.0.0/0,::/0,localhost"),
    )


class _Pools:
    """One generation of the two transports, their clients and Connect stubs."""

    def __init__(self, base_url: str, pool: PoolSettings) -> None:
        self.unary_transport = _transport(pool, overall_timeout_s=pool.unary_timeout_s)
        self.stream_transport = _transport(pool, overall_timeout_s=None)
        header_timeout = pool.response_header_timeout_s
        self.unary = Client(_HeaderTimeout(self.unary_transport, header_timeout))
        self.stream = Client(_HeaderTimeout(self.stream_transport, header_timeout))
        # Streamed uploads: envd answers once the whole body is in, so the head's deadline
        # starts when the last chunk is sent (files.write_file_stream), not at the start.
        self.upload = Client(self.stream_transport)
        self.filesystem = FilesystemClient(base_url, http_client=self.unary)
        # Watches are streams: no overall bound.
        self.filesystem_stream = FilesystemClient(base_url, http_client=self.stream)
        self.process = ProcessClient(base_url, http_client=self.stream)
        # Process Starts: the same pool, a longer wait for the head (START_HEADER_TIMEOUT_S).
        starts = Client(_HeaderTimeout(self.stream_transport, pool.start_header_timeout_s))
        self.process_start = ProcessClient(base_url, http_client=starts)

    async def aclose(self) -> None:
        """Close idle sockets now; requests in flight finish on their connection."""
        await self.unary_transport.aclose()
        await self.stream_transport.aclose()


class EnvdConnection:
    """The base URL, the access token and the current pair of pools of one capsule's envd."""

    def __init__(
        self, base_url: str, *, access_token: str | None = None, pool: PoolSettings | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self._pool = pool or PoolSettings()
        self._pools: _Pools | None = _Pools(self.base_url, self._pool)
        self._generation = 1

    @property
    def pool(self) -> PoolSettings:
        return self._pool

    def pools(self) -> _Pools:
        """The current pools. :raise Unavailable: the connection was closed."""
        if self._pools is None:
            raise Unavailable("the envd client of this capsule is closed")
        return self._pools

    def headers(self, user: str | None = None) -> dict[str, str]:
        """Request headers: the access token, and the guest user as envd's Basic credential."""
        headers: dict[str, str] = {}
        if self.access_token:
            headers[ACCESS_TOKEN_HEADER] = self.access_token
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        return headers

    def url(self, path: str) -> str:
        return self.base_url + path

    async def close_idle(self) -> None:
        """Close every idle connection of both pools now (FINs go out before this returns);
        later calls use fresh pools. Streams in flight run on to their end."""
        old = self.pools()
        self._pools = _Pools(self.base_url, self._pool)
        self._generation += 1
        await old.aclose()

    async def aclose(self) -> None:
        """Close both pools; later calls raise `Unavailable`. Idempotent."""
        pools, self._pools = self._pools, None
        if pools is not None:
            await pools.aclose()

    def statistics(self) -> ConnStatistics:
        return ConnStatistics(generation=self._generation, closed=self._pools is None)


ReqT = TypeVar("ReqT", contravariant=True)
ResT = TypeVar("ResT", covariant=True)
Req = TypeVar("Req")
Res = TypeVar("Res")


class UnaryCall(Protocol[ReqT, ResT]):
    """A generated unary Connect method."""

    def __call__(
        self, request: ReqT, /, *, headers: Mapping[str, str] | None, timeout_ms: int | None
    ) -> Awaitable[ResT]: ...


class OpsBase:
    """What the `CapsuleEnvd` mixins share: the connection and the unary Connect call."""

    _conn: EnvdConnection

    async def _unary(
        self, call: UnaryCall[Req, Res], request: Req, *, user: str | None = None
    ) -> Res:
        """One unary Connect call, bounded by the unary timeout. :raise EnvdCallError:"""
        timeout_ms = int(self._conn.pool.unary_timeout_s * 1000)
        try:
            return await call(request, headers=self._conn.headers(user), timeout_ms=timeout_ms)
        except ConnectError as err:
            raise from_connect(err) from err
