"""`common.batches`: chunks regrouped into batches of a minimum size, nothing lost or copied."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.common.batches import batches

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


async def stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def collect(*chunks: bytes, size: int) -> list[list[bytes]]:
    return [batch async for batch in batches(stream(*chunks), size)]


async def test_batches_hold_at_least_size_bytes_and_the_rest_last() -> None:
    a, b, c, d = b"a" * 3, b"b" * 4, b"c" * 5, b"d" * 2
    got = await collect(a, b, b"", c, d, size=6)
    assert got == [[a, b], [c, d]]
    assert all(chunk is orig for chunk, orig in zip(got[0] + got[1], (a, b, c, d), strict=True))


async def test_a_short_tail_and_empty_streams() -> None:
    assert await collect(b"x" * 10, b"y", size=10) == [[b"x" * 10], [b"y"]]
    assert await collect(size=4) == []
    assert await collect(b"", b"", size=4) == []
