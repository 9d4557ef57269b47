"""The WebSocket relay of both port proxies (the control plane's public one and the agent's): an
ASGI `websocket` scope (the client) on one side, a `websockets` client connection (upstream:
the agent's `/proxy/...`, or the capsule's port) on the other.

Host side only: it imports `websockets`, which the guest image does not have. envd never
imports this module (an import-linter contract and `tests/unit/test_wsrelay.py` check it); the
image copies it into the guest with the rest of `nestbox.common`, where nothing loads it.

Handshake. The upstream handshake is made first, then the client is accepted with the
subprotocol the upstream chose. The request target is sent exactly as the caller gives it (the
raw path and query `common.proxypath` checked): `websockets` sends an ASCII URI's path and
query unchanged. A refused TCP connect is retried (`dial_attempts`, `dial_backoff_s * attempt`
apart: the agent's capsule ports, whose socat forwarder starts up to a second late). A refused
upstream handshake is answered with the upstream's own status, body and content type; no
connection, a failed or timed-out handshake with 502 and an `ErrorBody`. Where the server
cannot answer an upgrade with HTTP (no `websocket.http.response` extension) the handshake is
refused with a close instead: 1008 for a 4xx, 1011 for a 5xx.

Headers. The caller's headers go upstream without the hop-by-hop ones (and those `Connection`
names), `Host`, `Sec-WebSocket-*` (the client connection makes its own) and the control plane's
credentials at the agents (`X-Agent-Token`, `X-Nestbox-Proxy-Token`), whatever the caller
passed; then `credentials` are added: the only way those two headers reach an upstream.

Messages. One task per direction reads one message and sends it before reading the next:
the relay queues nothing, so a slow reader slows the sender (uvicorn stops reading the
client's socket while a message waits for `receive`; `websockets` stops reading the
upstream's beyond `max_queue` frames, and its `send` waits for the write buffer to drain).
Messages are at most `max_message` bytes each way.

Close codes (the same in both programs):

    the other side closes       its code and reason, passed through (1005 "no status" → 1000)
    1001 going away             to the upstream when the client sent a message over
                                `max_message` or its connection broke (the server's 1006;
                                uvicorn reports 1005, so the upstream gets 1000); both ways
                                when the relay is cancelled
    1008 policy violation       a handshake refused where no HTTP answer can be sent (4xx)
    1009 message too big        to the client that sent a message over `max_message` (an
                                upstream that does gets it from `websockets`)
    1011 upstream error         to the client when the upstream went without a close frame,
                                broke the protocol, sent a message over `max_message` or did
                                not answer pings; a refused handshake (5xx) without HTTP
                                answers; an error in the relay itself
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import EXTERNAL_CLOSE_CODES
from websockets.typing import Subprotocol

from nestbox.protocol.errors import ErrorBody, ErrorCode
from nestbox.protocol.hosts import AGENT_TOKEN_HEADER, PROXY_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence

    from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

NORMAL: Final = 1000
GOING_AWAY: Final = 1001
POLICY: Final = 1008
TOO_BIG: Final = 1009
UPSTREAM_ERROR: Final = 1011
_NO_STATUS: Final = 1005
"""Reported when a close frame carried no code; may not be sent (becomes 1000)."""
_MAX_REASON: Final = 123
"""Bytes of a close reason that fit in a close frame."""

CREDENTIAL_HEADERS: Final = frozenset({AGENT_TOKEN_HEADER.lower(), PROXY_TOKEN_HEADER.lower()})
"""The control plane's credentials at an agent: never forwarded from a client."""
_NOT_FORWARDED: Final = CREDENTIAL_HEADERS | {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "expect", "host",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_message: int = 16 * 1024 * 1024
    """Largest message relayed, each way (bytes; a text message's UTF-8)."""
    max_queue: int = 16
    """Upstream frames buffered before reading from the upstream pauses."""
    open_timeout_s: float = 30.0
    close_timeout_s: float = 5.0
    dial_attempts: int = 1
    dial_backoff_s: float = 0.1


def upstream_headers(
    headers: Iterable[tuple[str, str]], credentials: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """`headers` (names in any case) as sent upstream, then `credentials` (see the module doc)."""
    items = [(k.lower(), v) for k, v in headers]
    named = {t.strip().lower() for k, v in items if k == "connection" for t in v.split(",")}
    kept = [
        (k, v)
        for k, v in items
        if k not in _NOT_FORWARDED and k not in named and not k.startswith("sec-websocket-")
    ]
    return kept + list(credentials)


def upstream_url(address: str, target: bytes) -> str:
    """`ws://{address}{target}`; `target` is a checked raw path and query, sent as it is.

    :raise ValueError: `target` would not be sent byte for byte (not `/`-rooted printable
        ASCII, or holds `#`): `common.proxypath` refuses those before a relay starts.
    """
    if not target.startswith(b"/") or b"#" in target or any(b < 0x21 or b > 0x7E for b in target):
        raise ValueError(f"not a raw request target the relay can send unchanged: {target!r}")
    return f"ws://{address}" + target.decode("ascii")


def sendable(code: int, *, lost: int) -> int:
    """A close code that may be sent on: `code`, 1000 for "no status", else `lost`."""
    if code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000:
        return code
    return NORMAL if code == _NO_STATUS else lost


def _reason(text: str) -> str:
    """`text` cut to what a close frame holds (whole characters)."""
    return text.encode()[:_MAX_REASON].decode(errors="ignore")


async def relay_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    address: str,
    target: bytes,
    headers: Iterable[tuple[str, str]],
    credentials: Sequence[tuple[str, str]] = (),
    limits: RelayLimits = RelayLimits(),
    error_code: ErrorCode = ErrorCode.UNAVAILABLE,
    unreachable: str | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Relay one WebSocket session between the ASGI client and `ws://{address}{target}` until
    either side closes. `error_code` and `unreachable` (the message when no connection could
    be made) word the 502 answers."""
    url = upstream_url(address, target)
    if (await receive())["type"] != "websocket.connect":
        return
    subprotocols: list[str] = scope.get("subprotocols") or []
    try:
        upstream = await _open(url, upstream_headers(headers, credentials), subprotocols, limits,
                               sleep)  # fmt: skip
    except InvalidStatus as err:
        body = bytes(err.response.body or b"")
        ctype = err.response.headers.get("content-type", "text/plain")
        await _answer(scope, send, err.response.status_code, body, ctype)
        return
    except TimeoutError:  # before OSError: it is one
        await reject_websocket(scope, send, 502, error_code, "proxy error: TimeoutError")
        return
    except OSError as err:
        log.debug("websocket upstream %s unreachable: %r", address, err)
        message = unreachable or f"proxy error: {type(err).__name__}"
        await reject_websocket(scope, send, 502, error_code, message)
        return
    except WebSocketException as err:
        log.debug("websocket upstream %s: %r", address, err)
        await reject_websocket(scope, send, 502, error_code, f"proxy error: {type(err).__name__}")
        return
    session = _Session(send, upstream, limits)
    failed = False
    try:
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        except OSError:  # uvicorn's ClientDisconnected: the client left during the handshake
            session.client_left()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.client_to_upstream, receive)
            tg.start_soon(session.upstream_to_client, tg.cancel_scope)
    except Exception:
        failed = True
        raise
    finally:
        # Ended normally both sides are closed already; cancelled (or failed), close them now.
        code, reason = (UPSTREAM_ERROR, "proxy error") if failed else (GOING_AWAY, "proxy closing")
        with anyio.CancelScope(shield=True), anyio.move_on_after(2 * limits.close_timeout_s):
            await session.close_client(code, reason)
            await session.close_upstream(GOING_AWAY, reason)


async def _open(
    url: str,
    headers: list[tuple[str, str]],
    subprotocols: list[str],
    limits: RelayLimits,
    sleep: Callable[[float], Awaitable[None]],
) -> ClientConnection:
    """The upstream connection; a refused TCP connect is retried.

    :raise OSError: never connected. :raise TimeoutError: no handshake in time.
    :raise WebSocketException: the upstream refused (`InvalidStatus`) or broke the handshake.
    """
    for attempt in range(1, limits.dial_attempts + 1):
        try:
            return await connect(
                url,
                additional_headers=headers,
                subprotocols=[Subprotocol(p) for p in subprotocols] or None,
                compression=None,  # messages are relayed decoded; each side negotiates its own
                user_agent_header=None,  # the client's own User-Agent is among `headers`
                proxy=None,  # never a proxy from the environment
                open_timeout=limits.open_timeout_s,
                close_timeout=limits.close_timeout_s,
                max_size=limits.max_message,
                max_queue=limits.max_queue,
            )
        except TimeoutError:
            raise
        except OSError:
            if attempt == limits.dial_attempts:
                raise
            await sleep(limits.dial_backoff_s * attempt)
    raise AssertionError("unreachable")


class _Session:
    """One relayed session: the two directions, and whether the client may still be sent to.

    Sends to the client go one at a time (a lock), so a close never overtakes a message being
    sent, and nothing is sent after it (uvicorn raises). The upstream is read until it is
    closed, also once the client is done (its messages are then dropped): reading pauses
    beyond `max_queue` frames, and the upstream's close frame is behind them.
    """

    def __init__(self, send: Send, upstream: ClientConnection, limits: RelayLimits) -> None:
        self._send = send
        self._upstream = upstream
        self._limits = limits
        self._client_lock = anyio.Lock()
        self._client_done = False
        """A close was sent to the client, or the client left: nothing more goes to it."""

    def client_left(self) -> None:
        self._client_done = True

    async def to_client(self, message: Message) -> None:
        async with self._client_lock:
            if self._client_done:
                return
            try:
                await self._send(message)
            except OSError:  # uvicorn's ClientDisconnected
                self._client_done = True

    async def close_client(self, code: int, reason: str) -> None:
        """Send the client a close (unless done), waiting at most `close_timeout_s`: a client
        that reads nothing keeps the message before it from leaving."""
        with anyio.move_on_after(self._limits.close_timeout_s):
            await self.to_client({"type": "websocket.close", "code": code,
                                  "reason": _reason(reason)})  # fmt: skip
        self._client_done = True

    async def close_upstream(self, code: int, reason: str) -> None:
        """Close the upstream (the closing handshake, at most `close_timeout_s`), reading and
        dropping what it still sends meanwhile."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drain_upstream)
            await self._upstream.close(code, _reason(reason))
            tg.cancel_scope.cancel()

    async def _drain_upstream(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._upstream.recv()

    def _too_big(self, message: Message) -> bool:
        limit = self._limits.max_message
        text, data = message.get("text"), message.get("bytes")
        if isinstance(text, str):  # UTF-8 is at most 4 bytes a character: encode only if it may
            return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)
        return isinstance(data, bytes) and len(data) > limit

    async def client_to_upstream(self, receive: Receive) -> None:
        """Client messages upstream until the client closes or sends one too big; then close
        the upstream (the other direction, still reading it, ends the group)."""
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.client_left()
                code: int = message.get("code", _NO_STATUS)
                reason = _reason(message.get("reason") or "")
                await self._upstream.close(sendable(code, lost=GOING_AWAY), reason)
                return
            if message["type"] != "websocket.receive":
                continue
            if self._too_big(message):
                limit = self._limits.max_message
                await self.close_client(TOO_BIG, f"message over {limit} bytes")
                await self._upstream.close(GOING_AWAY, "the client sent a message too big to relay")
                return
            text, data = message.get("text"), message.get("bytes")
            try:
                await self._upstream.send(text if isinstance(text, str) else data or b"")
            except ConnectionClosed:
                return  # the other direction reports the upstream's close

    async def upstream_to_client(self, group: anyio.CancelScope) -> None:
        """Upstream messages to the client until the upstream connection ends; then tell the
        client (unless done) and end the group."""
        try:
            while True:
                message = await self._upstream.recv()
                if isinstance(message, str):
                    await self.to_client({"type": "websocket.send", "text": message})
                else:
                    await self.to_client({"type": "websocket.send", "bytes": message})
        except ConnectionClosed as closed:
            await self.close_client(*_client_code(closed))
        group.cancel()


def _client_code(closed: ConnectionClosed) -> tuple[int, str]:
    """What the client is told when the upstream connection ended."""
    rcvd, sent = closed.rcvd, closed.sent
    if rcvd is not None and (sent is None or closed.rcvd_then_sent):
        return sendable(rcvd.code, lost=UPSTREAM_ERROR), rcvd.reason  # the upstream closed
    if sent is not None:  # our side of the upstream connection failed it (1002, 1009, 1011)
        return UPSTREAM_ERROR, _reason(f"upstream error: {sent.reason or sent.code}")
    return UPSTREAM_ERROR, "upstream connection lost"


async def reject_websocket(
    scope: Scope, send: Send, status: int, code: ErrorCode, message: str
) -> None:
    """Refuse the handshake with an `ErrorBody` answer (a close where the server cannot send an
    HTTP answer to an upgrade: 1008 for a 4xx, 1011 for a 5xx)."""
    body = ErrorBody.of(code, message).model_dump_json().encode()
    await _answer(scope, send, status, body, "application/json")


async def _answer(scope: Scope, send: Send, status: int, body: bytes, ctype: str) -> None:
    extensions = scope.get("extensions")
    if isinstance(extensions, dict) and "websocket.http.response" in extensions:
        headers = [(b"content-type", ctype.encode("latin-1"))]
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": headers})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": POLICY if status < 500 else UPSTREAM_ERROR})
