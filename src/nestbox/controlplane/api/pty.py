"""Terminals over a WebSocket: `WS /v1/capsules/{capsule_id}/pty` (sdk-request-map §2.7).

Client, first frame: `{"type": "start", "cmd"="/bin/bash", "args"?, "cols"=80, "rows"=24,
"envs"?, "cwd"?, "user"?}` or `{"type": "connect", "tag"}` (re-attach: the terminal outlives
its socket). Then: **binary frames** are input, as are `{"type": "input", "data": <base64>}`
frames; `{"type": "resize", "cols", "rows"}`, `{"type": "kill"}`, `{"type": "pong"}`.

Server: `{"type": "started", "tag", "pid"}`, output as **binary frames**, `{"type": "exit",
"exit_code"}` (then close), `{"type": "error", "data", "fatal"}`, and `{"type": "ping"}` every
30 s. Input is forwarded in order, one frame at a time. Credentials that stop working while the
terminal is open (`wsconn.watch_credentials`) end the session: an error frame, close 1008.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING, Any

import anyio
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from nestbox.controlplane.api import deps, wsconn
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.routing import Router
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest
from nestbox.controlplane.services.processes import PtyStart

if TYPE_CHECKING:
    from starlette.types import Message
    from starlette.websockets import WebSocket

    from nestbox.controlplane.services.targets import Target

log = logging.getLogger(__name__)

PING_INTERVAL_S = 30.0
MAX_SIZE = 4096


def error_frame(message: str, *, fatal: bool = True) -> dict[str, Any]:
    return {"type": "error", "data": message, "fatal": fatal}


async def pty_session(ws: WebSocket) -> None:
    capsule_id = deps.path_param(ws, "capsule_id")
    processes = deps.services(ws).processes
    target = await wsconn.open_session(
        ws, lambda p: processes.running(p, capsule_id), error_frame=error_frame
    )
    if target is None:
        return
    try:
        start = parse_start(await wsconn.receive_json(ws))
    except InvalidRequest as err:
        await wsconn.refuse(ws, err, error_frame)
        return
    except WebSocketDisconnect:
        return
    await _Session(ws, target).run(start)


def parse_start(doc: dict[str, Any]) -> PtyStart:
    """:raise InvalidRequest: neither a `start` nor a `connect` frame."""
    kind = doc.get("type")
    if kind == "connect":
        tag = doc.get("tag")
        if not isinstance(tag, str) or not tag:
            raise InvalidRequest("connect needs the terminal's tag")
        return PtyStart(cmd=None, tag=tag)
    if kind != "start":
        raise InvalidRequest('the first frame must be {"type": "start"} or {"type": "connect"}')
    cmd, args, envs = doc.get("cmd") or "/bin/bash", doc.get("args") or [], doc.get("envs") or {}
    if not isinstance(cmd, str) or not isinstance(args, list) or not isinstance(envs, dict):
        raise InvalidRequest("cmd must be a string, args a list, envs an object")
    cwd, user = doc.get("cwd"), doc.get("user")
    return PtyStart(
        cmd=cmd, args=[str(a) for a in args], tag=str(doc.get("tag") or ""),
        cols=_size(doc.get("cols"), 80), rows=_size(doc.get("rows"), 24),
        envs={str(k): str(v) for k, v in envs.items()},
        cwd=cwd if isinstance(cwd, str) else None, user=user if isinstance(user, str) else None,
    )  # fmt: skip


def _size(value: object, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise InvalidRequest(f"cols and rows must be between 1 and {MAX_SIZE}")
    return value


class _Session:
    """One socket attached to one terminal."""

    def __init__(self, ws: WebSocket, target: Target) -> None:
        self.ws = ws
        self.target = target
        self.tag = ""
        self.started = anyio.Event()

    async def run(self, start: PtyStart) -> None:
        events = deps.services(self.ws).processes.pty_attach(self.target, start)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._client, tg.cancel_scope)
            tg.start_soon(self._pings)
            tg.start_soon(wsconn.watch_credentials, self.ws, tg.cancel_scope.cancel, error_frame)
            try:
                async for message in events:
                    event = message.event.event if message.event else None
                    if event is not None and not await self._forward(event.field, event.value):
                        break
            except ControlPlaneError as err:
                await wsconn.send_json(self.ws, error_frame(err.message))
            tg.cancel_scope.cancel()
        await wsconn.close(self.ws)

    async def _forward(self, kind: str, value: Any) -> bool:
        """One event to the client; False when the session is over."""
        if kind == "started":
            self.tag = value.tag
            self.started.set()
            frame = {"type": "started", "tag": value.tag, "pid": value.pid}
            return await wsconn.send_json(self.ws, frame)
        if kind in ("pty", "stdout", "stderr"):
            return await wsconn.send_bytes(self.ws, value)
        if kind == "exited":
            await wsconn.send_json(self.ws, {"type": "exit", "exit_code": value.exit_code})
            return False
        return True

    async def _pings(self) -> None:
        while True:
            await anyio.sleep(PING_INTERVAL_S)
            await wsconn.send_json(self.ws, {"type": "ping"})

    async def _client(self, scope: anyio.CancelScope) -> None:
        """The client's frames, in order; leaving ends the session (the terminal lives on)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                scope.cancel()
                return
            try:
                await self._handle(message)
            except ControlPlaneError as err:
                await wsconn.send_json(self.ws, error_frame(err.message, fatal=False))

    async def _handle(self, message: Message) -> None:
        data = message.get("bytes")
        if isinstance(data, bytes):
            await self._input(data)
            return
        doc = wsconn.parse_json(message.get("text"))
        kind = doc.get("type")
        if kind == "input":
            try:
                await self._input(base64.b64decode(str(doc.get("data") or ""), validate=True))
            except binascii.Error:
                raise InvalidRequest("input data must be base64") from None
        elif kind == "resize":
            cols, rows = _size(doc.get("cols"), 0), _size(doc.get("rows"), 0)
            await self.started.wait()
            await self.target.agent.pty_resize(self.target.capsule.id, self.tag, cols, rows)
        elif kind == "kill":
            await self.started.wait()
            await self.target.agent.pty_kill(self.target.capsule.id, self.tag)
        elif kind not in ("pong", "ping"):
            raise InvalidRequest(f"unknown frame type {kind!r}")

    async def _input(self, data: bytes) -> None:
        if data:
            await self.started.wait()
            await self.target.agent.pty_send_input(self.target.capsule.id, self.tag, data)


router = Router(tag="pty", routes=[WebSocketRoute(CAPSULE + "/pty", pty_session)])
