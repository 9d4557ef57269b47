"""E2B's REST API on the control plane (what the `e2b` 2.x SDK calls with `E2B_API_URL` set to
us): `/sandboxes` and `/v2/sandboxes`, authenticated like `/v1` (`X-API-Key`, which E2B spells
`X-API-KEY`; headers are case-blind) and team-scoped (another team's sandbox is 404).

Errors carry both shapes: ours (`{"error": {"code", "message"}}`) and E2B's (`{"code": <HTTP
status>, "message"}`, which the SDK turns into its exceptions); a 404 on DELETE makes the
SDK's `kill()` answer False, a 409 on pause makes `pause()` answer False.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.errors import error_response
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.controlplane.e2b.models import (
    ConnectSandbox,
    ListedSandbox,
    NewSandbox,
    SandboxCreated,
    SandboxDetail,
    SandboxMetric,
    SandboxRefresh,
    SandboxTimeout,
)
from nestbox.controlplane.e2b.service import MAX_PAGE, e2b_service, parse_metadata_query
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest
from nestbox.protocol.errors import HTTP_STATUS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from starlette.requests import Request

    from nestbox.controlplane.api.routing import Handler
    from nestbox.controlplane.e2b.service import E2bService

SANDBOX = "/sandboxes/{capsule_id}"
NEXT_TOKEN_HEADER = "x-next-token"
STATES = frozenset({"running", "paused"})


def e2b_errors(handler: Handler) -> Handler:
    """Answer the handler's `ControlPlaneError`s in both error shapes."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ControlPlaneError as err:
            status = HTTP_STATUS[err.code]
            extra = {**err.extra(), "code": status, "message": err.message}
            response = error_response(err.code, err.message, status=status, extra=extra)
            response.headers.update(err.headers())
            return response

    return wrapped


def answer(content: BaseModel | Sequence[BaseModel], status: int = 200) -> JSONResponse:
    """E2B's field names, nothing null."""
    if isinstance(content, BaseModel):
        doc: object = content.model_dump(mode="json", by_alias=True, exclude_none=True)
    else:
        doc = [v.model_dump(mode="json", by_alias=True, exclude_none=True) for v in content]
    return JSONResponse(doc, status_code=status)


async def _service(request: Request) -> E2bService:
    return await e2b_service(deps.services(request))


@e2b_errors
async def create_sandbox(request: Request) -> Response:
    body = await deps.body(request, NewSandbox)
    created = await (await _service(request)).create(deps.principal(request), body)
    return answer(created, 201)


async def create_sandbox_v1(request: Request) -> Response:
    return await create_sandbox(request)


async def _list(request: Request, *, paged: bool) -> tuple[list[ListedSandbox], str | None]:
    query = request.query_params
    states = {s for raw in query.getlist("state") for s in raw.split(",") if s} or set(STATES)
    if not states <= STATES:
        raise InvalidRequest("state must be running and/or paused")
    if query.get("order", "asc") != "asc":
        raise InvalidRequest("only order=asc (creation order) is supported")
    limit = deps.query_int(request, "limit", MAX_PAGE, lo=1, hi=MAX_PAGE) if paged else None
    service = await _service(request)
    return await service.listing(
        deps.principal(request),
        metadata=parse_metadata_query(query.get("metadata", "")),
        states=states,
        limit=limit,
        token=query.get("nextToken") if paged else None,
    )


@e2b_errors
async def list_sandboxes_v2(request: Request) -> Response:
    items, token = await _list(request, paged=True)
    response = answer(items)
    if token is not None:
        response.headers[NEXT_TOKEN_HEADER] = token
    return response


@e2b_errors
async def list_sandboxes(request: Request) -> Response:
    items, _ = await _list(request, paged=False)
    return answer(items)


@e2b_errors
async def get_sandbox(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    detail = await (await _service(request)).detail(deps.principal(request), capsule_id)
    return answer(detail)


@e2b_errors
async def kill_sandbox(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    await (await _service(request)).kill(deps.principal(request), capsule_id)
    return deps.no_content()


@e2b_errors
async def pause_sandbox(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    await (await _service(request)).pause(deps.principal(request), capsule_id)
    return deps.no_content()


async def _connect(request: Request, *, must_resume: bool) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    body = await deps.body(request, ConnectSandbox)
    service = await _service(request)
    created, resumed = await service.connect(
        deps.principal(request), capsule_id, body, must_resume=must_resume
    )
    return answer(created, 201 if resumed else 200)


@e2b_errors
async def connect_sandbox(request: Request) -> Response:
    return await _connect(request, must_resume=False)


async def connect_sandbox_v1(request: Request) -> Response:
    return await connect_sandbox(request)


@e2b_errors
async def resume_sandbox(request: Request) -> Response:
    return await _connect(request, must_resume=True)


@e2b_errors
async def set_sandbox_timeout(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    body = await deps.body(request, SandboxTimeout)
    await (await _service(request)).set_timeout(deps.principal(request), capsule_id, body.timeout)
    return deps.no_content()


@e2b_errors
async def refresh_sandbox(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    body = await deps.body(request, SandboxRefresh)
    await (await _service(request)).refresh(deps.principal(request), capsule_id, body.duration)
    return deps.no_content()


@e2b_errors
async def sandbox_metrics(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    metrics = await (await _service(request)).metrics(deps.principal(request), capsule_id)
    return answer(metrics)


_LIST_QUERY = (
    ("metadata", "urlencoded key=value pairs the sandbox's metadata must hold"),
    ("state", "running and/or paused (comma-separated or repeated); default both"),
    ("limit", f"page size, 1-{MAX_PAGE}"),
    ("nextToken", f"the {NEXT_TOKEN_HEADER} header of the previous page"),
    ("order", "asc (creation order; the only order served)"),
)
router = Router(
    tag="e2b",
    endpoints=[
        Endpoint("POST", "/v2/sandboxes", create_sandbox, "E2B: create a sandbox",
                 body=NewSandbox, response=SandboxCreated, status=201,
                 description="`templateID` `base` is the `base` template where there is one, "
                             "else `minimal`; `timeout` is a lifetime in seconds (kill, or pause "
                             "with `autoPause`)."),
        Endpoint("POST", "/sandboxes", create_sandbox_v1, "E2B: create a sandbox (v1)",
                 body=NewSandbox, response=SandboxCreated, status=201),
        Endpoint("GET", "/v2/sandboxes", list_sandboxes_v2, "E2B: list sandboxes, paged",
                 response=list[ListedSandbox], query=_LIST_QUERY),
        Endpoint("GET", "/sandboxes", list_sandboxes, "E2B: list running sandboxes (v1)",
                 response=list[ListedSandbox], query=_LIST_QUERY[:1]),
        Endpoint("GET", SANDBOX, get_sandbox, "E2B: one sandbox", response=SandboxDetail),
        Endpoint("DELETE", SANDBOX, kill_sandbox, "E2B: kill a sandbox", status=204),
        Endpoint("POST", SANDBOX + "/pause", pause_sandbox, "E2B: pause a sandbox", status=204,
                 description="409 when it is already paused."),
        Endpoint("POST", SANDBOX + "/resume", resume_sandbox, "E2B: resume a paused sandbox",
                 body=ConnectSandbox, response=SandboxCreated, status=201),
        Endpoint("POST", SANDBOX + "/connect", connect_sandbox_v1,
                 "E2B: connect (a paused sandbox is resumed: 201)", body=ConnectSandbox,
                 response=SandboxCreated),
        Endpoint("POST", "/v2" + SANDBOX + "/connect", connect_sandbox,
                 "E2B: connect (a paused sandbox is resumed: 201)", body=ConnectSandbox,
                 response=SandboxCreated),
        Endpoint("POST", SANDBOX + "/timeout", set_sandbox_timeout,
                 "E2B: end the sandbox this many seconds from now", body=SandboxTimeout,
                 status=204),
        Endpoint("POST", SANDBOX + "/refreshes", refresh_sandbox,
                 "E2B: keep the sandbox alive longer", body=SandboxRefresh, status=204),
        Endpoint("GET", SANDBOX + "/metrics", sandbox_metrics,
                 "E2B: the sandbox's recent CPU, memory and disk use",
                 response=list[SandboxMetric]),
    ],
)  # fmt: skip
