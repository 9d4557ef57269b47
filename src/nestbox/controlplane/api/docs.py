"""`/openapi.json` and `/docs`: the API reference, served from this package only (no CDN), so
it works on a machine without internet. The page (`static/docs.html` + `docs.js`) fetches
`openapi.json` and renders every path, its auth, parameters and schemas."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.routing import Route

from nestbox.controlplane.api.routing import Router

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
CACHE = {"Cache-Control": "no-cache"}


async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi, headers=CACHE)


async def docs_page(request: Request) -> Response:
    return FileResponse(STATIC / "docs.html", media_type="text/html; charset=utf-8", headers=CACHE)


async def docs_script(request: Request) -> Response:
    return FileResponse(STATIC / "docs.js", media_type="text/javascript; charset=utf-8",
                        headers=CACHE)  # fmt: skip


async def docs_slash(request: Request) -> Response:
    return RedirectResponse(request.url.path.rstrip("/"), status_code=308)


router = Router(
    tag="docs",
    routes=[
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
        Route("/docs/", docs_slash, methods=["GET"]),
        Route("/docs/docs.js", docs_script, methods=["GET"]),
    ],
)
