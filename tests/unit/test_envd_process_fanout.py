"""The slow-reader policy of envd process streams: bounded queues, merging, dropping."""

from __future__ import annotations

import pytest

from nestbox.envd.process.fanout import (
    MERGE_BYTES,
    EndInfo,
    Fanout,
    Output,
    Subscription,
    TooSlow,
)

END = EndInfo(exit_code=0, exited=True, status="exit status 0")


async def test_events_come_out_in_order() -> None:
    sub = Subscription(limit=8)
    sub.offer(Output("stdout", b"a"))
    sub.offer(Output("stderr", b"b"))
    sub.offer(END)
    assert await sub.next(1) == Output("stdout", b"a")
    assert await sub.next(1) == Output("stderr", b"b")
    assert await sub.next(1) == END


async def test_adjacent_chunks_of_one_stream_merge_while_queued() -> None:
    sub = Subscription(limit=1)
    assert sub.offer(Output("stdout", b"ab"))
    assert sub.offer(Output("stdout", b"cd"))
    assert await sub.next(1) == Output("stdout", b"abcd")
    assert not sub.dropped


async def test_merging_stops_at_merge_bytes() -> None:
    sub = Subscription(limit=8)
    sub.offer(Output("pty", b"x" * MERGE_BYTES))
    sub.offer(Output("pty", b"y"))
    assert await sub.next(1) == Output("pty", b"x" * MERGE_BYTES)
    assert await sub.next(1) == Output("pty", b"y")


async def test_a_full_queue_drops_the_subscriber() -> None:
    sub = Subscription(limit=2)
    assert sub.offer(Output("stdout", b"1"))
    assert sub.offer(Output("stderr", b"2"))
    assert not sub.offer(Output("stdout", b"3"))
    assert sub.dropped
    with pytest.raises(TooSlow):
        await sub.next(1)


async def test_the_end_event_is_accepted_even_when_full() -> None:
    sub = Subscription(limit=1)
    sub.offer(Output("stdout", b"1"))
    assert sub.offer(END)
    assert await sub.next(1) == Output("stdout", b"1")
    assert await sub.next(1) == END


async def test_idle_subscription_times_out_with_none() -> None:
    sub = Subscription(limit=1)
    assert await sub.next(0.01) is None


async def test_fanout_drops_only_the_slow_subscriber() -> None:
    fanout = Fanout(limit=2)
    slow, fast = fanout.subscribe(), fanout.subscribe()
    for i in range(5):
        fanout.publish(Output("stdout" if i % 2 else "stderr", str(i).encode()))
        assert await fast.next(1) == Output("stdout" if i % 2 else "stderr", str(i).encode())
    assert slow.dropped
    assert len(fanout) == 1
    fanout.publish(END)
    assert await fast.next(1) == END
    assert len(fanout) == 0
    with pytest.raises(TooSlow):
        await slow.next(1)
