"""Capsule lifecycle: `/v1/capsules` and `/v1/capsules/{capsule_id}` (+ pause, resume, ping).
Paths, fields and statuses are the `wrenn` SDK's (protocol/capsules.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router
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
    capsules = deps.services(request).capsules
    return deps.json(await capsules.list_for(deps.principal(request)))


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
                 response=list[CapsuleView]),
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
