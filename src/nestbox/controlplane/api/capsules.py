"""Capsule lifecycle: `/v1/capsules` and `/v1/capsules/{capsule_id}` (+ pause, resume, ping).
Paths, fields and statuses are the `wrenn` SDK's (protocol/capsules.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Query, Router, int_query
from nestbox.controlplane.services import paging
from nestbox.controlplane.services.paging import MAX_LIMIT, STATUSES
from nestbox.protocol.capsules import CapsuleCreate, CapsuleView

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

CAPSULE = "/v1/capsules/{capsule_id}"


async def create_capsule(request: Request) -> Response:
    req = await deps.body(request, CapsuleCreate)
    capsules = deps.services(request).capsules
    return deps.json(await capsules.create(deps.principal(request), req), 201)


async def list_capsules(request: Request) -> Response:
    query = paging.parse_query(request.query_params.multi_items())
    capsules = deps.services(request).capsules
    page = await paging.list_page(capsules, deps.principal(request), query)
    response = deps.json(page.capsules)
    if page.next_cursor is not None:
        response.headers[paging.NEXT_CURSOR_HEADER] = page.next_cursor
    return response


async def get_capsule(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    capsules = deps.services(request).capsules
    return deps.json(await capsules.get(deps.principal(request), capsule_id))


async def destroy_capsule(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    await deps.services(request).capsules.destroy(deps.principal(request), capsule_id)
    return deps.no_content()


async def pause_capsule(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    capsules = deps.services(request).capsules
    return deps.json(await capsules.pause(deps.principal(request), capsule_id))


async def resume_capsule(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    capsules = deps.services(request).capsules
    return deps.json(await capsules.resume(deps.principal(request), capsule_id))


async def ping_capsule(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    await deps.services(request).capsules.ping(deps.principal(request), capsule_id)
    return deps.no_content()


router = Router(
    tag="capsules",
    endpoints=[
        Endpoint("POST", "/v1/capsules", create_capsule, "Create a capsule from a template",
                 body=CapsuleCreate, response=CapsuleView, status=201,
                 description="Placed on the least-loaded online host; answers once it runs. "
                             "503 host_unavailable when no host has room."),
        Endpoint("GET", "/v1/capsules", list_capsules, "Your team's capsules",
                 response=list[CapsuleView],
                 query=[Query("status", "only these statuses (repeated, or comma-separated)",
                              {"type": "array", "items": {"enum": sorted(STATUSES)}}),
                        int_query("limit", "at most this many; the next page's cursor is "
                                  "in the X-Next-Cursor header, absent on the last page",
                                  1, MAX_LIMIT),
                        ("cursor", "the X-Next-Cursor of the page before")],
                 description="Oldest first (created_at, then id). Paging is by key: every "
                             "capsule is listed exactly once across the pages, however many "
                             "are created meanwhile. Without limit: all of them. "
                             "`metadata.<key>=<value>` parameters keep only capsules whose "
                             "metadata has key = value (several: all must match)."),
        Endpoint("GET", CAPSULE, get_capsule, "One capsule", response=CapsuleView,
                 description="404 once destroyed; a capsule that died on its own stays "
                             "visible as stopped, error or missing until destroyed."),
        Endpoint("DELETE", CAPSULE, destroy_capsule, "Destroy a capsule", status=204),
        Endpoint("POST", CAPSULE + "/pause", pause_capsule,
                 "Snapshot a running capsule to disk and stop its VM", response=CapsuleView),
        Endpoint("POST", CAPSULE + "/resume", resume_capsule, "Resume a paused capsule",
                 response=CapsuleView),
        Endpoint("POST", CAPSULE + "/ping", ping_capsule, "Reset the idle auto-pause timer",
                 status=204),
    ],
)  # fmt: skip
