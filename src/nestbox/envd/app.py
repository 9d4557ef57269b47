"""envd's ASGI application: wiring only, and the access-token gate in front of everything.

Plain HTTP routes (health, metrics, envs, init, snapshot/prepare, files) go to Starlette; paths
under `/process.Process/` and `/filesystem.Filesystem/` go to the Connect applications.

Once `/init` has set a token (E2B's `accessToken`), every request must carry it in
`X-Access-Token` (401 otherwise), with two exceptions that reach no handler holding data:
`GET /health` (liveness and envd's version only) and a browser's CORS preflight (`OPTIONS`
with `Origin` and `Access-Control-Request-Method`: a preflight never carries custom headers),
which is answered by the CORS layer alone with CORS headers and is never routed. Any other
`OPTIONS` without the token is a 401 like the rest. Because the gate covers `/init` too, an
established token changes only through a request that carries it. Before the first `/init`
there is no token and envd is open (the cold boot of a template; see SECURITY.md).
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from nestbox.envd import files, lifecycle
from nestbox.envd.filesystem.service import FilesystemService
from nestbox.envd.process.service import ProcessService
from nestbox.protocol.envd import ACCESS_TOKEN_HEADER
from nestbox.protocol.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from nestbox.protocol.gen.process.process_connect import ProcessASGIApplication

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.types import ASGIApp, Receive, Scope, Send

    from nestbox.envd.state import Runtime

log = logging.getLogger(__name__)

# Connect's own limit is 4 MiB by default; process input and file RPCs stay far below it.
READ_MAX_BYTES = 16 * 1024 * 1024
_TOKEN_HEADER = ACCESS_TOKEN_HEADER.lower().encode()
"""The header's name as it appears in an ASGI scope."""
CORS: dict[str, Any] = {
    "allow_origins": ["*"],
    "max_age": 7200,
    "allow_methods": ["*"],
    "allow_headers": ["*"],
}
OPEN = frozenset({("GET", "/health"), ("HEAD", "/health")})
"""(method, path) pairs served without the token: liveness and the version, nothing else."""


class EnvdApp:
    """Routes Connect paths to their services and the rest to Starlette, behind the token check."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.http = Starlette(
            routes=[
                Route("/health", lifecycle.health, methods=["GET"]),
                Route("/metrics", lifecycle.metrics, methods=["GET"]),
                Route("/envs", lifecycle.envs, methods=["GET"]),
                Route("/logs", lifecycle.logs, methods=["GET"]),
                Route("/ports/scan", lifecycle.scan_ports, methods=["POST"]),
                Route("/init", lifecycle.init, methods=["POST"]),
                Route("/snapshot/prepare", lifecycle.prepare, methods=["POST"]),
                Route("/files", files.download, methods=["GET"]),
                Route("/files", files.upload, methods=["POST"]),
            ],
            middleware=[Middleware(CORSMiddleware, **CORS)],
            lifespan=self._lifespan,
        )
        self.http.state.runtime = runtime
        # What a request without the token reaches when it is an OPTIONS: the CORS layer answers
        # a real preflight itself (CORS headers only); anything else falls through to the 401.
        self.preflight = CORSMiddleware(_deny, **CORS)
        self.rpc: dict[str, ASGIApp] = {
            "/process.Process/": ProcessASGIApplication(
                ProcessService(runtime), read_max_bytes=READ_MAX_BYTES
            ),
            "/filesystem.Filesystem/": FilesystemASGIApplication(
                FilesystemService(runtime), read_max_bytes=READ_MAX_BYTES
            ),
        }

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        rt = self.runtime
        envd_logger = logging.getLogger("nestbox.envd")
        envd_logger.addHandler(rt.logs)
        await rt.ports.start()  # a no-op when forwarding is off (outside a VM, by default)
        if rt.ports.forward_address is not None:
            log.info("port forwarding on %s started", rt.ports.forward_address)
        try:
            yield
        finally:
            await rt.ports.stop()
            await rt.watchers.aclose()
            await rt.processes.aclose()
            envd_logger.removeHandler(rt.logs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.runtime.pending is not None:
            # An answered /init whose machine updates have not run yet: before anything else.
            lifecycle.log_clock_step(lifecycle.finish_init(self.runtime))
        if scope["type"] == "lifespan":
            await self.http(scope, receive, send)
            return
        if scope["type"] != "http":  # uvicorn runs with ws="none"; refuse whatever else comes
            await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        if not self._authorised(scope) and (scope["method"], path) not in OPEN:
            if scope["method"] == "OPTIONS":
                await self.preflight(scope, receive, send)
            else:
                await _deny(scope, receive, send)
            return
        if path not in lifecycle.NO_GUEST_USE:
            # The port scanner's short period (`ports.py`): only for requests that may start
            # a program. A create's `/init`, health and metrics probes kept each new capsule
            # scanning every second for a minute (10-20 ms of TCG guest CPU a second each).
            self.runtime.ports.activity()
        lifecycle.pin_hostname(self.runtime, path)  # a clone's new host name, before any use
        for prefix, app in self.rpc.items():
            if path.startswith(prefix):
                await app(scope, receive, send)
                return
        await self.http(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        token = self.runtime.access_token
        if token is None:
            return True
        for name, value in scope["headers"]:
            if name == _TOKEN_HEADER:
                return hmac.compare_digest(value, token.encode())
        return False


async def _deny(_scope: Scope, _receive: Receive, send: Send) -> None:
    """The 401 answer (an ASGI app, so that the CORS layer can fall through to it)."""
    body = json.dumps(
        {"error": {"code": "unauthorized", "message": "missing or wrong X-Access-Token"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
