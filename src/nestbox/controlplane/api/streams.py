"""Process output over WebSockets (sdk-request-map §2.5):

    WS /v1/capsules/{capsule_id}/exec/stream               first frame {"type": "start", "cmd",
                                                            "args", "envs"?, "cwd"?, "user"?}; later
                                                            {"type": "stop"} kills it
    WS /v1/capsules/{capsule_id}/processes/{sel}/stream    re-attach by pid or tag

Server frames, all JSON text: `{"type": "start", "pid"}`, `{"type": "stdout"|"stderr",
"data": <text>}`, `{"type": "exit", "exit_code"}`, `{"type": "error", "data"}`; the socket
closes after `exit` or `error`. Output is decoded as UTF-8 per stream, incrementally (a
character split across chunks stays whole; invalid bytes become U+FFFD). A client that goes
away leaves the process running (re-attach to it).
"""

from __future__ import annotations

import codecs
import logging
from typing import TYPE_CHECKING, Any

import anyio
from protobuf import Oneof
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from nestbox.controlplane.api import deps, wsconn
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.routing import Router
from nestbox.controlplane.errors import ControlPlaneError, InvalidRequest
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from starlette.websockets import WebSocket

    from nestbox.controlplane.services.targets import Target

log = logging.getLogger(__name__)


def error_frame(message: str) -> dict[str, Any]:
    return {"type": "error", "data": message}


async def exec_stream(ws: WebSocket) -> None:
    capsule_id = deps.path_param(ws, "capsule_id")
    processes = deps.services(ws).processes
    target = await wsconn.open_session(
        ws, lambda p: processes.running(p, capsule_id), error_frame=error_frame
    )
    if target is None:
        return
    try:
        start = await wsconn.receive_json(ws)
        cmd, args, envs, cwd, user = _start_fields(start)
    except InvalidRequest as err:
        await wsconn.refuse(ws, err, error_frame)
        return
    except WebSocketDisconnect:
        return
    events = processes.exec_stream(target, cmd, args, envs=envs, cwd=cwd, user=user)
    await relay(ws, target, events, stoppable=True)


async def attach_process(ws: WebSocket) -> None:
    capsule_id = deps.path_param(ws, "capsule_id")
    which = deps.path_param(ws, "selector")
    processes = deps.services(ws).processes
    target = await wsconn.open_session(
        ws, lambda p: processes.running(p, capsule_id), error_frame=error_frame
    )
    if target is None:
        return
    await relay(ws, target, processes.connect(target, which), stoppable=False)


def _start_fields(
    doc: dict[str, Any],
) -> tuple[str, list[str], dict[str, str], str | None, str | None]:
    """:raise InvalidRequest: not a well-formed `start` frame."""
    cmd, args = doc.get("cmd"), doc.get("args") or []
    envs, cwd, user = doc.get("envs") or {}, doc.get("cwd"), doc.get("user")
    if doc.get("type") != "start" or not isinstance(cmd, str) or not cmd:
        raise InvalidRequest('the first frame must be {"type": "start", "cmd": …}')
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidRequest("args must be a list of strings")
    if not isinstance(envs, dict) or not all(isinstance(v, str) for v in envs.values()):
        raise InvalidRequest("envs must map names to strings")
    if cwd is not None and not isinstance(cwd, str):
        raise InvalidRequest("cwd must be a string")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("user must be a string")
    return cmd, args, {str(k): v for k, v in envs.items()}, cwd, user


class _Decoders:
    """One incremental UTF-8 decoder per output stream."""

    def __init__(self) -> None:
        self._d = {name: codecs.getincrementaldecoder("utf-8")("replace")
                   for name in ("stdout", "stderr")}  # fmt: skip

    def text(self, stream: str, data: bytes, *, final: bool = False) -> str:
        return str(self._d[stream].decode(data, final))


async def relay(
    ws: WebSocket, target: Target, events: AsyncIterator[Any], *, stoppable: bool
) -> None:
    """Send `events` (ExecStream/ConnectProcess answers) as frames until the process ends,
    the stream fails or the client leaves; `{"type": "stop"}` kills it if `stoppable`."""
    pid: list[int] = []
    decoders = _Decoders()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_client, ws, target, pid, stoppable, tg.cancel_scope.cancel)
        tg.start_soon(wsconn.watch_credentials, ws, tg.cancel_scope.cancel, error_frame)
        try:
            async for message in events:
                event = message.event.event if message.event else None
                if not await _forward(ws, event, pid, decoders):
                    break
        except ControlPlaneError as err:
            await wsconn.send_json(ws, error_frame(err.message))
        tg.cancel_scope.cancel()
    await wsconn.close(ws)


async def _forward(ws: WebSocket, event: Oneof[Any, Any] | None, pid: list[int],
                   decoders: _Decoders) -> bool:  # fmt: skip
    """Send one event's frame; False once the stream is over (exit, or the client left)."""
    if event is None:
        return True
    if event.field == "started":
        pid.append(event.value.pid)
        return await wsconn.send_json(ws, {"type": "start", "pid": event.value.pid})
    if event.field in ("stdout", "stderr"):
        text = decoders.text(event.field, event.value)
        return not text or await wsconn.send_json(ws, {"type": event.field, "data": text})
    if event.field == "exited":
        for stream in ("stdout", "stderr"):
            rest = decoders.text(stream, b"", final=True)
            if rest:
                await wsconn.send_json(ws, {"type": stream, "data": rest})
        await wsconn.send_json(ws, {"type": "exit", "exit_code": event.value.exit_code})
        return False
    return True


async def _watch_client(
    ws: WebSocket, target: Target, pid: list[int], stoppable: bool, stop: Callable[[], None]
) -> None:
    """Read the client's frames: a `stop` kills the process; leaving ends the relay."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            stop()
            return
        try:
            kind = wsconn.parse_json(message.get("text")).get("type")
        except InvalidRequest:
            continue
        if kind == "stop" and stoppable and pid:
            selector = Oneof[Any, int]("pid", pid[0])
            try:
                await target.agent.kill_process(pb.KillProcessRequest(
                    capsule_id=target.capsule.id, selector=selector, signal="SIGKILL"))  # fmt: skip
            except ControlPlaneError as err:
                await wsconn.send_json(ws, error_frame(err.message))


router = Router(
    tag="streams",
    routes=[
        WebSocketRoute(CAPSULE + "/exec/stream", exec_stream),
        WebSocketRoute(CAPSULE + "/processes/{selector}/stream", attach_process),
    ],
)
