"""A process's stdin and a directory watch (protocol/stdio.py): `POST`/`DELETE
/v1/capsules/{id}/processes/{pid or tag}/stdin` and `GET /v1/capsules/{id}/files/watch`
(Server-Sent Events: one `data:` line of JSON per event, `: keepalive` every 15 s)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anyio
from starlette.responses import StreamingResponse

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.routing import Endpoint, Query, Router
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest
from nestbox.protocol.files import MAX_PATH, guest_path_problem
from nestbox.protocol.stdio import StdinWrite, WatchEventView

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from starlette.requests import Request
    from starlette.responses import Response

KEEPALIVE = ": keepalive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def send_stdin(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, StdinWrite)
    stdio = deps.services(request).stdio
    await stdio.send_stdin(deps.principal(request), capsule_id,
                           deps.path_param(request, "selector"), req)  # fmt: skip
    return deps.no_content()


async def close_stdin(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    stdio = deps.services(request).stdio
    await stdio.close_stdin(deps.principal(request), capsule_id,
                            deps.path_param(request, "selector"))  # fmt: skip
    return deps.no_content()


async def watch_dir(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    path = request.query_params.get("path", "")
    if (problem := guest_path_problem(path)) is not None:
        raise InvalidRequest(problem)
    recursive = deps.query_bool(request, "recursive")
    stdio = deps.services(request).stdio
    target = await stdio.open_watch(deps.principal(request), capsule_id)
    events = stdio.watch(target, path, recursive=recursive)
    # The first event (`start`, or the agent's refusal: no such directory) comes before the
    # answer, so a refused watch is an ordinary error answer, not a stream that ends at once.
    first = await anext(events, None)
    services = deps.services(request)
    credentials = deps.credentials(request)

    async def still_allowed() -> bool:
        try:
            await services.auth.authenticate(credentials)
        except ControlPlaneError:
            return False
        return True

    body = _sse(first, events, still_allowed, services.settings.session_recheck_s)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def _sse(
    first: WatchEventView | None,
    events: AsyncIterator[WatchEventView | None],
    still_allowed: Callable[[], Awaitable[bool]],
    recheck_s: float,
) -> AsyncIterator[str]:
    """`data:` lines, a comment for each keepalive (envd sends one every 15 s of quiet); an
    error after the start ends the stream with an `error` event. The caller's credentials are
    checked again at the first event or keepalive `recheck_s` after the last check (the agent's
    stream is never cut mid-read): a revoked key's watch ends within about 15 s."""
    yield KEEPALIVE if first is None else _data(first.model_dump_json())
    checked = anyio.current_time()
    try:
        async for event in events:
            if anyio.current_time() - checked >= recheck_s:
                if not await still_allowed():
                    yield _error("unauthorized", "credentials revoked")
                    return
                checked = anyio.current_time()
            yield KEEPALIVE if event is None else _data(event.model_dump_json())
    except ControlPlaneError as err:
        yield _error(err.code.value, str(err))
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # an async generator


def _error(code: str, message: str) -> str:
    body = {"error": {"code": code, "message": message}}
    return "event: error\n" + _data(json.dumps(body, separators=(",", ":")))


def _data(text: str) -> str:
    return f"data: {text}\n\n"


router = Router(
    tag="processes",
    endpoints=[
        Endpoint("POST", CAPSULE + "/processes/{selector}/stdin", send_stdin,
                 "Write to a process's stdin", body=StdinWrite, status=204,
                 description="The process (pid or tag) must have been started in the "
                             "background with stdin: true. encoding base64 sends bytes."),
        Endpoint("DELETE", CAPSULE + "/processes/{selector}/stdin", close_stdin,
                 "Close a process's stdin (end of input)", status=204),
        Endpoint("GET", CAPSULE + "/files/watch", watch_dir,
                 "Watch a directory (Server-Sent Events)", response=WatchEventView,
                 media_type="text/event-stream",
                 query=[Query("path", "the directory (relative: under the workdir or home)",
                              {"type": "string", "minLength": 1, "maxLength": MAX_PATH,
                               "pattern": "^[^\\x00]+$"}, required=True)],
                 flags=[("recursive", "its subdirectories too")],
                 description="text/event-stream: one WatchEventView per data: line, type "
                             "start first once the watch is set, then create, write, remove, "
                             "rename or chmod; `: keepalive` comments every 15 s. Ends when "
                             "the capsule stops running."),
    ],
)  # fmt: skip
