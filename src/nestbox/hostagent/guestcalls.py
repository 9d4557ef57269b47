"""Calls into a running capsule's envd on behalf of RPCs: one-shot calls and relayed streams.

Both count as activity (the idle reaper's clock) and are registered with the capsule, so a
pause can cut them once the VM has stopped (their sockets are dead then; the caller gets
`unavailable`) instead of leaving them to hang until a TCP keepalive gives up.

A relayed stream (exec stream, PTY, process connect, file download) is read from envd by a
*pump* task that the manager's task group owns; the RPC handler, an async generator, only
receives from a small bounded channel. So no cancel scope or task group ever spans a `yield`
of the handler, and backpressure still flows end to end: a slow RPC client blocks the
handler, the channel fills, the pump stops reading, envd's own bounded buffer decides.

The pump enters its source as an async context manager in its own frame (an envd event stream
holds a task group; a file download, an `aclosing` generator), never through a generator that
yields inside one: closing such a generator from a `finally` under a new (shielding) cancel
scope exits its task group under the wrong scope, which anyio refuses with a `RuntimeError`
that escaped the pump and took the manager's task group, so the whole agent, down with it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, TypeVar

import anyio

from nestbox.hostagent.capsule import CapsuleState, InvalidState
from nestbox.hostagent.errors import CapsuleFailed, StreamInterrupted

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from contextlib import AbstractAsyncContextManager

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectSendStream

    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.envdconn import CapsuleEnvd
    from nestbox.hostagent.runtime import VmRuntime

log = logging.getLogger(__name__)

T = TypeVar("T")
RELAY_QUEUE = 16
"""Items between a pump and its RPC handler (envdconn already buffers 256 events)."""


class GuestCalls:
    """The guest-call half of `CapsuleManager`."""

    runtime: VmRuntime
    _tg: TaskGroup

    def _guest(self, capsule_id: str) -> tuple[Capsule, CapsuleEnvd]:
        """The capsule and its run's envd client. :raise CapsuleNotFound: :raise CapsuleFailed:
        :raise InvalidState: it is not running."""
        entry = self.runtime.get(capsule_id)
        state = entry.state
        if state == CapsuleState.ERROR:
            raise CapsuleFailed(f"capsule {capsule_id} failed: {entry.record.error}")
        if state != CapsuleState.RUNNING or entry.run is None:
            raise InvalidState(capsule_id, state, frozenset({CapsuleState.RUNNING}))
        return entry, entry.run.envd

    def touch(self, capsule_id: str) -> None:
        """PingCapsule: count as activity. :raise InvalidState: not running."""
        entry, _ = self._guest(capsule_id)
        entry.touch()

    async def call(self, capsule_id: str, fn: Callable[[CapsuleEnvd], Awaitable[T]]) -> T:
        """`fn(envd)` for a running capsule, as activity, cut by a pause.

        :raise CapsuleNotFound, InvalidState, CapsuleFailed, StreamInterrupted, EnvdCallError:
        """
        entry, envd = self._guest(capsule_id)
        entry.touch()
        try:
            with call_scope(entry):
                return await fn(envd)
        finally:
            entry.touch()
        raise StreamInterrupted(f"capsule {capsule_id}: the call was cut")

    async def relay(
        self,
        capsule_id: str,
        source: Callable[[CapsuleEnvd], AbstractAsyncContextManager[AsyncIterator[T]]],
    ) -> AsyncIterator[T]:
        """The items of the iterator `source(envd)` opens, read by a pump task (see the module
        docstring): an envd event stream, or a generator in `contextlib.aclosing`.

        Raises what the source raised (`EnvdCallError`...), or `StreamInterrupted` when a
        pause or destroy cut it. Closing this generator stops the pump.
        """
        entry, envd = self._guest(capsule_id)
        entry.touch()
        send, receive = anyio.create_memory_object_stream[T | Exception](RELAY_QUEUE)
        scope = anyio.CancelScope()
        entry.calls.add(scope)
        self._tg.start_soon(_pump, entry, scope, source(envd), send)
        try:
            with receive:
                async for item in receive:
                    if isinstance(item, Exception):
                        raise item
                    yield item
        finally:
            scope.cancel()
            entry.calls.discard(scope)


@contextlib.contextmanager
def call_scope(entry: Capsule) -> Iterator[anyio.CancelScope]:
    """A cancel scope that the end of the capsule's run cancels (`Capsule.interrupt_calls`); a
    call it cut raises `StreamInterrupted`. Use it only around code that runs in one task (no
    yields of an async generator inside)."""
    scope = anyio.CancelScope()
    entry.calls.add(scope)
    try:
        with scope:
            yield scope
    finally:
        entry.calls.discard(scope)
    if scope.cancelled_caught:
        raise StreamInterrupted(f"capsule {entry.id} was paused or stopped during the call")


async def _pump(
    entry: Capsule,
    scope: anyio.CancelScope,
    source: AbstractAsyncContextManager[AsyncIterator[T]],
    send: MemoryObjectSendStream[T | Exception],
) -> None:
    """Move the items `source` opens into `send` until they end, the receiver leaves or `scope`
    is cancelled. Never raises: whatever went wrong goes to the receiver."""
    gone = (anyio.BrokenResourceError, anyio.ClosedResourceError)
    with send:
        try:
            with scope:
                async with source as items:
                    async for item in items:
                        entry.touch()
                        await send.send(item)
        except gone:
            return
        except Exception as err:
            with contextlib.suppress(*gone):
                await send.send(err)
            return
        if scope.cancelled_caught:
            with contextlib.suppress(*gone):
                cut = f"capsule {entry.id} was paused or stopped; the stream ended"
                await send.send(StreamInterrupted(cut))
