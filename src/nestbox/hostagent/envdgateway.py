"""The agent's envd gateway: `/envd/{capsule_id}{envd path}` forwarded to that capsule's envd,
for the control plane's E2B-compatible gateway (issue 16).

Why a path of its own rather than the port proxy: the port proxy serves anyone who holds a
capsule id (through the control plane's public proxy) and so must never reach envd (port
49983 is refused there, issue 9). This path is the opposite: it serves the control plane only
and reaches envd only.

- Credential: the **agent token** in `X-Agent-Token` (the control plane's RPC credential,
  which already commands every capsule on this host). Never `Authorization` (that header is
  envd's: Basic names the guest user) and never the proxy token; 401 otherwise.
- Allow-list (`protocol.envdgateway.envd_route`, the same function the control plane applies):
  the raw path must be exactly one of envd's process/filesystem RPCs, `/files`, `/health`,
  `/metrics` or `/envs` with a method that route takes; only `/files` takes a query. `/init`
  and `/snapshot/prepare` are never reachable (403).
- envd's token: whatever `X-Access-Token` came is dropped and the capsule's own (the record's
  `access_token`, rotated on every create, clone and resume) is added here, so it never leaves
  the agent. Our credentials (`X-Agent-Token`, `X-Nestbox-Proxy-Token`) never reach envd.
- Streams both ways without buffering through `common.httprelay` (the relay of every proxy),
  so Connect server streams flow and 100 MiB file transfers take constant memory.
- A request holds the capsule's proxy lease (`CapsuleTargets.acquire`): a pause drains it and
  refuses new ones (503); the capsule's pool is closed when its run ends (`evict`).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import anyio
import httpx

from nestbox.common.httprelay import new_client, relay_http, request_headers
from nestbox.common.proxypath import RefusalLog
from nestbox.hostagent.proxy import answer_error, host_port
from nestbox.hostagent.proxytrack import TargetNotFound, TargetUnavailable
from nestbox.protocol.envd import ACCESS_TOKEN_HEADER, ENVD_PORT
from nestbox.protocol.envdgateway import envd_route
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.hosts import AGENT_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import Receive, Scope, Send

    from nestbox.hostagent.auth import AgentAuth
    from nestbox.hostagent.manager import CapsuleManager

log = logging.getLogger(__name__)

_ROUTE = re.compile(rb"/envd/(?P<id>[A-Za-z0-9][A-Za-z0-9_-]{0,63})(?P<rest>/.*)", re.DOTALL)
"""Matched whole (`fullmatch`)."""
NOT_UPSTREAM = frozenset({ACCESS_TOKEN_HEADER.lower(), "x-api-key", "e2b-sandbox-id",
                          "e2b-sandbox-port"})  # fmt: skip
"""Dropped on the way to envd besides what `common.httprelay` drops (hop-by-hop, `Host`, our
credentials): the caller's envd token (ours goes on instead) and E2B's routing headers."""
_AGENT_TOKEN = AGENT_TOKEN_HEADER.lower().encode()


class EnvdGateway:
    """The ASGI app for `/envd/...` (HTTP only). `manager` returns the running manager or None
    while the agent starts or stops; `transport` (tests) replaces the network."""

    def __init__(
        self,
        auth: AgentAuth,
        manager: Callable[[], CapsuleManager | None],
        *,
        transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self._auth = auth
        self._manager = manager
        self._transport = transport
        # capsule id -> (its address, the pool to its envd); dropped when its run ends.
        self._pools: dict[str, tuple[str, httpx.AsyncClient]] = {}
        self._refusals = RefusalLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _refuse_websocket(receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
        if not any(k == _AGENT_TOKEN and self._auth.accepts(v.decode("latin-1").strip())
                   for k, v in headers):  # fmt: skip
            await answer_error(send, 401, ErrorCode.UNAUTHORIZED,
                               f"a valid {AGENT_TOKEN_HEADER} is required")  # fmt: skip
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        match = _ROUTE.fullmatch(raw_path)
        if match is None:
            await answer_error(send, 404, ErrorCode.NOT_FOUND, "not an /envd/{capsule_id}/ path")
            return
        capsule_id, rest = match["id"].decode(), match["rest"]
        problem = envd_route(str(scope["method"]), rest, query)
        if problem is not None:
            self._refusals.refused(capsule_id, problem, raw_path, where="envd gateway")
            await answer_error(send, 403, ErrorCode.FORBIDDEN, problem)
            return
        manager = self._manager()
        if manager is None:
            await answer_error(send, 503, ErrorCode.UNAVAILABLE, "the agent is starting")
            return
        try:
            lease = manager.acquire(capsule_id)
            token = manager.runtime.get(capsule_id).record.access_token or ""
        except TargetNotFound:
            await answer_error(send, 404, ErrorCode.NOT_FOUND, f"capsule {capsule_id} not found")
            return
        except (TargetUnavailable, LookupError) as err:
            await answer_error(send, 503, ErrorCode.UNAVAILABLE,
                               f"capsule {capsule_id} is not available: {err}")  # fmt: skip
            return
        try:
            target = rest + (b"?" + query if query else b"")
            await self._forward(scope, receive, send, capsule_id, lease.address, target, token)
        finally:
            lease.release()

    async def evict(self, capsule_id: str) -> None:
        """The capsule's run ended (pause, destroy, failure): close its pool, cutting streams."""
        found = self._pools.pop(capsule_id, None)
        if found is not None:
            await found[1].aclose()

    async def aclose(self) -> None:
        for capsule_id in list(self._pools):
            await self.evict(capsule_id)

    async def _client(self, capsule_id: str, address: str) -> httpx.AsyncClient:
        found = self._pools.get(capsule_id)
        if found is not None and found[0] == address:
            return found[1]
        client = new_client(
            transport=self._transport() if self._transport else None, max_connections=100,
            max_idle=20, idle_s=60.0, connect_s=10.0, pool_s=30.0, dial_attempts=3,
        )  # fmt: skip
        self._pools[capsule_id] = (address, client)  # no await since the get
        if found is not None:  # it moved (a resume took another slot): the old pool is stale
            with anyio.CancelScope(shield=True):
                await found[1].aclose()
        return client

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        capsule_id: str,
        address: str,
        target: bytes,
        token: str,
    ) -> None:
        upstream = [*request_headers(scope, NOT_UPSTREAM), (ACCESS_TOKEN_HEADER, token)]
        where = host_port(address, ENVD_PORT)
        client = await self._client(capsule_id, address)
        try:
            await relay_http(
                scope, receive, send, client, url=f"http://{where}/", target=target,
                headers=upstream, name=f"envd of {capsule_id}",
            )  # fmt: skip
        except httpx.HTTPError as err:
            log.info("envd gateway to %s failed: %r", capsule_id, err,
                     extra={"capsule_id": capsule_id})  # fmt: skip
            await answer_error(send, 502, ErrorCode.UNAVAILABLE,
                               f"envd of capsule {capsule_id} is not reachable")  # fmt: skip


async def _refuse_websocket(receive: Receive, send: Send) -> None:
    await receive()  # "websocket.connect"
    await send({"type": "websocket.close", "code": 1008})
