"""The envd gateway: E2B's SDK sends every call into a sandbox (Connect RPCs `/process.Process/*`
and `/filesystem.Filesystem/*`, `GET`/`POST /files`, `/health`) to `E2B_SANDBOX_URL`, or
without it to `https://49983-<id>.<domain>`, always with `E2b-Sandbox-Id`. This ASGI
middleware takes both forms and hands them to the capsule's agent.

- Which requests: any carrying `E2b-Sandbox-Id` (whatever the host; a `49983-<id>.` host of
  our `proxy_domain` must name the same sandbox); everything else goes on to the app and the
  public port proxy, which still refuses port 49983. `E2b-Sandbox-Port`, when sent, must be
  49983.
- What may pass: `protocol.envdgateway.envd_route` on the raw path (exact envd routes, the
  agent checks the same list again); refusals are 403 and logged. WebSockets are refused.
- Who: `X-Access-Token` equal to the capsule's E2B access token (`service.access_token`,
  constant-time), or an `X-API-Key` of the capsule's team (another team's: 404). Nothing else:
  401, the same whether or not the capsule exists. Requests bringing our agent credentials
  are refused (400), as on the port proxy.
- Where: the capsule's agent at `/envd/{id}{path}` with the host's **agent token**; the agent
  puts the capsule's own envd token on (the caller's never reaches envd). A sandbox that is
  not running answers 502 (the SDK's `is_running()` reads that as False), unless it was made
  with `autoResume`, which resumes it first (`LifetimeService.ensure_running`).
- Streams both ways through `common.httprelay` (the HTTP relay of every proxy: request body as
  it arrives, answer chunks as they come), so Connect server streams flow and file transfers
  of any size take constant memory; a client that hangs up ends the upstream request.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, cast

import httpx

from nestbox.common.httprelay import LazyClient, new_client, relay_http, request_headers
from nestbox.common.proxypath import RefusalLog
from nestbox.controlplane.db.capsules import DESTROYED
from nestbox.controlplane.e2b.service import e2b_service, e2b_state, token_matches
from nestbox.controlplane.errors import ControlPlaneError, HostUnavailable
from nestbox.controlplane.services.auth import Credentials
from nestbox.controlplane.services.lifetime import system_principal
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.envd import ACCESS_TOKEN_HEADER
from nestbox.protocol.envdgateway import (
    AGENT_PREFIX,
    GATEWAY_PORT,
    SANDBOX_ID_HEADER,
    SANDBOX_PORT_HEADER,
    envd_route,
)
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.hosts import AGENT_TOKEN_HEADER, PROXY_TOKEN_HEADER
from nestbox.protocol.ids import BASE36, ID_LENGTH, IdPrefix

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.e2b.service import E2bService
    from nestbox.controlplane.services.container import Services

log = logging.getLogger(__name__)

CAPSULE_ID = re.compile(f"{IdPrefix.CAPSULE}-[{BASE36}]{{{ID_LENGTH}}}")
HOST_FORM = re.compile(rf"{GATEWAY_PORT}-(?P<id>[^.]*)\.(?P<domain>.+)")
_ID_HEADER = SANDBOX_ID_HEADER.lower().encode()
_PORT_HEADER = SANDBOX_PORT_HEADER.lower().encode()
NOT_FORWARDED = frozenset({"x-api-key", ACCESS_TOKEN_HEADER.lower()})
"""Dropped on the way to the agent besides what `common.httprelay` drops (hop-by-hop, `Host`,
our credentials): the caller's API key and E2B token (the agent puts envd's own on)."""
CONNECT_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
                 404: "not_found", 502: "unavailable", 503: "unavailable"}  # fmt: skip


class GatewayError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def sandbox_of(scope: Scope, proxy_domain: str) -> str | None:
    """The sandbox a request is for (its `E2b-Sandbox-Id`), or None when it is not the
    gateway's. E2B's SDK sends the header to every envd URL, `https://49983-<id>.<domain>`
    included; a request naming another sandbox in such a host for our domain is refused.
    Without the header the request is not the gateway's: a bare `49983-<id>.` host stays the
    port proxy's, which refuses envd's port (issue 9). :raise GatewayError:"""
    named = _header(scope, _ID_HEADER)
    if named is None:
        return None
    host = HOST_FORM.fullmatch((_header(scope, b"host") or "").lower())
    if host is not None and host["domain"] == proxy_domain.lower() and host["id"] != named:
        raise GatewayError(400, ErrorCode.INVALID_REQUEST,
                           f"the host names another sandbox than {SANDBOX_ID_HEADER}")  # fmt: skip
    return named


class EnvdGateway:
    """ASGI middleware: envd calls go to the capsule's agent, the rest to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._http = LazyClient(lambda: new_client(max_idle=100, idle_s=60.0, connect_s=30.0))
        self._refusals = RefusalLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                await self._http.aclose()
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        services = cast("Services", scope["app"].state.services)
        try:
            sandbox_id = sandbox_of(scope, services.settings.proxy_domain)
        except GatewayError as err:
            sandbox_id = ""
            failed: GatewayError | None = err
        else:
            failed = None
        if sandbox_id is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            if failed is not None:
                raise failed
            service = await e2b_service(services)
            capsule = await self._admit(scope, services, service, sandbox_id)
            address, token = await self._agent(services, capsule)
        except GatewayError as err:
            await _error(send, err.status, err.code, err.message)
            return
        await self._forward(scope, receive, send, capsule.id, address, token)

    async def _admit(
        self, scope: Scope, services: Services, service: E2bService, sandbox_id: str
    ) -> Capsule:
        """The running capsule the request may reach. :raise GatewayError:"""
        port = _header(scope, _PORT_HEADER)
        if port is not None and port.strip() != str(GATEWAY_PORT):
            raise GatewayError(400, ErrorCode.INVALID_REQUEST, f"only port {GATEWAY_PORT} "
                               "(envd) is served here; use the port proxy for others")  # fmt: skip
        for name in (AGENT_TOKEN_HEADER, PROXY_TOKEN_HEADER):
            if _header(scope, name.lower().encode()) is not None:
                raise GatewayError(400, ErrorCode.INVALID_REQUEST,
                                   f"the {name.lower()} header is not accepted")  # fmt: skip
        if CAPSULE_ID.fullmatch(sandbox_id) is None:
            raise GatewayError(404, ErrorCode.NOT_FOUND, "no such sandbox")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string") or b""
        problem = envd_route(str(scope["method"]), raw_path.split(b"?", 1)[0], query)
        if problem is not None:
            self._refusals.refused(sandbox_id, problem, raw_path, where="envd gateway")
            raise GatewayError(403, ErrorCode.FORBIDDEN, problem)
        capsule = await self._authorised(scope, services, service, sandbox_id)
        principal = system_principal(capsule.team_id)
        if await services.lifetime.ensure_running(principal, capsule):  # `autoResume`
            capsule = await self._authorised(scope, services, service, sandbox_id)
        if capsule.status != CapsuleStatus.RUNNING:
            raise GatewayError(502, ErrorCode.UNAVAILABLE, f"sandbox {sandbox_id} is not "
                               f"running ({e2b_state(capsule.status) or 'gone'})")  # fmt: skip
        return capsule

    async def _authorised(
        self, scope: Scope, services: Services, service: E2bService, sandbox_id: str
    ) -> Capsule:
        """The capsule, if the request's credentials reach it. :raise GatewayError:"""
        presented = _header(scope, ACCESS_TOKEN_HEADER.lower().encode())
        api_key = _header(scope, b"x-api-key")
        if presented and token_matches(service.key, sandbox_id, presented.strip()):
            async with services.db.transaction() as tx:
                capsule = await tx.capsules.get(sandbox_id)
            if capsule is None or capsule.status == DESTROYED:
                raise GatewayError(502, ErrorCode.UNAVAILABLE, f"sandbox {sandbox_id} not found")
            return capsule
        if api_key:
            try:
                principal = await services.auth.authenticate(Credentials(api_key=api_key))
            except ControlPlaneError as err:
                raise GatewayError(401, ErrorCode.UNAUTHORIZED, err.message) from None
            async with services.db.transaction() as tx:
                capsule = await tx.capsules.visible(principal.team_id, sandbox_id)
            if capsule is None:
                raise GatewayError(404, ErrorCode.NOT_FOUND, "no such sandbox")
            return capsule
        message = f"a valid {ACCESS_TOKEN_HEADER} for this sandbox is required"
        raise GatewayError(401, ErrorCode.UNAUTHORIZED, message)

    @staticmethod
    async def _agent(services: Services, capsule: Capsule) -> tuple[str, str]:
        """The capsule's agent: its address and agent token. :raise GatewayError:"""
        async with services.db.transaction() as tx:
            host = await tx.hosts.get(capsule.host_id) if capsule.host_id else None
        if host is None or not host.address:
            raise GatewayError(502, ErrorCode.UNAVAILABLE, "the sandbox's host is gone")
        try:
            return host.address, services.hosts.agent_token(host)
        except HostUnavailable as err:
            raise GatewayError(503, ErrorCode.HOST_UNAVAILABLE, err.message) from None

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, capsule_id: str, address: str,
        token: str,
    ) -> None:  # fmt: skip
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string") or b""
        target = f"{AGENT_PREFIX}{capsule_id}".encode() + raw_path.split(b"?", 1)[0]
        if query:
            target += b"?" + query
        headers = [*request_headers(scope, NOT_FORWARDED), (AGENT_TOKEN_HEADER, token)]
        try:
            await relay_http(
                scope, receive, send, self._http.get(), url=f"http://{address}/", target=target,
                headers=headers, name=f"the agent of {capsule_id}",
            )  # fmt: skip
        except httpx.HTTPError as err:
            log.warning("envd gateway to the agent of %s failed: %r", capsule_id, err,
                        extra={"capsule_id": capsule_id})  # fmt: skip
            await _error(send, 502, ErrorCode.UNAVAILABLE, "the sandbox's host did not answer")


async def _error(send: Send, status: int, code: ErrorCode, message: str) -> None:
    """Our error shape, plus Connect's (`code` as a Connect code string) for RPC clients."""
    doc = {"code": CONNECT_CODES.get(status, "unknown"), "message": message,
           "error": {"code": code.value, "message": message}}  # fmt: skip
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
