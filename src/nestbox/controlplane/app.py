"""Wiring only: the Starlette app, its routers, its lifespan (the data directory made or tightened
to 0700, database, migrations, an optional `prepare` step, services, a task group for
background loops) and the error handler.

To add routes: write `api/<resource>.py` exporting `router = Router(...)` and append it to
`ROUTERS`. To add a background loop: write `async def loop(services, *, task_status=
TASK_STATUS_IGNORED)` that calls `task_status.started()` once it is ready, then loops until
cancelled, and append it to `BACKGROUND`. Loops run in the lifespan's task group and stop with
the app; a loop that raises takes the app down (loudly) rather than dying unseen.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from starlette.applications import Starlette

from nestbox.controlplane import loops
from nestbox.controlplane.api import (
    admin,
    admin_capsules,
    api_keys,
    auth,
    builds,
    capsules,
    channels,
    docs,
    events,
    files,
    hosts,
    lifetime,
    metrics,
    processes,
    pty,
    snapshots,
    stdio,
    streams,
    teams,
    web,
)
from nestbox.controlplane.api.errors import EXCEPTION_HANDLERS
from nestbox.controlplane.api.openapi import build_openapi
from nestbox.controlplane.api.routing import starlette_routes
from nestbox.controlplane.db import Database
from nestbox.controlplane.e2b import api as e2b_api
from nestbox.controlplane.e2b import templates as e2b_templates
from nestbox.controlplane.e2b.gateway import EnvdGateway
from nestbox.controlplane.portproxy import PortProxy
from nestbox.controlplane.secretbox import load_secret_key
from nestbox.controlplane.services.container import Services, build_services
from nestbox.controlplane.services.sessions import WebSessions
from nestbox.controlplane.settings import jwt_secret, prepare_data_dir

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence

    from anyio.abc import TaskStatus
    from starlette.types import ASGIApp, Receive, Scope, Send

    from nestbox.controlplane.api.routing import Router
    from nestbox.controlplane.settings import CPSettings

log = logging.getLogger(__name__)


class BackgroundLoop(Protocol):
    """A long-running task of the control plane (host monitor, reconciler, …)."""

    __name__: str

    def __call__(
        self, services: Services, *, task_status: TaskStatus[None] = ...
    ) -> Coroutine[Any, Any, None]: ...


ROUTERS: tuple[Router, ...] = (
    auth.router,
    api_keys.router,
    teams.router,
    admin.router,
    admin_capsules.router,
    metrics.router,  # before capsules: /v1/capsules/stats is not a capsule id
    capsules.router,
    lifetime.router,
    processes.router,
    stdio.router,
    streams.router,
    pty.router,
    files.router,
    snapshots.router,
    builds.router,
    hosts.router,
    events.router,
    channels.router,
    e2b_api.router,
    e2b_templates.router,
    web.router,
    docs.router,
)
BACKGROUND: tuple[BackgroundLoop, ...] = (
    loops.agent_connections,
    loops.builds,
    loops.host_monitor,
    loops.reconciler,
    loops.lifetimes,
    loops.events,
    loops.outbox,
    loops.stats_sampler,
)


def create_app(
    settings: CPSettings,
    *,
    routers: Sequence[Router] = ROUTERS,
    background: Sequence[BackgroundLoop] = BACKGROUND,
    prepare: Callable[[Database], Awaitable[None]] | None = None,
) -> Starlette:
    """The control plane's ASGI app. Nothing is opened until its lifespan starts, which
    migrates the database, then awaits `prepare(db)` (`nestbox-cp` makes the first admin
    there), then starts the services; the app serves once all that is done."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(settings.db_url)
        try:
            try:
                await anyio.to_thread.run_sync(prepare_data_dir, settings.data_dir)
                key = await anyio.to_thread.run_sync(load_secret_key, settings.data_dir)
                await db.migrate(secret_key=key)
                if prepare is not None:
                    await prepare(db)
            except Exception as err:
                log.error("cannot prepare the database: %r", err)  # before uvicorn's traceback
                raise
            services = build_services(settings, db)
            app.state.services = services
            app.state.web_sessions = WebSessions(db, secret=jwt_secret(settings),
                                                 ttl_s=settings.jwt_ttl_s)  # fmt: skip
            async with anyio.create_task_group() as tg:
                for loop in background:
                    await tg.start(loop, services, name=loop.__name__)
                log.info("control plane ready", extra={"db": db.dialect})
                yield
                tg.cancel_scope.cancel()
        finally:
            await db.aclose()

    routes = starlette_routes(routers)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.openapi = build_openapi(routers)
    # The dashboard gets the GETs no route took (`/`, its pages, its files); the rest 404 as before.
    app.router.default = web.Dashboard(settings.dashboard_dir, app.router.default)
    app.add_middleware(StripApiPrefix)
    app.add_middleware(PortProxy)  # `{port}-{capsule}.` hosts never reach the API
    app.add_middleware(EnvdGateway)  # outermost: E2B's envd calls (issue 16) before the proxy
    return app


class StripApiPrefix:
    """Serve every route under `/api` too: the `wrenn` SDK's default base URL ends in `/api`
    (its public deployment's reverse proxy strips it), so both base URLs work here."""

    PREFIX = "/api"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if path == self.PREFIX or path.startswith(self.PREFIX + "/"):
                scope = dict(scope)
                scope["path"] = path[len(self.PREFIX) :] or "/"
                raw = scope.get("raw_path")
                if isinstance(raw, bytes) and raw.startswith(self.PREFIX.encode()):
                    scope["raw_path"] = raw[len(self.PREFIX) :] or b"/"
        await self.app(scope, receive, send)
