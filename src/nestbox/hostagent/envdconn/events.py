"""Process and PTY events as plain values, and the bounded stream that delivers them.

An `EventStream` reads one envd `Start`/`Connect` stream in its own task into a queue of
`EVENT_QUEUE` (256) events, the seed's channel size. When the consumer lags, the queue fills and
the reader stops reading: TCP pushes back to envd, which drops the stream with `TooSlow` once
its own buffer is full, never stalling the process. Keepalive events are not passed on.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
from connectrpc.errors import ConnectError
from protobuf import Oneof

from nestbox.hostagent.envdconn.errors import EnvdCallError, Unavailable, from_connect
from nestbox.protocol.gen.process.process_pb import ProcessEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

EVENT_QUEUE = 256


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class Output:
    stream: Literal["stdout", "stderr", "pty"]
    data: bytes


@dataclass(frozen=True, slots=True)
class Ended:
    exit_code: int
    exited: bool
    """False when a signal ended the process (`status` says which)."""
    status: str
    error: str | None = None


Event = Started | Output | Ended


class _HasEvent(Protocol):
    """`StartResponse` and `ConnectResponse` alike."""

    @property
    def event(self) -> ProcessEvent | None: ...


def convert(event: ProcessEvent | None, tag: str | None) -> Event | None:
    """The value for one envd event; None for keepalives and empty events."""
    match event.event if event is not None else None:
        case Oneof("start", ProcessEvent.StartEvent() as start):
            return Started(pid=start.pid, tag=tag)
        case Oneof("data", ProcessEvent.DataEvent() as data):
            match data.output:
                case Oneof("stdout", bytes() as chunk):
                    return Output("stdout", chunk)
                case Oneof("stderr", bytes() as chunk):
                    return Output("stderr", chunk)
                case Oneof("pty", bytes() as chunk):
                    return Output("pty", chunk)
        case Oneof("end", ProcessEvent.EndEvent() as end):
            error = end.error if end.has_field("error") else None
            return Ended(end.exit_code, exited=end.exited, status=end.status, error=error)
    return None


class EventStream:
    """The events of one process, in order: `Started`, `Output`..., `Ended`.

    Get one from `CapsuleEnvd.exec_stream` / `connect_process` / `pty_attach` with `async with`;
    entering waits for `Started` (so a refused start raises there) and sets `pid` and `tag`.
    Iterating raises the `EnvdCallError` that broke the stream, if one did. Leaving the block
    stops reading; the process itself keeps running in the capsule (envd owns it).
    """

    def __init__(self, receive: MemoryObjectReceiveStream[Event | EnvdCallError]) -> None:
        self._receive = receive
        self._pending: list[Event] = []
        self.pid = 0
        self.tag: str | None = None
        self.ended: Ended | None = None
        """The `Ended` event once it has been read."""

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._pending:
            return self._pending.pop(0)
        try:
            item = await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        if isinstance(item, EnvdCallError):
            raise item
        if isinstance(item, Started):
            self.pid, self.tag = item.pid, item.tag
        elif isinstance(item, Ended):
            self.ended = item
        return item

    async def wait_started(self) -> Started:
        """Read up to `Started` and keep it for the consumer.

        :raise EnvdCallError: the stream failed or did not begin with `start`.
        """
        try:
            first = await anext(self)
        except StopAsyncIteration:
            raise Unavailable("envd closed the process stream before it started") from None
        if not isinstance(first, Started):
            raise Unavailable(f"envd's process stream began with {type(first).__name__}")
        self._pending.append(first)
        return first

    def queued(self) -> int:
        """Events read from envd and not yet taken by the consumer."""
        return self._receive.statistics().current_buffer_used + len(self._pending)


@asynccontextmanager
async def open_event_stream(
    responses: AsyncIterator[_HasEvent], tag: str | None
) -> AsyncIterator[EventStream]:
    """Read `responses` in a task into a bounded queue; wait for `Started`, then yield."""
    send, receive = anyio.create_memory_object_stream[Event | EnvdCallError](EVENT_QUEUE)
    async with receive, task_group() as tg:  # the pump stops before the queue closes
        tg.start_soon(_pump, responses, send, tag)
        stream = EventStream(receive)
        await stream.wait_started()
        yield stream
        tg.cancel_scope.cancel()


@asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    """An anyio task group for children that never raise: an exception of the body comes out
    as itself, not wrapped in an `ExceptionGroup` (cancellation always passes untouched)."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except ExceptionGroup as group:
        if len(group.exceptions) == 1:
            only = group.exceptions[0]
            raise only from only.__cause__
        raise


async def _pump(
    responses: AsyncIterator[_HasEvent],
    send: MemoryObjectSendStream[Event | EnvdCallError],
    tag: str | None,
) -> None:
    async with send:
        try:
            async for response in responses:
                event = convert(response.event, tag)
                if event is not None:
                    await send.send(event)
        except ConnectError as err:
            await send.send(from_connect(err))
        except anyio.BrokenResourceError:
            pass  # the consumer is gone
        finally:
            await aclose_quietly(responses)


async def aclose_quietly(it: object) -> None:
    """Close an async generator now (releasing its HTTP response), even under cancellation."""
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()
