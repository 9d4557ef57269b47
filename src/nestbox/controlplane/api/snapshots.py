"""Snapshot templates: `/v1/snapshots` (protocol/templates.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router, enum_query
from nestbox.protocol.templates import SnapshotCreate, TemplateView

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


async def create_snapshot(request: Request) -> Response:
    req = await deps.body(request, SnapshotCreate)
    overwrite = deps.query_bool(request, "overwrite")
    snapshots = deps.services(request).snapshots
    made = await snapshots.create(deps.principal(request), req, overwrite=overwrite)
    return deps.json(made, 201)


async def list_snapshots(request: Request) -> Response:
    snapshots = deps.services(request).snapshots
    kind = request.query_params.get("type")  # empty is not a kind: 400
    return deps.json(await snapshots.list_for(deps.principal(request), kind))


async def delete_snapshot(request: Request) -> Response:
    snapshots = deps.services(request).snapshots
    await snapshots.delete(deps.principal(request), deps.path_param(request, "name"))
    return deps.no_content()


router = Router(
    tag="snapshots",
    endpoints=[
        Endpoint("POST", "/v1/snapshots", create_snapshot,
                 "Make a template from a running or paused capsule (left paused)",
                 body=SnapshotCreate, response=TemplateView, status=201,
                 flags=[("overwrite", "replace your template of that name")]),
        Endpoint("GET", "/v1/snapshots", list_snapshots, "Your team's and the platform's "
                 "templates", response=list[TemplateView],
                 query=[enum_query("type", "only this kind", ["base", "snapshot"])]),
        Endpoint("DELETE", "/v1/snapshots/{name}", delete_snapshot,
                 "Delete a template no capsule uses", status=204,
                 description="409 conflict with `capsule_ids` while capsules use it; 403 for "
                 "a platform template."),
    ],
)  # fmt: skip
