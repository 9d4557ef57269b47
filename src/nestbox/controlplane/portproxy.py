"""The public port proxy: a capsule's TCP port on the web, in two forms,

    http://{port}-{capsule_id}.{proxy_domain}/path    (the SDK's `get_url(port)`)
    http://{control plane}/proxy/{capsule_id}/{port}/path

both forwarded to the owning agent's `/proxy/{capsule_id}/{port}/path` (Wrenn's
`handler_sandbox_proxy.go`; the seed's checklist (b)):

- No credentials (as upstream): the capsule id is the capability to the capsule's ports, and
  to nothing else. The caller's `X-API-Key` is never forwarded (a capsule runs untrusted
  code); `Authorization` is, for the capsule's app. The control plane has no cookies of its own.
- The agent is called with the host's proxy token (`X-Nestbox-Proxy-Token`), which the agent
  accepts for `/proxy/` only, never for an RPC. A request that brings that header or
  `X-Agent-Token` from outside is refused (400), never forwarded.
- What the request names is checked before anything else (`common.proxypath`, on the raw
  path): capsule ids are matched whole in their one format; a dot segment, backslash, encoded
  slash or control byte, raw or percent-encoded, is 400 `invalid_request`; port 49983 (envd)
  is 403 `forbidden`. Each refusal is logged once (WARNING, rate-limited, id and reason).
- A dedicated HTTP/1.1 pool (httpx, 100 idle connections, 120 s idle), never the RPC
  pools of `agent_client.py`; no proxy from the environment; bodies stream both ways as is
  through `common.httprelay` (the HTTP relay the agent's proxies and the envd gateway use too:
  hop-by-hop headers dropped, constant memory, a client that hangs up ends the upstream
  request).
- The upstream path is built by concatenation, never joined, so a trailing slash survives
  (python's http.server and Jupyter redirect-loop otherwise), and sent as exactly the checked
  bytes: the request line is set through httpcore's "target" extension, since httpx would
  normalise a path in the URL.
- The agent puts `Location` answers under `/proxy/{id}/{port}`; for the subdomain form that
  prefix is stripped back out.
- Targets (capsule -> agent address and proxy token) are cached 120 s and evicted when the
  agent cannot be reached (502). 404 unknown capsule, 409 not running, 503 no agent address
  (or a host registered before proxy tokens: it must register again).
- WebSockets pass through (`common.wsrelay`, the relay the agent uses too).
- E2B's envd calls (they carry `E2b-Sandbox-Id`, whatever the host) never get here: the
  envd gateway (`e2b/gateway.py`, outside this middleware) authenticates and serves them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httpx

from nestbox.common.httprelay import (
    CREDENTIAL_HEADERS,
    LazyClient,
    new_client,
    relay_http,
    request_headers,
)
from nestbox.common.proxypath import Refusal, RefusalLog, refusal
from nestbox.common.wsrelay import reject_websocket, relay_websocket
from nestbox.controlplane.api.errors import error_response
from nestbox.controlplane.db.capsules import DESTROYED
from nestbox.controlplane.errors import HostUnavailable
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.hosts import PROXY_TOKEN_HEADER
from nestbox.protocol.ids import BASE36, ID_LENGTH, IdPrefix

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from nestbox.controlplane.services.container import Services

log = logging.getLogger(__name__)

_ID = f"{IdPrefix.CAPSULE}-[{BASE36}]{{{ID_LENGTH}}}"
HOST_FORM = re.compile(rf"(?P<port>[0-9]{{1,5}})-(?P<id>{_ID})\.")
"""Matched at the start of the Host header (the domain after the dot is not ours to check)."""
PATH_FORM = re.compile(rb"/proxy/(?P<id>[^/]*)/(?P<port>[^/]*)(?P<rest>/.*)?", re.DOTALL)
"""Matched whole (`fullmatch`); the id and port are then checked on their own."""
CAPSULE_ID = re.compile(_ID)
PORT = re.compile(r"[0-9]{1,5}")
CACHE_TTL_S = 120.0
NOT_FORWARDED = frozenset({"x-api-key"})
"""Dropped on the way to the agent besides what `common.httprelay` drops (hop-by-hop, `Host`,
our credentials): the caller's API key (a capsule runs untrusted code); from the answer too."""


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    capsule_id: str
    port: int
    rest: str
    """What follows the prefix: the capsule-side raw path (bytes as latin-1), checked to start
    with `/` before it is used."""
    subdomain: bool

    @property
    def agent_path(self) -> str:
        return f"/proxy/{self.capsule_id}/{self.port}" + self.rest

    def refusal(self, query: bytes) -> Refusal | None:
        """Why this route (with `query`) may not be proxied, or None (`common.proxypath`)."""
        return refusal(self.port, self.rest.encode("latin-1"), query)


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    host_id: str
    address: str
    token: str
    """The host's proxy token (never its agent token)."""
    expires: float


class ProxyError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def match(scope: Scope) -> ProxyRoute | None:
    """The proxy route of a request, or None if it is the API's.
    :raise ProxyError: a `/proxy/` path naming no well-formed capsule id or port (404)."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    raw = raw.split(b"?", 1)[0]
    host = _header(scope, b"host")
    m = HOST_FORM.match(host)
    if m is not None:
        return ProxyRoute(m["id"], int(m["port"]), raw.decode("latin-1"), subdomain=True)
    p = PATH_FORM.fullmatch(raw)
    if p is None:
        return None
    capsule_id, port = p["id"].decode("latin-1"), p["port"].decode("latin-1")
    if CAPSULE_ID.fullmatch(capsule_id) is None or PORT.fullmatch(port) is None:
        raise ProxyError(404, ErrorCode.NOT_FOUND, "not a /proxy/{capsule_id}/{port}/ path of "
                                                   "an existing capsule")  # fmt: skip
    rest = (p["rest"] or b"/").decode("latin-1")
    return ProxyRoute(capsule_id, int(port), rest, subdomain=False)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers") or []:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def strip_location(location: str, route: ProxyRoute) -> str:
    """The agent's `Location`, back in the subdomain form's terms."""
    prefix = f"/proxy/{route.capsule_id}/{route.port}"
    if location == prefix or location.startswith(prefix + "/") or location.startswith(prefix + "?"):
        stripped = location[len(prefix) :]
        return stripped if stripped.startswith("/") else "/" + stripped
    return location


class PortProxy:
    """ASGI middleware: proxy routes go to the capsule's agent, the rest to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cache: dict[str, ProxyTarget] = {}
        self._http = LazyClient(lambda: new_client(max_idle=100, idle_s=120.0, connect_s=30.0))
        self._refusals = RefusalLog(log)

    async def aclose(self) -> None:
        await self._http.aclose()

    def evict(self, capsule_id: str) -> None:
        self._cache.pop(capsule_id, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                await self.aclose()  # the app has shut down
            return
        try:
            route = match(scope) if scope["type"] in ("http", "websocket") else None
        except ProxyError as err:
            await self._refuse(scope, send, err, receive)
            return
        if route is None:
            await self.app(scope, receive, send)
            return
        refused = route.refusal(scope.get("query_string") or b"") or _forged(scope)
        if refused is not None:
            self._refusals.refused(
                route.capsule_id,
                refused.reason,
                route.rest.encode("latin-1"),
                where="subdomain form" if route.subdomain else "path form",
            )
            failed = ProxyError(refused.status, refused.code, refused.reason)
            await self._refuse(scope, send, failed, receive)
            return
        try:
            target = await self._target(scope, route)
        except ProxyError as err:
            await self._refuse(scope, send, err, receive)
            return
        if scope["type"] == "websocket":
            await relay_websocket(
                scope, receive, send, address=target.address,
                target=self._target_bytes(route, scope), headers=self._headers(scope),
                credentials=[(PROXY_TOKEN_HEADER, target.token)], error_code=ErrorCode.AGENT_ERROR,
            )  # fmt: skip
            return
        await self._forward(scope, receive, send, route, target)

    async def _target(self, scope: Scope, route: ProxyRoute) -> ProxyTarget:
        now = time.monotonic()
        cached = self._cache.get(route.capsule_id)
        if cached is not None and cached.expires > now:
            return cached
        services = cast("Services", scope["app"].state.services)
        async with services.db.transaction() as tx:
            capsule = await tx.capsules.get(route.capsule_id)
            if capsule is None or capsule.status == DESTROYED:
                raise ProxyError(404, ErrorCode.NOT_FOUND, f"capsule {route.capsule_id} does "
                                                           "not exist")  # fmt: skip
            if capsule.status != CapsuleStatus.RUNNING:
                raise ProxyError(409, ErrorCode.INVALID_STATE,
                                 f"capsule {route.capsule_id} is {capsule.status}")  # fmt: skip
            host = await tx.hosts.get(capsule.host_id) if capsule.host_id else None
        if host is None or not host.address:
            raise ProxyError(503, ErrorCode.HOST_UNAVAILABLE, "the capsule's host is unavailable")
        try:
            token = services.hosts.proxy_token(host)
        except HostUnavailable as err:
            raise ProxyError(503, ErrorCode.HOST_UNAVAILABLE, err.message) from None
        target = ProxyTarget(host.id, host.address, token, now + CACHE_TTL_S)
        self._cache[route.capsule_id] = target
        return target

    @staticmethod
    def _headers(scope: Scope) -> list[tuple[str, str]]:
        """The client's headers as forwarded (`common.httprelay.request_headers`, without the
        caller's API key; the caller adds the proxy token)."""
        headers = request_headers(scope, NOT_FORWARDED)
        host = _header(scope, b"host")
        if host:
            headers.append(("X-Forwarded-Host", host))
        return headers

    @staticmethod
    def _target_bytes(route: ProxyRoute, scope: Scope) -> bytes:
        """The agent-side request target: the checked path and query, byte for byte."""
        query: bytes = scope.get("query_string") or b""
        return route.agent_path.encode("latin-1") + (b"?" + query if query else b"")

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, route: ProxyRoute, target: ProxyTarget
    ) -> None:
        def answer(name: str, value: str) -> str | None:
            if name in NOT_FORWARDED or name in CREDENTIAL_HEADERS:
                return None
            return strip_location(value, route) if name == "location" and route.subdomain else value

        try:
            # The URL only says where to connect: httpx would normalise a path in it.
            await relay_http(
                scope, receive, send, self._http.get(), url=f"http://{target.address}/",
                target=self._target_bytes(route, scope),
                headers=[*self._headers(scope), (PROXY_TOKEN_HEADER, target.token)],
                answer=answer, name=f"the agent of {route.capsule_id}",
            )  # fmt: skip
        except httpx.HTTPError as err:
            self.evict(route.capsule_id)
            log.warning("proxy to %s failed: %r", target.host_id, err)
            failed = ProxyError(502, ErrorCode.AGENT_ERROR, f"proxy error: {type(err).__name__}")
            await self._refuse(scope, send, failed, _no_receive)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, err: ProxyError, receive: Receive) -> None:
        if scope["type"] == "websocket":
            await receive()  # "websocket.connect"
            await reject_websocket(scope, send, err.status, err.code, err.message)
            return
        response = error_response(err.code, err.message, status=err.status)
        await response(scope, _no_receive, send)


def _forged(scope: Scope) -> Refusal | None:
    """A request from outside that brings one of our credentials at the agents."""
    for raw, _ in scope.get("headers") or []:
        name = bytes(raw).decode("latin-1").lower()
        if name in CREDENTIAL_HEADERS:
            return Refusal(400, ErrorCode.INVALID_REQUEST, f"the {name} header is not accepted")
    return None


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
