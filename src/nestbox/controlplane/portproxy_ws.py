"""WebSocket pass-through for the public port proxy: the client's ASGI `websocket` scope on one
side, a `websockets` client connection to the agent's `/proxy/...` on the other (the agent
relays on to the capsule). Messages are relayed as they come, each direction in its own task;
a close on either side closes the other with the same code. The client is accepted only once
the upstream accepted, with the subprotocol it chose; a refused upstream handshake is answered
with the upstream's status where the server can send HTTP answers to an upgrade.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from nestbox.protocol.errors import ErrorBody, ErrorCode

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 30.0
MAX_MESSAGE = 16 * 1024 * 1024
_UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}
"""Close codes that report what happened and may not be sent on the wire."""


async def relay_websocket(
    scope: Scope, receive: Receive, send: Send, url: str, *, headers: list[tuple[str, str]]
) -> None:
    """Relay one WebSocket session between the ASGI client and `url` until either closes."""
    if (await receive())["type"] != "websocket.connect":
        return
    subprotocols: list[str] = scope.get("subprotocols") or []
    try:
        upstream = await connect(
            url, additional_headers=headers,
            subprotocols=[Subprotocol(p) for p in subprotocols] or None,
            compression=None, user_agent_header=None, proxy=None,
            open_timeout=OPEN_TIMEOUT_S, max_size=MAX_MESSAGE,
        )  # fmt: skip
    except InvalidStatus as err:
        body = bytes(err.response.body or b"")
        ctype = err.response.headers.get("content-type", "text/plain")
        await _reject(scope, send, err.response.status_code, body, ctype)
        return
    except (OSError, InvalidHandshake, TimeoutError) as err:
        await reject_websocket(scope, send, 502, ErrorCode.AGENT_ERROR,
                               f"proxy error: {type(err).__name__}")  # fmt: skip
        return
    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_client_to_upstream, receive, upstream, tg.cancel_scope)
            tg.start_soon(_upstream_to_client, upstream, send, tg.cancel_scope)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await upstream.close()


async def _client_to_upstream(
    receive: Receive, upstream: ClientConnection, scope: anyio.CancelScope
) -> None:
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                text, data = message.get("text"), message.get("bytes")
                if isinstance(text, str):
                    await upstream.send(text)
                elif isinstance(data, bytes):
                    await upstream.send(data)
            elif message["type"] == "websocket.disconnect":
                code: int = message.get("code", 1000)
                await upstream.close(_UNSENDABLE.get(code, code), message.get("reason") or "")
                return
    except ConnectionClosed:
        pass  # the other task reports the upstream's close
    finally:
        scope.cancel()


async def _upstream_to_client(
    upstream: ClientConnection, send: Send, scope: anyio.CancelScope
) -> None:
    try:
        async for message in upstream:
            if isinstance(message, str):
                await send({"type": "websocket.send", "text": message})
            else:
                await send({"type": "websocket.send", "bytes": message})
        code, reason = upstream.close_code or 1000, upstream.close_reason or ""
    except ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else 1011
        reason = closed.rcvd.reason if closed.rcvd else ""
    try:
        with contextlib.suppress(OSError):  # the client may be gone too
            await send({"type": "websocket.close", "code": _UNSENDABLE.get(code, code),
                        "reason": reason})  # fmt: skip
    finally:
        scope.cancel()


async def reject_websocket(
    scope: Scope, send: Send, status: int, code: ErrorCode, message: str
) -> None:
    """Refuse the handshake with an error body (a plain close where the server cannot send
    an HTTP answer to an upgrade)."""
    body = ErrorBody.of(code, message).model_dump_json().encode()
    await _reject(scope, send, status, body, "application/json")


async def _reject(scope: Scope, send: Send, status: int, body: bytes, ctype: str) -> None:
    extensions = scope.get("extensions")
    if isinstance(extensions, dict) and "websocket.http.response" in extensions:
        headers = [(b"content-type", ctype.encode("latin-1"))]
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": headers})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
