"""The template builder and the admin view of templates: `/v1/admin/builds*` and
`/v1/admin/templates*` (protocol/builds.py). Platform admins see every team's; a team's owners
and admins their own team's (templates belong to the team); members get 403.

`POST /v1/admin/builds` takes the configuration as a JSON body, or `multipart/form-data` with a
`config` part (that JSON) and an `archive` part (tar, tar.gz or zip), which is written to disk
as it arrives (at most 100 MiB; the rest of an over-long body is drained before the 413, as for
file uploads) and checked before the build is queued.

`GET /v1/admin/builds/{id}/events` is a Server-Sent Events stream: first the build as it stands
(`event: build`), then, while this control plane runs it, every step start, output line, step
end and healthcheck attempt as it happens; a build run by another control plane is followed
through the database once a second (a `build` event when it moves on). It ends after `done`.
The caller's credentials are checked again every `session_recheck_s`; a revoked key ends it.
"""

from __future__ import annotations

import json as jsonlib
import time
from typing import TYPE_CHECKING

import anyio
from pydantic import ValidationError
from starlette.responses import StreamingResponse

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.multipart import Reader
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest, TooLarge
from nestbox.protocol.builds import (
    AdminTemplateView,
    BuildCreate,
    BuildEvent,
    BuildEventType,
    BuildView,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request
    from starlette.responses import Response

    from nestbox.controlplane.services.builds import StagedArchive

BUILDS = "/v1/admin/builds"
BUILD = BUILDS + "/{build_id}"
DRAIN_LIMIT = 256 * 1024 * 1024
KEEPALIVE_S = 15.0
POLL_S = 1.0


async def create_build(request: Request) -> Response:
    principal = deps.principal(request)
    builds = deps.services(request).builds
    builds.authorise(principal)  # 403 before an upload is read
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/"):
        config = await deps.body(request, BuildCreate)
        return deps.json(await builds.submit(principal, config), 201)
    body = request.stream()
    text: str | None = None
    archive: StagedArchive | None = None
    try:
        try:
            async for part in Reader(content_type, body).parts():
                if part.name == "config" and text is None:
                    text = await part.text(deps.MAX_JSON_BODY)
                elif part.name == "archive" and archive is None:
                    archive = await builds.stage_archive(part.data())
        except TooLarge:
            await _drain(body)
            raise
        if text is None:
            raise InvalidRequest("the form needs a `config` part (the build's JSON)")
        try:
            config = BuildCreate.model_validate(jsonlib.loads(text or "{}"))
        except ValueError as err:
            if isinstance(err, ValidationError):
                raise InvalidRequest(deps.validation_message(err)) from None
            raise InvalidRequest("the config part is not valid JSON") from None
        made = await builds.submit(principal, config, archive)
    except BaseException:
        if archive is not None:
            archive.discard()
        raise
    return deps.json(made, 201)


async def _drain(body: AsyncIterator[bytes]) -> None:
    seen = 0
    async for chunk in body:
        seen += len(chunk)
        if seen > DRAIN_LIMIT:
            return


async def list_builds(request: Request) -> Response:
    builds = deps.services(request).builds
    return deps.json(await builds.list_for(deps.principal(request)))


async def get_build(request: Request) -> Response:
    builds = deps.services(request).builds
    found = await builds.get(deps.principal(request), deps.path_param(request, "build_id"))
    return deps.json(found)


async def cancel_build(request: Request) -> Response:
    builds = deps.services(request).builds
    done = await builds.cancel(deps.principal(request), deps.path_param(request, "build_id"))
    return deps.json(done)


def _sse(event: BuildEvent) -> bytes:
    data = event.model_dump_json(exclude_none=True)
    return f"event: {event.type.value}\ndata: {data}\n\n".encode()


def _build_event(view: BuildView) -> BuildEvent:
    return BuildEvent(type=BuildEventType.BUILD, build_id=view.id,
                      build=view.model_dump(mode="json"))  # fmt: skip


def _done(view: BuildView) -> BuildEvent:
    return BuildEvent(type=BuildEventType.DONE, build_id=view.id, status=view.status,
                      error=view.error)  # fmt: skip


async def build_events(request: Request) -> Response:
    principal = deps.principal(request)
    build_id = deps.path_param(request, "build_id")
    services = deps.services(request)
    builds = services.builds
    await builds.get(principal, build_id)  # 404 / 403 before the stream starts
    recheck_s = services.settings.session_recheck_s

    async def stream() -> AsyncIterator[bytes]:
        with builds.events.subscribe(build_id) as events:
            view = await builds.get(principal, build_id)
            yield _sse(_build_event(view))
            if view.status.final:
                yield _sse(_done(view))
                return
            checked = pinged = time.monotonic()
            while True:
                event: BuildEvent | None = None
                with anyio.move_on_after(POLL_S):
                    try:
                        event = await events.receive()
                    except anyio.EndOfStream:  # dropped: it fell too far behind
                        return
                if event is not None:
                    yield _sse(event)
                    if event.type is BuildEventType.DONE:
                        return
                    continue
                now = time.monotonic()
                if builds.runs_here(build_id) and now - checked < recheck_s:
                    if now - pinged >= KEEPALIVE_S:
                        pinged = now
                        yield b": keep-alive\n\n"
                    continue
                checked = now
                try:  # the caller again (a revoked key ends the stream), and the build
                    again = await deps.authenticate(request)
                    fresh = await builds.get(again, build_id)
                except ControlPlaneError:
                    return
                if (fresh.status, fresh.current_step) != (view.status, view.current_step):
                    view = fresh
                    yield _sse(_build_event(view))
                if view.status.final:
                    yield _sse(_done(view))
                    return
                if now - pinged >= KEEPALIVE_S:
                    pinged = now
                    yield b": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})  # fmt: skip


async def admin_list_templates(request: Request) -> Response:
    builds = deps.services(request).builds
    return deps.json(await builds.list_templates(deps.principal(request)))


async def admin_delete_template(request: Request) -> Response:
    builds = deps.services(request).builds
    await builds.delete_template(deps.principal(request), deps.path_param(request, "name"))
    return deps.no_content()


TEAM_ADMINS = "Platform admins: every team's; team owners and admins: their team's."

router = Router(
    tag="builds",
    endpoints=[
        Endpoint("POST", BUILDS, create_build, "Build a template from a recipe",
                 body=BuildCreate, response=BuildView, status=201,
                 description=TEAM_ADMINS + " JSON, or multipart/form-data with a `config` part "
                 "(this JSON) and an optional `archive` part (tar, tar.gz or zip, at most "
                 "100 MiB) that COPY takes files from. A recipe line that does not parse gives "
                 "a build that is already `failed`, naming the line."),
        Endpoint("GET", BUILDS, list_builds, "Builds, newest first", response=list[BuildView],
                 description=TEAM_ADMINS),
        Endpoint("GET", BUILD, get_build, "A build: status, steps, logs", response=BuildView),
        Endpoint("POST", BUILD + "/cancel", cancel_build, "Cancel a pending or running build",
                 response=BuildView,
                 description="The step in progress stops and the build capsule is destroyed."),
        Endpoint("GET", BUILD + "/events", build_events, "Follow a build (Server-Sent Events)",
                 description="text/event-stream: `build` (the BuildView), `step_start`, "
                 "`output` (one line), `step_end`, `healthcheck`, `done` (then it closes); "
                 "each `data:` is a BuildEvent as JSON."),
        Endpoint("GET", "/v1/admin/templates", admin_list_templates,
                 "Templates: kind, size, defaults, whose", response=list[AdminTemplateView],
                 description=TEAM_ADMINS),
        Endpoint("DELETE", "/v1/admin/templates/{name}", admin_delete_template,
                 "Delete a template no capsule uses", status=204,
                 description="409 conflict with `capsule_ids` while capsules use it; 403 for "
                 "a platform template."),
    ],
)  # fmt: skip
