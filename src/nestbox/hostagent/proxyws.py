"""WebSocket pass-through for the port proxy: the downstream side is the ASGI `websocket` scope,
the upstream side a `websockets` client connection to the capsule's port.

Messages (text and binary) are relayed as they come, each direction in its own task; a close
on either side closes the other with the same code and reason. The upstream handshake is
tried like an HTTP connect (3 attempts, linear backoff) and only then is the downstream
accepted, with the subprotocol the capsule chose; a refused upstream handshake is answered
with the capsule's own status (or 502 when nothing listens) where the server supports the
ASGI `websocket.http.response` extension.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from nestbox.protocol.errors import ErrorBody, ErrorCode

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 30.0
_UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}
"""Close codes that only report what happened and may not be sent on the wire."""


async def relay_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    url: str,
    *,
    headers: list[tuple[str, str]],
    nothing_listens: str,
    attempts: int,
    backoff_s: float,
    max_message: int,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Relay one WebSocket session between the ASGI client and `url` until either closes."""
    if (await receive())["type"] != "websocket.connect":
        return
    subprotocols: list[str] = scope.get("subprotocols") or []
    try:
        upstream = await _open(url, headers, subprotocols, attempts, backoff_s, max_message, sleep)
    except InvalidStatus as err:
        body = bytes(err.response.body or b"")
        await _reject(scope, send, err.response.status_code, body, "text/plain")
        return
    except OSError:
        await _reject_json(scope, send, 502, nothing_listens)
        return
    except (InvalidHandshake, TimeoutError) as err:
        await _reject_json(scope, send, 502, f"proxy error: {type(err).__name__}")
        return
    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_downstream_to_upstream, receive, upstream, tg.cancel_scope)
            tg.start_soon(_upstream_to_downstream, upstream, send, tg.cancel_scope)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await upstream.close()


async def _open(
    url: str,
    headers: list[tuple[str, str]],
    subprotocols: list[str],
    attempts: int,
    backoff_s: float,
    max_message: int,
    sleep: Callable[[float], Awaitable[None]],
) -> ClientConnection:
    """The upstream connection; a refused TCP connect is retried. :raise OSError: never
    connected. :raise InvalidHandshake, TimeoutError: the capsule did not take the upgrade."""
    for attempt in range(1, attempts + 1):
        try:
            return await connect(
                url,
                additional_headers=headers,
                subprotocols=[Subprotocol(p) for p in subprotocols] or None,
                compression=None,  # frames are relayed decoded; each side negotiates its own
                user_agent_header=None,  # the client's own User-Agent is among `headers`
                proxy=None,
                open_timeout=OPEN_TIMEOUT_S,
                max_size=max_message,
            )
        except OSError:
            if attempt == attempts:
                raise
            await sleep(backoff_s * attempt)
    raise AssertionError("unreachable")


async def _downstream_to_upstream(
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
                reason: str = message.get("reason") or ""
                await upstream.close(_UNSENDABLE.get(code, code), reason)
                return
    except ConnectionClosed:
        pass  # the other task reports the upstream's close
    finally:
        scope.cancel()


async def _upstream_to_downstream(
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
        await send({"type": "websocket.close", "code": _UNSENDABLE.get(code, code),
                    "reason": reason})  # fmt: skip
    except OSError:
        pass  # the downstream client is gone too
    finally:
        scope.cancel()


async def _reject_json(scope: Scope, send: Send, status: int, message: str) -> None:
    await reject_websocket(scope, send, status, ErrorCode.UNAVAILABLE, message)


async def reject_websocket(
    scope: Scope, send: Send, status: int, code: ErrorCode, message: str
) -> None:
    """Refuse the handshake with an `ErrorBody` answer (a plain close where the server cannot
    send an HTTP answer; uvicorn then says 403)."""
    body = ErrorBody.of(code, message).model_dump_json().encode()
    await _reject(scope, send, status, body, "application/json")


async def _reject(scope: Scope, send: Send, status: int, body: bytes, ctype: str) -> None:
    extensions = scope.get("extensions")
    if isinstance(extensions, dict) and "websocket.http.response" in extensions:
        headers = [(b"content-type", ctype.encode())]
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": headers})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011})
