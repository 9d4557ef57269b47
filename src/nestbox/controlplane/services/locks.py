"""Per-object locks for lifecycle verbs: two pauses of one capsule are serialised, calls on
different capsules never are. Locks exist only while someone holds or waits for them."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class KeyedLocks:
    def __init__(self) -> None:
        # key -> (lock, holders and waiters); an entry lives while its count is above zero.
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    def held(self, key: str) -> bool:
        """Whether a call of this process holds (or waits for) `key`'s lock right now."""
        return key in self._locks

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (anyio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
