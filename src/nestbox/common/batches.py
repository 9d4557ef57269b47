"""Streams of byte chunks regrouped into batches of a minimum size, without copying them: a
stream's per-item costs (a worker-thread hop in envd, a Connect message from the control plane)
are then paid once per batch instead of once per network read."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator


async def batches(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[list[bytes]]:
    """The non-empty chunks of `chunks`, in lists holding at least `size` bytes (the last may
    hold less; none is empty): at most `size` plus one chunk is held at a time."""
    held: list[bytes] = []
    n = 0
    async for chunk in chunks:
        if chunk:
            held.append(chunk)
            n += len(chunk)
            if n >= size:
                yield held
                held, n = [], 0
    if held:
        yield held
