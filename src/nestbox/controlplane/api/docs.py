"""`/openapi.json` and `/docs`: the API reference. `/docs` is a page of the dashboard (its
client-side router shows Swagger UI, built from npm into the dashboard: nothing comes from
another site), which reads `openapi.json` and tries requests with the browser's session
(cookie and CSRF token) when one is logged in. Without a dashboard build it is the page that
says how to build one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from nestbox.controlplane.api.routing import Router
from nestbox.controlplane.api.web import Dashboard

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

CACHE = {"Cache-Control": "no-cache"}


async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi, headers=CACHE)


async def docs_page(request: Request) -> Response:
    dashboard = request.app.router.default
    assert isinstance(dashboard, Dashboard)
    return dashboard.page()


async def docs_slash(request: Request) -> Response:
    return RedirectResponse(request.url.path.rstrip("/"), status_code=308)


router = Router(
    tag="docs",
    routes=[
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
        Route("/docs/", docs_slash, methods=["GET"]),
    ],
)
