"""What every WebSocket route shares: authentication, opening, refusing, JSON frames.

Authentication, in Wrenn's order: `X-API-Key` or `Authorization: Bearer` on the handshake (the
SDK's way); else the socket is accepted and the first message must be
`{"type": "auth", "token": <API key, session JWT or dashboard ticket>}` within 5 s (browsers
cannot set headers). The dashboard's session cookie never opens a socket (any site could start
that handshake): its page sends a single-use ticket (`nbt_…`, `services/sessions.py`), and
the socket then acts for, and is re-checked against, the browser session.

A refusal before the socket is accepted is a plain HTTP answer with the usual error body (401,
404, 409, …; the SDK raises it as a failed upgrade); after, it is an error frame and a close
with code 4000 + the HTTP status (e.g. 4404).

An open session re-checks its credentials against the database every `session_recheck_s`
(`watch_credentials`, run beside every relay): once they no longer authenticate (the key was
revoked, its maker removed from the team or disabled, the team deleted, the session's user
removed), the session gets an error frame and is closed with 1008 (policy violation). The
check reads the database, so a revocation made through any control plane on it counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from starlette.websockets import WebSocketDisconnect, WebSocketState

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.errors import error_response
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest, Unauthorized
from nestbox.controlplane.services.auth import Credentials
from nestbox.protocol.errors import HTTP_STATUS
from nestbox.protocol.ids import API_KEY_PREFIX
from nestbox.protocol.web import TICKET_PREFIX

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.websockets import WebSocket

    from nestbox.controlplane.services.principal import Principal

log = logging.getLogger(__name__)

T = TypeVar("T")
AUTH_TIMEOUT_S = 5.0
CLOSE_BASE = 4000
POLICY_VIOLATION = 1008
REVOKED_REASON = "credentials revoked"


async def open_session(
    ws: WebSocket,
    resolve: Callable[[Principal], Awaitable[T]],
    *,
    error_frame: Callable[[str], dict[str, Any]],
) -> T | None:
    """Authenticate, `resolve` what the session is about (say, the running capsule), then
    accept. None if refused (the refusal was sent)."""
    accepted = False
    try:
        creds = deps.credentials(ws)
        if creds.api_key is None and creds.bearer is None:
            await ws.accept()
            accepted = True
            creds = await _auth_message(ws)
        principal = await deps.authenticate_with(ws, creds)
        found = await resolve(principal)
    except ControlPlaneError as err:
        await refuse(ws, err, error_frame)
        return None
    except WebSocketDisconnect:
        return None
    if not accepted:
        await ws.accept()
    ws.state.credentials = creds
    return found


async def watch_credentials(
    ws: WebSocket, stop: Callable[[], None], error_frame: Callable[[str], dict[str, Any]]
) -> None:
    """Until cancelled: re-check the credentials `open_session` accepted every
    `session_recheck_s`; once they fail, send an error frame, close the socket with 1008 and
    call `stop` (which ends the relay). A database error is logged and retried, never taken
    for a revocation."""
    services = deps.services(ws)
    creds: Credentials = ws.state.credentials
    while True:
        await anyio.sleep(services.settings.session_recheck_s)
        try:
            await deps.authenticate_with(ws, creds)
        except Unauthorized as err:
            log.info("closing a WebSocket session: %s", err.message)
            await send_json(ws, error_frame(f"{REVOKED_REASON}: {err.message}"))
            await close(ws, POLICY_VIOLATION, REVOKED_REASON)
            stop()
            return
        except Exception as err:
            log.warning("could not re-check a WebSocket session's credentials: %r", err)


async def refuse(
    ws: WebSocket, err: ControlPlaneError, error_frame: Callable[[str], dict[str, Any]]
) -> None:
    """Answer `err`: an HTTP error before the socket is accepted, else a frame and a close."""
    status = HTTP_STATUS.get(err.code, 500)
    if ws.application_state is WebSocketState.CONNECTING:
        if ws.client_state is WebSocketState.CONNECTING:
            await ws.receive()  # the "websocket.connect" message
        try:
            await ws.send_denial_response(error_response(err.code, err.message))
        except RuntimeError:  # the server cannot send HTTP answers to an upgrade
            await ws.close(code=CLOSE_BASE + status, reason=err.message[:120])
        return
    await send_json(ws, error_frame(err.message))
    await close(ws, CLOSE_BASE + status, err.message[:120])


async def _auth_message(ws: WebSocket) -> Credentials:
    """The credentials of the first message. :raise Unauthorized:"""
    with anyio.move_on_after(AUTH_TIMEOUT_S):
        message = await receive_json(ws)
        token = message.get("token")
        if message.get("type") != "auth" or not isinstance(token, str) or not token:
            raise Unauthorized('send X-API-Key, or first {"type": "auth", "token": …}')
        if token.startswith(API_KEY_PREFIX):
            return Credentials(api_key=token)
        if token.startswith(TICKET_PREFIX):  # the dashboard's: one use, 30 s
            return await deps.web_sessions(ws).redeem(token)
        return Credentials(bearer=token)
    raise Unauthorized(f"no auth message within {AUTH_TIMEOUT_S:.0f} s")


async def receive_json(ws: WebSocket) -> dict[str, Any]:
    """The next text frame as a JSON object. :raise InvalidRequest: :raise WebSocketDisconnect:"""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return parse_json(message.get("text"))


def parse_json(text: object) -> dict[str, Any]:
    """:raise InvalidRequest: not a JSON object in a text frame."""
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise InvalidRequest("expected a JSON object in a text frame")
    return doc


async def send_json(ws: WebSocket, doc: dict[str, Any]) -> bool:
    """Send a text frame; False if the client is gone."""
    try:
        await ws.send_text(json.dumps(doc, separators=(",", ":")))
    except (WebSocketDisconnect, RuntimeError, OSError):
        return False
    return True


async def send_bytes(ws: WebSocket, data: bytes) -> bool:
    try:
        await ws.send_bytes(data)
    except (WebSocketDisconnect, RuntimeError, OSError):
        return False
    return True


async def close(ws: WebSocket, code: int = 1000, reason: str = "") -> None:
    if ws.application_state is WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, OSError):
            await ws.close(code=code, reason=reason)
