"""Fan-out of one process's events to its subscribers (Start and Connect streams).

Slow-reader policy: the output pump never waits for a subscriber. Each subscription buffers at
most `limit` events (`EnvdSettings.stream_buffer`, 256 by default); adjacent output chunks of the
same stream are merged up to `MERGE_BYTES` while they wait, so a chatty process uses few slots.
When a subscriber's buffer is full the next event drops that subscriber: its backlog is discarded
and its stream ends with `TooSlow` (Connect `resource_exhausted`, "stream reader too slow"),
while the process and every other subscriber go on. The final `EndInfo` is always accepted, so a
reader that keeps up until the end is never dropped for the end event alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Literal

MERGE_BYTES = 64 * 1024
"""Queued output chunks of one stream are merged while the result stays below this size."""

StreamName = Literal["stdout", "stderr", "pty"]


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of output, as read from the process."""

    stream: StreamName
    data: bytes


@dataclass(frozen=True, slots=True)
class EndInfo:
    """How the process ended, in the words of Go's `os.ProcessState` (E2B's envd)."""

    exit_code: int
    exited: bool
    status: str
    error: str | None = None


Event = Output | EndInfo


class TooSlow(Exception):
    """The subscriber fell `limit` events behind and was dropped."""


class Subscription:
    """One reader's bounded queue of events."""

    def __init__(self, limit: int) -> None:
        self._items: deque[Event] = deque()
        self._limit = limit
        self._wake = asyncio.Event()
        self.dropped = False

    def offer(self, event: Event) -> bool:
        """Queue `event`; False (and the subscription is dropped) if the buffer is full."""
        if self.dropped:
            return False
        if isinstance(event, Output) and self._merge(event):
            return True
        if isinstance(event, Output) and len(self._items) >= self._limit:
            self.dropped = True
            self._items.clear()
            self._wake.set()
            return False
        self._items.append(event)
        self._wake.set()
        return True

    def _merge(self, event: Output) -> bool:
        if not self._items:
            return False
        last = self._items[-1]
        if not isinstance(last, Output) or last.stream != event.stream:
            return False
        if len(last.data) + len(event.data) > MERGE_BYTES:
            return False
        self._items[-1] = Output(event.stream, last.data + event.data)
        return True

    async def next(self, idle_s: float) -> Event | None:
        """The next event, or None after `idle_s` seconds without one (time for a keepalive).

        :raise TooSlow: this subscriber was dropped.
        """
        while not self._items:
            if self.dropped:
                raise TooSlow
            self._wake.clear()
            try:
                async with asyncio.timeout(idle_s):
                    await self._wake.wait()
            except TimeoutError:
                if not self._items and not self.dropped:
                    return None
        if self.dropped:
            raise TooSlow
        return self._items.popleft()


class Fanout:
    """The live subscriptions of one process; `publish` never blocks."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._subs: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        sub = Subscription(self._limit)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: Event) -> None:
        """Offer `event` to every subscriber, dropping those whose buffer is full."""
        for sub in list(self._subs):
            if not sub.offer(event):
                self._subs.discard(sub)
        if isinstance(event, EndInfo):
            self._subs.clear()
