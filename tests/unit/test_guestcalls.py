"""`GuestCalls.relay`: a relayed stream whose client leaves in the middle ends cleanly, and
never takes the manager's task group (the whole agent) down with it.

The case that did (found by opening and closing ~100-300 PTYs through the control plane): the
RPC client leaves while the pump waits for room in the relay channel, outside its source's
iterator. The source, an envd event stream, holds a task group; closing it from under a new
cancel scope exited that task group under the wrong scope: anyio's `RuntimeError` escaped the
pump and failed the manager's task group. The sources here are the agent's real ones
(`open_event_stream` over a Start response stream, an `aclosing` download generator); only the
capsule and its envd responses are stand-ins.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from protobuf import Oneof

from nestbox.hostagent.capsule import CapsuleState
from nestbox.hostagent.envdconn.events import Output, Started, open_event_stream
from nestbox.hostagent.errors import StreamInterrupted
from nestbox.hostagent.guestcalls import RELAY_QUEUE, GuestCalls
from nestbox.protocol.gen.process.process_pb import ProcessEvent, StartResponse

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import TaskGroup

CAPSULE = "cl-relay"
WITHIN_S = 10.0


@dataclass
class _Record:
    state: CapsuleState = CapsuleState.RUNNING
    error: str | None = None


@dataclass
class _Run:
    envd: Any = None


@dataclass
class _Capsule:
    """What `GuestCalls` reads of a `Capsule`."""

    id: str = CAPSULE
    record: _Record = field(default_factory=_Record)
    run: _Run = field(default_factory=_Run)
    calls: set[anyio.CancelScope] = field(default_factory=set)
    touches: int = 0

    @property
    def state(self) -> CapsuleState:
        return self.record.state

    def touch(self) -> None:
        self.touches += 1


class _Runtime:
    def __init__(self, entry: _Capsule) -> None:
        self.entry = entry

    def get(self, capsule_id: str) -> _Capsule:
        assert capsule_id == CAPSULE
        return self.entry


class _Calls(GuestCalls):
    def __init__(self, tg: TaskGroup, entry: _Capsule) -> None:
        self._tg = tg
        self.runtime = _Runtime(entry)  # type: ignore[assignment]


@dataclass
class _Envd:
    """A Start response stream that never ends by itself: a start, then output for ever."""

    produced: int = 0
    closed: anyio.Event = field(default_factory=anyio.Event)

    async def responses(self) -> AsyncIterator[StartResponse]:
        try:
            yield StartResponse(
                event=ProcessEvent(event=Oneof("start", ProcessEvent.StartEvent(pid=7)))
            )
            while True:
                data = ProcessEvent.DataEvent(output=Oneof("pty", b"x" * 64))
                yield StartResponse(event=ProcessEvent(event=Oneof("data", data)))
                self.produced += 1
        finally:
            self.closed.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"y" * 1024
                self.produced += 1
        finally:
            self.closed.set()


async def _stalled(envd: _Envd) -> None:
    """Until the producer stops: every buffer between it and the unread relay is full."""
    with anyio.fail_after(WITHIN_S):
        while True:
            before = envd.produced
            await anyio.sleep(0.05)
            if envd.produced == before and before > RELAY_QUEUE:
                return


@pytest.mark.parametrize("kind", ["event stream", "download"])
async def test_a_client_leaving_while_the_pump_waits_ends_only_its_stream(kind: str) -> None:
    entry = _Capsule()
    envd = _Envd()

    def source(_: object) -> Any:
        if kind == "event stream":
            return open_event_stream(envd.responses(), "pty-1")
        return aclosing(envd.chunks())

    async with anyio.create_task_group() as tg:
        calls = _Calls(tg, entry)
        stream = calls.relay(CAPSULE, source)
        first = await anext(stream)
        assert first == (Started(pid=7, tag="pty-1") if kind == "event stream" else b"y" * 1024)
        await _stalled(envd)  # the pump now waits in `send`, its source suspended
        await stream.aclose()  # the RPC client left
        with anyio.fail_after(WITHIN_S):
            await envd.closed.wait()  # the envd response was let go
        assert entry.calls == set()
        # the manager's task group still works: another relay runs through it
        again = _Envd()
        more = calls.relay(CAPSULE, lambda _: open_event_stream(again.responses(), "pty-2"))
        assert await anext(more) == Started(pid=7, tag="pty-2")
        assert isinstance(await anext(more), Output)
        await more.aclose()
        tg.cancel_scope.cancel()


async def test_a_pause_cuts_a_relayed_stream_with_stream_interrupted() -> None:
    entry = _Capsule()
    envd = _Envd()
    async with anyio.create_task_group() as tg:
        calls = _Calls(tg, entry)
        stream = calls.relay(CAPSULE, lambda _: open_event_stream(envd.responses(), "pty-1"))
        await anext(stream)
        await _stalled(envd)
        for scope in list(entry.calls):  # what `Capsule.interrupt_calls` does at a pause
            scope.cancel()
        with anyio.fail_after(WITHIN_S):
            with pytest.raises(StreamInterrupted):
                async for _ in stream:
                    pass
            await envd.closed.wait()
        tg.cancel_scope.cancel()
