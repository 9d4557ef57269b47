"""The agent's port proxy: an ASGI app serving `/proxy/{capsule_id}/{port}/...` from
`http://<capsule address>:{port}/...` (the seed's `internal/hostagent/proxy.go`).

- Own HTTP/1.1 pools, one per capsule+port+address (at most 20 idle connections each, idle
  120 s), never shared with envd traffic; cached until the capsule is destroyed (`evict`), its
  address changes, or `max_cached_targets` newer ones push it out (least recently used first;
  a pool pushed out while requests use it is closed after the last). Bodies stream both ways,
  bytes untouched (no decompression), through `common.httprelay` (the one HTTP relay of both
  programs' proxies; hop-by-hop headers dropped, constant memory, a client that hangs up ends
  the upstream request).
- Connecting retries 3 times, 100 ms then 200 ms apart: envd's socat forwarder for a port
  starts up to a second after the guest program listens while envd is in use. An idle envd
  does not look for new listeners at all (`envd/ports.py`), so after a refused dial the proxy
  first asks the capsule's envd to scan (`rescan`: `POST /ports/scan`, which answers once the
  new forwarders listen), then backs off and dials again. At most one rescan per capsule runs
  at a time and one starts per `RESCAN_EVERY_S`: refused dials meanwhile share the one in
  flight or only back off, so a client hammering a closed port cannot make envd scan for each.
- The upstream path is the raw request path after the prefix, concatenated, never joined, so a
  trailing slash survives (`/proxy/x/8000/dir/` -> `/dir/`; `/proxy/x/8000` -> `/`). It is
  checked first (`common.proxypath`: no dot segments, backslashes, encoded slashes or control
  bytes, raw or percent-encoded; 400) and then sent as exactly those bytes (the request
  target is set as such, so httpx never normalises it). Port 49983 (envd) is refused (403):
  envd is reached by the agent's own client only.
- `Location` answers are rewritten back under the prefix; WebSockets are relayed
  (`common.wsrelay`, the relay the control plane uses too; connects retried as above).
- Errors are `ErrorBody` JSON: 404 unknown capsule, 503 draining or not running, 502 when
  nothing listens on the port. The control plane's tokens (`X-Nestbox-Proxy-Token`, and
  `X-Agent-Token` should one come) never reach a capsule. Every refusal of a path or port is
  logged (one rate-limited WARNING with the capsule id and the reason).

Mount it by dispatching every path under `/proxy/` to it unchanged (it reads `raw_path`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx

from nestbox.common.httprelay import new_client, relay_http, request_headers
from nestbox.common.proxypath import RefusalLog, refusal
from nestbox.common.wsrelay import RelayLimits, reject_websocket, relay_websocket
from nestbox.hostagent.proxytrack import TargetNotFound, TargetUnavailable
from nestbox.protocol.errors import ErrorBody, ErrorCode

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.types import Receive, Scope, Send

    from nestbox.hostagent.proxytrack import CapsuleTargets, Lease

log = logging.getLogger(__name__)

_ROUTE = re.compile(
    rb"/proxy/(?P<id>[A-Za-z0-9][A-Za-z0-9_-]{0,63})/(?P<port>[0-9]{1,5})(?P<rest>/.*)?",
    re.DOTALL,
)
"""Matched whole (`fullmatch`): no trailing-newline tricks."""


RESCAN_BOUND_S = 5.0
"""How long a refused dial waits for the capsule's envd to rescan its ports (envd itself waits
up to 3 s for a new forwarder to listen)."""

RESCAN_EVERY_S = 1.0
"""A capsule's next rescan starts at least this long after its last one ended (a scan counts
as activity in envd, which then polls every second by itself for a minute)."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    max_idle_per_target: int = 20
    max_connections_per_target: int = 100
    idle_timeout_s: float = 120.0
    connect_timeout_s: float = 30.0
    dial_attempts: int = 3
    dial_backoff_s: float = 0.1
    """Sleep `backoff * attempt` after each failed connect but the last: 100 ms, 200 ms."""
    ws_max_message: int = 16 * 1024 * 1024
    max_cached_targets: int = 256
    """Pools kept (one per capsule+port+address); the least recently used go first."""


@dataclass(frozen=True, slots=True)
class Route:
    capsule_id: str
    port: int
    rest: str
    """The upstream path: what follows `/proxy/{id}/{port}`, or `/`."""
    query: str

    @property
    def prefix(self) -> str:
        return f"/proxy/{self.capsule_id}/{self.port}"


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    cached_targets: int


class ProxyError(Exception):
    """An answer the proxy gives itself instead of the capsule's. `refused_path`: the raw path
    of a request refused for what it names (logged)."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        capsule_id: str = "",
        refused_path: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.capsule_id, self.refused_path = capsule_id, refused_path


def parse_route(raw_path: bytes, query: bytes) -> Route:
    """:raise ProxyError: not a `/proxy/{id}/{port}[/...]` path (404); a port out of range, a
    path or query `common.proxypath` refuses (400); envd's port (403)."""
    match = _ROUTE.fullmatch(raw_path)
    if match is None:
        raise ProxyError(404, ErrorCode.NOT_FOUND, "not a /proxy/{capsule_id}/{port}/ path")
    capsule_id, port, rest = match["id"].decode(), int(match["port"]), match["rest"] or b"/"
    refused = refusal(port, rest, query)
    if refused is not None:
        raise ProxyError(refused.status, refused.code, refused.reason, capsule_id=capsule_id,
                         refused_path=raw_path)  # fmt: skip
    return Route(capsule_id, port, rest.decode("ascii"), query.decode("ascii"))


def upstream_target(route: Route) -> bytes:
    """The request target sent to the capsule: the checked raw path and query, byte for byte."""
    return (route.rest + (f"?{route.query}" if route.query else "")).encode("ascii")


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def rewrite_location(location: str, route: Route, target: str) -> str:
    """Put a redirect back under `/proxy/{id}/{port}`: root-relative paths, and absolute URLs
    that point at the capsule's internal address; anything else is left alone."""
    if location.startswith("/") and not location.startswith("//"):
        return route.prefix + location
    parts = urlsplit(location)
    if parts.netloc == target or (parts.scheme and parts.netloc + ":80" == target):
        path = parts.path or "/"
        return route.prefix + urlunsplit(("", "", path, parts.query, ""))
    return location


@dataclass(eq=False, slots=True)
class _Pool:
    """One cached target's client and the requests using it now."""

    client: httpx.AsyncClient
    users: int = 0
    retired: bool = False
    """Pushed out of the cache: closed when the last user is done."""


@dataclass(slots=True)
class _Rescan:
    ended: anyio.Event = field(default_factory=anyio.Event)
    ended_at: float = 0.0
    """Set just before `ended`."""


class PortProxy:
    """The ASGI app. `targets` finds capsules; `transport` (tests) replaces the network."""

    def __init__(
        self,
        targets: CapsuleTargets,
        settings: ProxySettings | None = None,
        *,
        transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rescan: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._targets = targets
        self._rescan = rescan
        """Ask a capsule's envd to look for new loopback listeners now (see the module)."""
        self._rescans: dict[str, _Rescan] = {}
        """Each capsule's latest rescan (running or ended); dropped by `evict`."""
        self._clock = clock
        self._settings = settings or ProxySettings()
        self._transport = transport
        self._sleep = sleep
        # "{capsule_id}/{port}/{address}" -> that target's pool, least recently used first.
        # The address is in the key so that a capsule that comes back elsewhere misses;
        # `evict` drops a capsule's keys.
        self._clients: OrderedDict[str, _Pool] = OrderedDict()
        self._refusals = RefusalLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send, self.aclose)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        try:
            route = parse_route(raw_path, query)
            lease = self._acquire(route.capsule_id)
        except ProxyError as err:
            if err.refused_path is not None:
                self._refusals.refused(err.capsule_id, err.message, err.refused_path)
            await refuse(scope, send, err.status, err.code, err.message)
            return
        try:
            if kind == "websocket":
                await self._websocket(scope, receive, send, route, lease.address)
            else:
                await self._http(scope, receive, send, route, lease.address)
        finally:
            lease.release()

    async def evict(self, capsule_id: str) -> None:
        """Forget (and close) every cached target of a capsule: call it when the capsule is
        destroyed or moves. Requests still streaming through them are cut."""
        self._rescans.pop(capsule_id, None)
        await self._drop(lambda key: key.startswith(f"{capsule_id}/"), cut=True)

    async def aclose(self) -> None:
        await self._drop(lambda key: True, cut=True)

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(cached_targets=len(self._clients))

    def _acquire(self, capsule_id: str) -> Lease:
        try:
            return self._targets.acquire(capsule_id)
        except TargetNotFound:
            raise ProxyError(404, ErrorCode.NOT_FOUND, f"capsule {capsule_id} not found") from None
        except TargetUnavailable as err:
            message = f"capsule {capsule_id} is not available: {err}"
            raise ProxyError(503, ErrorCode.UNAVAILABLE, message) from None

    async def _pool(self, route: Route, address: str) -> _Pool:
        """The target's pool, counted as used (`_done` when finished with it)."""
        key = f"{route.capsule_id}/{route.port}/{address}"
        pool = self._clients.get(key)
        if pool is not None:
            self._clients.move_to_end(key)
            pool.users += 1
            return pool
        pool = self._clients[key] = _Pool(self._new_client(route.capsule_id), users=1)  # no await
        stale = f"{route.capsule_id}/{route.port}/"
        gone = {k for k in self._clients if k.startswith(stale) and k != key}
        oldest = (k for k in self._clients if k not in gone and k != key)
        excess = len(self._clients) - len(gone) - self._settings.max_cached_targets
        gone.update(next(oldest) for _ in range(max(0, excess)))
        with anyio.CancelScope(shield=True):  # the new pool is counted: never leave it so
            await self._drop(gone.__contains__, cut=False)
        return pool

    async def _done(self, pool: _Pool) -> None:
        pool.users -= 1
        if pool.retired and pool.users == 0:
            with anyio.CancelScope(shield=True):
                await pool.client.aclose()

    def _new_client(self, capsule_id: str) -> httpx.AsyncClient:
        s = self._settings
        return new_client(
            transport=self._transport() if self._transport else None,
            max_connections=s.max_connections_per_target, max_idle=s.max_idle_per_target,
            idle_s=s.idle_timeout_s, connect_s=s.connect_timeout_s, pool_s=s.connect_timeout_s,
            dial_attempts=s.dial_attempts, dial_backoff_s=s.dial_backoff_s,
            sleep=self._after_refused_dial(capsule_id),
        )  # fmt: skip

    def _after_refused_dial(self, capsule_id: str) -> Callable[[float], Awaitable[None]]:
        """The wait between two dials into `capsule_id`: a rescan by its envd (bounded; a
        failure only logged: the next dial answers for it), then the backoff."""
        sleep = self._sleep
        if self._rescan is None:
            return sleep

        async def wait(delay: float) -> None:
            await self._rescan_once(capsule_id)
            await sleep(delay)

        return wait

    async def _rescan_once(self, capsule_id: str) -> None:
        """Have the capsule's envd rescan, unless a rescan of it is running (then wait for that
        one) or ended less than `RESCAN_EVERY_S` ago (then nothing). Bounded by
        `RESCAN_BOUND_S`; a failure is only logged."""
        assert self._rescan is not None
        last = self._rescans.get(capsule_id)
        if last is not None:
            if not last.ended.is_set():
                with anyio.move_on_after(RESCAN_BOUND_S):
                    await last.ended.wait()
                return
            if self._clock() - last.ended_at < RESCAN_EVERY_S:
                return
        mine = self._rescans[capsule_id] = _Rescan()
        try:
            with anyio.move_on_after(RESCAN_BOUND_S):
                try:
                    await self._rescan(capsule_id)
                except Exception as err:  # any failure: dial again as before
                    log.debug("port rescan failed: %r", err, extra={"capsule_id": capsule_id})
        finally:
            mine.ended_at = self._clock()
            mine.ended.set()

    async def _drop(self, matches: Callable[[str], bool], *, cut: bool) -> None:
        """Forget the matching pools and close them: at once with `cut`, else each after the
        requests using it are done."""
        gone = [self._clients.pop(k) for k in [k for k in self._clients if matches(k)]]
        for pool in gone:
            pool.retired = True
            if cut or pool.users == 0:
                await pool.client.aclose()

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, route: Route, address: str
    ) -> None:
        target = host_port(address, route.port)
        # The URL says where to connect (and is what a test's mock transport sees); the request
        # line is `upstream_target`, the checked bytes as they came.
        url = f"http://{target}{route.rest}" + (f"?{route.query}" if route.query else "")
        pool = await self._pool(route, address)
        try:
            await relay_http(
                scope, receive, send, pool.client, url=url, target=upstream_target(route),
                headers=_upstream_headers(scope),
                answer=lambda k, v: rewrite_location(v, route, target) if k == "location" else v,
                name=target,
            )  # fmt: skip
        except httpx.InvalidURL as err:
            await answer_error(send, 400, ErrorCode.INVALID_REQUEST, f"bad path: {err}")
        except httpx.ConnectError:
            message = f"proxy error: nothing listens on port {route.port} in capsule "
            await answer_error(send, 502, ErrorCode.UNAVAILABLE, message + route.capsule_id)
        except httpx.HTTPError as err:
            log.info("proxy to %s failed: %s", target, err, extra={"capsule_id": route.capsule_id})
            message = f"proxy error: {type(err).__name__}"
            await answer_error(send, 502, ErrorCode.UNAVAILABLE, message)
        finally:
            await self._done(pool)

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, route: Route, address: str
    ) -> None:
        s = self._settings
        limits = RelayLimits(
            max_message=s.ws_max_message,
            open_timeout_s=s.connect_timeout_s,
            dial_attempts=s.dial_attempts,
            dial_backoff_s=s.dial_backoff_s,
        )
        await relay_websocket(
            scope, receive, send, address=host_port(address, route.port),
            target=upstream_target(route), headers=_upstream_headers(scope),
            limits=limits, unreachable=f"proxy error: nothing listens on port {route.port} in "
            f"capsule {route.capsule_id}", sleep=self._after_refused_dial(route.capsule_id),
        )  # fmt: skip


# ---- request and response plumbing ----------------------------------------------------------


def _upstream_headers(scope: Scope) -> list[tuple[str, str]]:
    """The request's headers as sent on to the capsule (`common.httprelay.request_headers`: never
    our credentials), with the client's address appended to `X-Forwarded-For` (a WebSocket
    relay also leaves out the handshake's own)."""
    headers = request_headers(scope)
    client = scope.get("client")
    if isinstance(client, (list, tuple)) and client:
        forwarded = [v for k, v in headers if k == "x-forwarded-for"]
        headers = [(k, v) for k, v in headers if k != "x-forwarded-for"]
        headers.append(("x-forwarded-for", ", ".join([*forwarded, str(client[0])])))
    return headers


async def send_json(send: Send, status: int, body: bytes) -> None:
    """A whole JSON answer."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def answer_error(send: Send, status: int, code: ErrorCode, message: str) -> None:
    """An `ErrorBody` answer to an HTTP request."""
    await send_json(send, status, ErrorBody.of(code, message).model_dump_json().encode())


async def refuse(scope: Scope, send: Send, status: int, code: ErrorCode, message: str) -> None:
    """Turn the request away with an `ErrorBody`: an HTTP answer, or a WebSocket handshake
    rejection."""
    if scope["type"] == "websocket":
        await reject_websocket(scope, send, status, code, message)
    else:
        await answer_error(send, status, code, message)


async def _lifespan(receive: Receive, send: Send, shutdown: Callable[[], Awaitable[None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
