"""`GET /v1/events/stream`: Server-Sent Events of the caller's team (`services/events.py`).

The first message is `connected`; then one message per event (`id:` the event's id, `event:`
its type, `data:` the EventView JSON), a `: keepalive` comment after `events_heartbeat_s`
without one, and no timeout. The caller's credentials are checked again every
`session_recheck_s`: a revoked key or a removed member's stream ends.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
from starlette.responses import StreamingResponse

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.controlplane.errors import ControlPlaneError
from nestbox.protocol.events import EventType, EventView

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Any

    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"


def message(payload: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    data = json.dumps(payload, separators=(",", ":"))
    return f"{head}event: {payload.get('event', 'message')}\ndata: {data}\n\n".encode()


async def event_stream(request: Request) -> Response:
    principal = deps.principal(request)
    services = deps.services(request)
    heartbeat = services.settings.events_heartbeat_s
    recheck = services.settings.session_recheck_s
    credentials = deps.credentials(request)
    subscription = services.events.subscribe(principal)
    sub = subscription.__enter__()  # before answering: nothing after `connected` is missed

    async def body() -> AsyncIterator[bytes]:
        try:
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            connected = {"event": EventType.CONNECTED.value, "team_id": principal.team_id,
                         "timestamp": now}  # fmt: skip
            yield message(connected)
            quiet_since = anyio.current_time()
            while True:
                payload = None
                with anyio.move_on_after(min(heartbeat, recheck)):
                    try:
                        payload = await sub.receive.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        return  # it fell behind: the client reconnects
                if payload is not None:
                    yield message(payload)
                    quiet_since = anyio.current_time()
                    continue
                try:
                    await services.auth.authenticate(credentials)
                except ControlPlaneError:
                    return
                if anyio.current_time() - quiet_since >= heartbeat:
                    yield KEEPALIVE
                    quiet_since = anyio.current_time()
        finally:
            subscription.__exit__(None, None, None)

    return StreamingResponse(
        body(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )  # fmt: skip


router = Router(
    tag="events",
    endpoints=[
        Endpoint("GET", "/v1/events/stream", event_stream,
                 "Your team's events, as they happen (Server-Sent Events)", response=EventView,
                 media_type="text/event-stream",
                 description="text/event-stream: a `connected` message, then one message per "
                 "event (`data:` is the JSON shown), `: keepalive` comments every 15 s, no "
                 "timeout. capsule.create|pause|resume|destroy and template.snapshot.* carry "
                 "an outcome; capsule.state.changed (auto-pause, error, missing, ...) has "
                 "metadata from/to; host.up|down concern your team's own hosts (shared hosts: "
                 "platform admins)."),
    ],
)  # fmt: skip
