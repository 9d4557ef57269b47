"""envd's `process.Process` Connect service (E2B's envd contract).

Start and Connect stream `start{pid}`, then output as it is produced, then `end`, with a
keepalive event whenever the stream has been idle for the `Keepalive-Ping-Interval` header's
seconds (30 if absent). A stream that falls `stream_buffer` events behind is dropped with
`resource_exhausted` ("stream reader too slow"); the process never waits for it (see `fanout`).
Processes belong to the registry, not to the stream: a client that disconnects (connectrpc then
cancels the handler) leaves its process running, to be re-attached with Connect.

Every failure leaves as an explicit `ConnectError` (`errors.connect_errors`): envd's own errors
with their code, anything unexpected as `internal` with a generic message (the cause goes to the
log).
"""

from __future__ import annotations

import logging
import signal
from contextlib import aclosing
from typing import TYPE_CHECKING, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from nestbox.envd.errors import InvalidArgument, NotFound, connect_errors
from nestbox.envd.process.fanout import EndInfo, Output, TooSlow
from nestbox.envd.process.request import build_spec, keepalive_interval, request_user
from nestbox.protocol.gen.process.process_connect import Process
from nestbox.protocol.gen.process.process_pb import (
    CloseStdinResponse,
    ConnectResponse,
    ListResponse,
    ProcessConfig,
    ProcessEvent,
    ProcessInfo,
    SendInputResponse,
    SendSignalResponse,
    Signal,
    StartResponse,
    StreamInputRequest,
    StreamInputResponse,
    UpdateResponse,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator

    from connectrpc.request import RequestContext

    from nestbox.envd.process.fanout import Subscription
    from nestbox.envd.process.proc import ManagedProcess
    from nestbox.envd.process.registry import ProcessRegistry
    from nestbox.envd.state import Runtime
    from nestbox.protocol.gen.process.process_pb import (
        CloseStdinRequest,
        ConnectRequest,
        ListRequest,
        ProcessInput,
        ProcessSelector,
        SendInputRequest,
        SendSignalRequest,
        StartRequest,
        UpdateRequest,
    )

    StdoutOneof = Oneof[Literal["stdout"], bytes]
    StderrOneof = Oneof[Literal["stderr"], bytes]
    PtyOneof = Oneof[Literal["pty"], bytes]

log = logging.getLogger(__name__)

SIGNALS = {Signal.SIGTERM: signal.SIGTERM, Signal.SIGKILL: signal.SIGKILL}
TOO_SLOW = "stream reader too slow"


class ProcessService(Process):
    """Implements the generated `Process` protocol on top of the runtime's `ProcessRegistry`."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @property
    def _registry(self) -> ProcessRegistry:
        return self._runtime.processes

    async def list(
        self, request: ListRequest, ctx: RequestContext[ListRequest, ListResponse]
    ) -> ListResponse:
        return ListResponse(processes=[_info(p) for p in self._registry.running()])

    async def start(
        self, request: StartRequest, ctx: RequestContext[StartRequest, StartResponse]
    ) -> AsyncIterator[StartResponse]:
        headers = dict(ctx.request_headers)
        with connect_errors():
            user = await request_user(headers, self._runtime)
            spec = build_spec(request, self._runtime, user)
            proc, sub = await self._registry.start(spec)
        async with aclosing(_follow(proc, sub, keepalive_interval(headers))) as events:
            async for event in events:
                yield StartResponse(event=event)

    async def connect(
        self, request: ConnectRequest, ctx: RequestContext[ConnectRequest, ConnectResponse]
    ) -> AsyncIterator[ConnectResponse]:
        with connect_errors():
            proc = self._registry.lookup(_selector(request.process))
        sub = proc.subscribe() if proc.running else None
        interval = keepalive_interval(ctx.request_headers)
        async with aclosing(_follow(proc, sub, interval)) as events:
            async for event in events:
                yield ConnectResponse(event=event)

    async def update(
        self, request: UpdateRequest, ctx: RequestContext[UpdateRequest, UpdateResponse]
    ) -> UpdateResponse:
        with connect_errors():
            proc = self._running(request.process)
            if not proc.is_pty:
                raise InvalidArgument("the process has no PTY to resize")
            if request.pty is not None and request.pty.size is not None:
                proc.resize(request.pty.size.cols, request.pty.size.rows)
        return UpdateResponse()

    async def stream_input(
        self,
        request: AsyncIterator[StreamInputRequest],
        ctx: RequestContext[StreamInputRequest, StreamInputResponse],
    ) -> StreamInputResponse:
        with connect_errors():
            proc: ManagedProcess | None = None
            async for message in request:
                match message.event:
                    case Oneof("start", StreamInputRequest.StartEvent() as start):
                        if proc is not None:
                            raise InvalidArgument("the process was already selected")
                        proc = self._running(start.process)
                    case Oneof("data", StreamInputRequest.DataEvent() as data):
                        if proc is None:
                            raise InvalidArgument("the first message must select the process")
                        await _write(proc, data.input)
                    case _:
                        pass  # keepalive
        return StreamInputResponse()

    async def send_input(
        self, request: SendInputRequest, ctx: RequestContext[SendInputRequest, SendInputResponse]
    ) -> SendInputResponse:
        with connect_errors():
            await _write(self._running(request.process), request.input)
        return SendInputResponse()

    async def send_signal(
        self,
        request: SendSignalRequest,
        ctx: RequestContext[SendSignalRequest, SendSignalResponse],
    ) -> SendSignalResponse:
        with connect_errors():
            sig = SIGNALS.get(request.signal)
            if sig is None:
                raise InvalidArgument("signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL")
            self._running(request.process).signal(sig)
        return SendSignalResponse()

    async def close_stdin(
        self,
        request: CloseStdinRequest,
        ctx: RequestContext[CloseStdinRequest, CloseStdinResponse],
    ) -> CloseStdinResponse:
        with connect_errors():
            await self._running(request.process).close_stdin()
        return CloseStdinResponse()

    def _running(self, selector: ProcessSelector | None) -> ManagedProcess:
        """:raise NotFound: no such process, or it has ended."""
        proc = self._registry.lookup(_selector(selector))
        if not proc.running:
            raise NotFound(f"process {proc.pid} has ended")
        return proc


async def _follow(
    proc: ManagedProcess, sub: Subscription | None, interval: float
) -> AsyncGenerator[ProcessEvent, None]:
    """`start`, then the subscription's events (keepalives when idle) up to `end`.

    With no subscription (the process had already ended), `start` and its `end`.
    """
    try:
        yield _start_event(proc.pid)
        if sub is None:
            assert proc.end is not None
            yield _event(proc.end)
            return
        while True:
            try:
                item = await sub.next(interval)
            except TooSlow:
                log.warning("dropped a stream of process %d: reader too slow", proc.pid)
                raise ConnectError(Code.RESOURCE_EXHAUSTED, TOO_SLOW) from None
            if item is None:
                yield KEEPALIVE
                continue
            yield _event(item)
            if isinstance(item, EndInfo):
                return
    finally:
        if sub is not None:
            proc.unsubscribe(sub)


def _start_event(pid: int) -> ProcessEvent:
    start: Oneof[Literal["start"], ProcessEvent.StartEvent] = Oneof(
        "start", ProcessEvent.StartEvent(pid=pid)
    )
    return ProcessEvent(event=start)


def _keepalive_event() -> ProcessEvent:
    keepalive: Oneof[Literal["keepalive"], ProcessEvent.KeepAlive] = Oneof(
        "keepalive", ProcessEvent.KeepAlive()
    )
    return ProcessEvent(event=keepalive)


KEEPALIVE = _keepalive_event()


def _event(item: Output | EndInfo) -> ProcessEvent:
    if isinstance(item, Output):
        data: Oneof[Literal["data"], ProcessEvent.DataEvent] = Oneof(
            "data", ProcessEvent.DataEvent(output=_output(item))
        )
        return ProcessEvent(event=data)
    end: Oneof[Literal["end"], ProcessEvent.EndEvent] = Oneof(
        "end",
        ProcessEvent.EndEvent(
            exit_code=item.exit_code, exited=item.exited, status=item.status, error=item.error
        ),
    )
    return ProcessEvent(event=end)


def _output(item: Output) -> StdoutOneof | StderrOneof | PtyOneof:
    match item.stream:
        case "stdout":
            stdout: StdoutOneof = Oneof("stdout", item.data)
            return stdout
        case "stderr":
            stderr: StderrOneof = Oneof("stderr", item.data)
            return stderr
        case "pty":
            pty: PtyOneof = Oneof("pty", item.data)
            return pty


async def _write(proc: ManagedProcess, data: ProcessInput | None) -> None:
    """:raise InvalidArgument: no input, or PTY input for a process without a PTY."""
    match data.input if data is not None else None:
        case Oneof("stdin", bytes() as raw):
            await proc.write(raw)
        case Oneof("pty", bytes() as raw):
            if not proc.is_pty:
                raise InvalidArgument("the process has no PTY; send stdin input instead")
            await proc.write(raw)
        case _:
            raise InvalidArgument("input (stdin or pty bytes) is required")


def _selector(selector: ProcessSelector | None) -> int | str:
    """:raise InvalidArgument: the selector names neither a pid nor a tag."""
    match selector.selector if selector is not None else None:
        case Oneof("pid", int() as pid):
            return pid
        case Oneof("tag", str() as tag):
            return tag
        case _:
            raise InvalidArgument("a process selector (pid or tag) is required")


def _info(proc: ManagedProcess) -> ProcessInfo:
    spec = proc.spec
    config = ProcessConfig(cmd=spec.cmd, args=list(spec.args), envs=dict(spec.envs), cwd=spec.cwd)
    return ProcessInfo(config=config, pid=proc.pid, tag=spec.tag)
