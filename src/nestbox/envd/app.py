"""envd's ASGI application: wiring only.

Plain HTTP routes (health, metrics, envs, init, snapshot/prepare, files) go to Starlette; paths
under `/process.Process/` and `/filesystem.Filesystem/` go to the Connect applications. Every
request except `/health` must carry `X-Access-Token` once `/init` has set a token.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

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


class EnvdApp:
    """Routes Connect paths to their services and the rest to Starlette, behind the token check."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.http = Starlette(
            routes=[
                Route("/health", lifecycle.health, methods=["GET"]),
                Route("/metrics", lifecycle.metrics, methods=["GET"]),
                Route("/envs", lifecycle.envs, methods=["GET"]),
                Route("/init", lifecycle.init, methods=["POST"]),
                Route("/snapshot/prepare", lifecycle.prepare, methods=["POST"]),
                Route("/files", files.download, methods=["GET"]),
                Route("/files", files.upload, methods=["POST"]),
            ],
            middleware=[
                Middleware(
                    CORSMiddleware,
                    allow_origins=["*"],
                    max_age=7200,
                    allow_methods=["*"],
                    allow_headers=["*"],
                )
            ],
            lifespan=self._lifespan,
        )
        self.http.state.runtime = runtime
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
        await rt.ports.start()  # a no-op when forwarding is off (outside a VM, by default)
        if rt.ports.forward_address is not None:
            log.info("port forwarding on %s started", rt.ports.forward_address)
        try:
            yield
        finally:
            await rt.ports.stop()
            await rt.watchers.aclose()
            await rt.processes.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.runtime.pending is not None:
            # An answered /init whose machine updates have not run yet: before anything else.
            lifecycle.log_clock_step(lifecycle.finish_init(self.runtime))
        if scope["type"] == "http":
            path: str = scope["path"]
            if path != "/health" and scope["method"] != "OPTIONS" and not self._authorised(scope):
                await _deny(send)
                return
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


async def _deny(send: Send) -> None:
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
