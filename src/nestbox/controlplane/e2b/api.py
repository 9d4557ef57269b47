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
from nestbox.controlplane.api.routing import Endpoint, Query, Router, enum_query, int_query
from nestbox.controlplane.e2b.models import (
    ConnectSandbox,
    ListedSandbox,
    NewSandbox,
    NewSnapshot,
    SandboxCreated,
    SandboxDetail,
    SandboxLog,
    SandboxLogs,
    SandboxLogsV2,
    SandboxMetric,
    SandboxRefresh,
    SandboxTimeout,
    SnapshotInfo,
)
from nestbox.controlplane.e2b.service import (
    LOG_LEVELS,
    MAX_PAGE,
    e2b_service,
    parse_metadata_query,
)
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest
from nestbox.protocol.envd import LOG_LINES
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


MAX_START_MS = 2**53
"""The largest `start`/`cursor` taken (ms; JSON's exact integers)."""


@e2b_errors
async def sandbox_logs(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    start = deps.query_int(request, "start", 0, lo=0, hi=MAX_START_MS)
    limit = deps.query_int(request, "limit", LOG_LINES, lo=0, hi=LOG_LINES)
    service = await _service(request)
    entries = await service.logs(deps.principal(request), capsule_id, start_ms=start, limit=limit)
    lines = [SandboxLog(timestamp=e.timestamp, line=e.message) for e in entries]
    return answer(SandboxLogs(logs=lines, log_entries=entries))


@e2b_errors
async def sandbox_logs_v2(request: Request) -> Response:
    """Forward from `cursor` (oldest first), or backward to it (newest first); `level` keeps
    that level and above, `search` the lines whose message holds it."""
    capsule_id = deps.path_param(request, "capsule_id")
    query = request.query_params
    cursor = deps.query_int(request, "cursor", -1, lo=0, hi=MAX_START_MS)
    limit = deps.query_int(request, "limit", LOG_LINES, lo=0, hi=LOG_LINES)
    direction, level = query.get("direction", "forward"), query.get("level", "debug")
    if direction not in ("forward", "backward"):
        raise InvalidRequest("direction must be forward or backward")
    if level not in LOG_LEVELS:
        raise InvalidRequest(f"level must be one of {', '.join(LOG_LEVELS)}")
    search = query.get("search", "")
    forward = direction == "forward"
    service = await _service(request)
    entries = await service.logs(deps.principal(request), capsule_id,
                                 start_ms=max(cursor, 0) if forward else 0)  # fmt: skip
    least = LOG_LEVELS.index(level)
    kept = [
        e for e in entries
        if LOG_LEVELS.index(e.level) >= least and search in e.message
        and (forward or cursor < 0 or round(e.timestamp.timestamp() * 1000) <= cursor)
    ]  # fmt: skip
    page = kept[:limit] if forward else kept[::-1][:limit]
    return answer(SandboxLogsV2(logs=page))


@e2b_errors
async def create_sandbox_snapshot(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    body = await deps.body(request, NewSnapshot)
    made = await (await _service(request)).create_snapshot(
        deps.principal(request), capsule_id, body
    )
    return answer(made, 201)


@e2b_errors
async def list_sandbox_snapshots(request: Request) -> Response:
    query = request.query_params
    items, token = await (await _service(request)).snapshots(
        deps.principal(request),
        sandbox_id=query.get("sandboxID") or None,
        name=query.get("name") or None,
        limit=deps.query_int(request, "limit", MAX_PAGE, lo=1, hi=MAX_PAGE),
        token=query.get("nextToken") or None,
    )
    response = answer(items)
    if token is not None:
        response.headers[NEXT_TOKEN_HEADER] = token
    return response


_LIST_QUERY = (
    ("metadata", "urlencoded key=value pairs the sandbox's metadata must hold"),
    Query(
        "state",
        "running and/or paused (comma-separated or repeated); default both",
        {"type": "array", "items": {"enum": sorted(STATES)}},
    ),
    int_query("limit", "page size", 1, MAX_PAGE),
    ("nextToken", f"the {NEXT_TOKEN_HEADER} header of the previous page"),
    enum_query("order", "creation order, the only order served", ["asc"]),
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
                 response=SandboxCreated, also={201: SandboxCreated}),
        Endpoint("POST", "/v2" + SANDBOX + "/connect", connect_sandbox,
                 "E2B: connect (a paused sandbox is resumed: 201)", body=ConnectSandbox,
                 response=SandboxCreated, also={201: SandboxCreated}),
        Endpoint("POST", SANDBOX + "/timeout", set_sandbox_timeout,
                 "E2B: end the sandbox this many seconds from now", body=SandboxTimeout,
                 status=204),
        Endpoint("POST", SANDBOX + "/refreshes", refresh_sandbox,
                 "E2B: keep the sandbox alive longer", body=SandboxRefresh, status=204),
        Endpoint("GET", SANDBOX + "/metrics", sandbox_metrics,
                 "E2B: the sandbox's recent CPU, memory and disk use",
                 response=list[SandboxMetric]),
        Endpoint("GET", SANDBOX + "/logs", sandbox_logs,
                 "E2B: the sandbox's envd log lines (the last 1000 / 256 KiB)",
                 response=SandboxLogs,
                 query=(int_query("start", "only lines from this time on (ms since the epoch)",
                                  0, MAX_START_MS),
                        int_query("limit", "at most this many lines", 0, LOG_LINES)),
                 description="envd's own lines (processes started and ended, recoveries, "
                             "errors), oldest first, kept in the guest's memory: through a "
                             "pause too, but read only while running (409 when paused)."),
        Endpoint("GET", "/v2" + SANDBOX + "/logs", sandbox_logs_v2,
                 "E2B: the sandbox's envd log lines, filtered", response=SandboxLogsV2,
                 query=(int_query("cursor", "a time (ms since the epoch): from it (forward) or "
                                  "up to it (backward)", 0, MAX_START_MS),
                        int_query("limit", "at most this many lines", 0, LOG_LINES),
                        enum_query("direction", "oldest first (forward, the default) or newest "
                                   "first", ["forward", "backward"]),
                        enum_query("level", "that level and above (default debug)",
                                   list(LOG_LEVELS)),
                        ("search", "only lines whose message holds this text"))),
        Endpoint("POST", SANDBOX + "/snapshots", create_sandbox_snapshot,
                 "E2B: snapshot a sandbox into a template", body=NewSnapshot,
                 response=SnapshotInfo, status=201,
                 description="A running sandbox runs on afterwards; a snapshot of the same "
                             "name is replaced. Create a sandbox from it with `templateID` "
                             "set to its `snapshotID`. `memory: false` is a 400."),
        Endpoint("GET", "/snapshots", list_sandbox_snapshots, "E2B: your team's snapshots, paged",
                 response=list[SnapshotInfo],
                 query=(("sandboxID", "only those taken of this sandbox"),
                        ("name", "only the one of this name"),
                        int_query("limit", "page size", 1, MAX_PAGE),
                        ("nextToken", f"the {NEXT_TOKEN_HEADER} header of the previous "
                                      "page"))),
    ],
)  # fmt: skip
