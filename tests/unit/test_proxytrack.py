"""The host-side proxy connection tracker (seed `internal/sandbox/conntracker.go`)."""

from __future__ import annotations

import anyio
import pytest

from nestbox.hostagent.proxytrack import ConnTracker, Draining, TargetUnavailable


def test_acquire_release_counts() -> None:
    tracker = ConnTracker()
    tracker.acquire()
    tracker.acquire()
    assert tracker.statistics().active == 2
    tracker.release()
    tracker.release()
    assert tracker.statistics().active == 0
    with pytest.raises(RuntimeError):
        tracker.release()


async def test_drain_with_nothing_in_flight_returns_at_once() -> None:
    tracker = ConnTracker()
    assert await tracker.drain(timeout_s=0)
    assert tracker.statistics().draining


async def test_draining_refuses_new_requests_until_reset() -> None:
    tracker = ConnTracker()
    await tracker.drain(timeout_s=0)
    with pytest.raises(Draining):
        tracker.acquire()
    assert issubclass(Draining, TargetUnavailable)
    assert tracker.statistics().active == 0  # the refused acquire left no count behind
    tracker.reset()
    tracker.acquire()
    assert tracker.statistics().active == 1


async def test_drain_waits_for_in_flight_requests() -> None:
    tracker = ConnTracker()
    tracker.acquire()
    tracker.acquire()
    results: list[bool] = []
    async with anyio.create_task_group() as tg:

        async def drain() -> None:
            results.append(await tracker.drain(timeout_s=60))

        tg.start_soon(drain)
        await anyio.wait_all_tasks_blocked()
        tracker.release()
        await anyio.wait_all_tasks_blocked()
        assert results == []  # one is still in flight
        tracker.release()
    assert results == [True]
    assert tracker.statistics().draining  # still refusing until reset


async def test_drain_gives_up_at_the_timeout() -> None:
    tracker = ConnTracker()
    tracker.acquire()
    assert not await tracker.drain(timeout_s=0)
    assert tracker.statistics().active == 1


async def test_reset_wakes_a_waiting_drain() -> None:
    tracker = ConnTracker()
    tracker.acquire()
    results: list[bool] = []
    async with anyio.create_task_group() as tg:

        async def drain() -> None:
            results.append(await tracker.drain(timeout_s=60))

        tg.start_soon(drain)
        await anyio.wait_all_tasks_blocked()
        tracker.reset()
    assert results == [False]
    assert not tracker.statistics().draining
