"""Slot leases (`network.pool.SlotNetworks`): the warm pool, background teardown, and that
whatever happens nothing is left behind (FakeSystem records the commands: no root, no network).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from nestbox.hostagent.network import NoFreeSlot, SlotLease, SlotNetworks, SlotPool, egress
from nestbox.hostagent.settings import AgentSettings
from tests.fakes.system import FakeSystem

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


def settings(**kw: object) -> AgentSettings:
    return AgentSettings(**{"slot_count": 10, **kw})  # type: ignore[arg-type]


class _NoForwarder:
    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _fake_dns_forwarder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Egress slots get a DNS forwarder bound to the veth's address, which FakeSystem never
    makes (`test_network_plan.py` checks that it is opened and closed)."""

    async def open_forwarder(settings: AgentSettings, address: str) -> _NoForwarder:
        return _NoForwarder()

    monkeypatch.setattr(egress, "open_forwarder", open_forwarder)


@asynccontextmanager
async def networks(fake: FakeSystem, *, warm: int = 2, **kw: object) -> AsyncIterator[SlotNetworks]:
    s = settings(warm_slots=warm, **kw)
    async with anyio.create_task_group() as tg:
        pool = SlotNetworks(fake, s, SlotPool(s), tg, warm=warm, teardown_within=5)
        try:
            yield pool
        finally:
            await pool.aclose()
            tg.cancel_scope.cancel()


def live_netns(fake: FakeSystem, not_run: int | None = None) -> set[str]:
    """The namespaces the recorded commands leave behind (the failing command, and the one
    cancelled before it ran, made nothing)."""
    live: set[str] = set()
    for i, argv in enumerate(fake.commands):
        if i in (fake.fail_at, not_run):
            continue
        if argv[:3] == ("ip", "netns", "add"):
            live.add(argv[3])
        elif argv[:3] == ("ip", "netns", "del"):
            live.discard(argv[3])
    return live


def ns(slot: int) -> str:
    return f"nbx-a0-{slot}"


async def test_the_pool_fills_in_the_background_and_counts_as_free() -> None:
    fake = FakeSystem()
    async with networks(fake) as pool:
        assert pool.ready() == []  # nothing before start(): start-up cleanup comes first
        pool.start()
        await pool.settle()
        assert [lease.slot for lease in pool.ready()] == [1, 2]
        assert all(lease.warm for lease in pool.ready())
        assert live_netns(fake) == {ns(1), ns(2)}
        stats = pool.statistics()
        assert (stats.total, stats.in_use, stats.free) == (10, 0, 10)
    assert live_netns(fake) == set()  # aclose removes the warm leases


async def test_a_warm_lease_is_handed_out_at_once_and_refilled_later() -> None:
    fake = FakeSystem()
    async with networks(fake) as pool:
        pool.start()
        await pool.settle()
        commands = len(fake.commands)
        lease = await pool.acquire(egress=False)
        assert lease.warm
        assert lease.slot == 1
        assert len(fake.commands) == commands  # nothing built on the caller's path
        assert pool.statistics().in_use == 1
        await pool.settle()
        assert [le.slot for le in pool.ready()] == [2]  # no refill until the owner asks
        pool.refill()
        await pool.settle()
        assert [le.slot for le in pool.ready()] == [2, 3]
        lease.background_teardown = True
        await pool.release(lease)
        await pool.settle()
        assert live_netns(fake) == {ns(2), ns(3)}


async def test_egress_never_takes_a_warm_lease() -> None:
    fake = FakeSystem()
    async with networks(fake) as pool:
        pool.start()
        await pool.settle()
        lease = await pool.acquire(egress=True)
        assert not lease.warm
        assert lease.network.egress
        assert lease.slot == 3
        assert [le.slot for le in pool.ready()] == [1, 2]
        await pool.release(lease)
        assert live_netns(fake) == {ns(1), ns(2)}


async def test_without_warm_slots_every_lease_is_built_on_the_spot() -> None:
    fake = FakeSystem()
    async with networks(fake, warm=0) as pool:
        lease = await pool.acquire(egress=False)
        assert not lease.warm
        assert live_netns(fake) == {ns(1)}
        pool.refill()
        await pool.settle()
        assert pool.ready() == []
        await pool.release(lease)
        assert live_netns(fake) == set()
        assert pool.statistics().in_use == 0


def netns_del_waits_for(gate: anyio.Event) -> Callable[[int, tuple[str, ...]], Awaitable[None]]:
    """A `FakeSystem.before_run` under which `ip netns del` waits until `gate` is set."""

    async def before_run(_index: int, argv: tuple[str, ...]) -> None:
        if argv[:3] == ("ip", "netns", "del"):
            await gate.wait()

    return before_run


async def test_a_background_teardown_holds_the_slot_until_done_and_is_awaited() -> None:
    gate = anyio.Event()
    fake = FakeSystem(before_run=netns_del_waits_for(gate))
    async with networks(fake, warm=0) as pool:
        lease = await pool.acquire(egress=False)
        lease.background_teardown = True
        with anyio.fail_after(1):
            await pool.release(lease)  # returns before the network is gone
        await anyio.wait_all_tasks_blocked()  # the teardown is as far as it gets: at the gate
        assert pool.statistics().in_use == 1  # the slot is not handed out meanwhile
        other = await pool.acquire(egress=False)
        assert other.slot == 2
        gate.set()
        await pool.settle()
        assert pool.statistics().in_use == 1
        await pool.release(other)
    assert live_netns(fake) == set()


async def test_aclose_waits_for_teardowns_in_flight() -> None:
    fake = FakeSystem()
    async with networks(fake) as pool:
        pool.start()
        lease = await pool.acquire(egress=False)  # the pool is still filling: built now
        lease.background_teardown = True
        await pool.release(lease)
    assert live_netns(fake) == set()


async def test_when_every_slot_is_held_a_warm_lease_makes_room_for_egress() -> None:
    fake = FakeSystem()
    async with networks(fake, warm=2, slot_count=2) as pool:
        pool.start()
        await pool.settle()
        lease = await pool.acquire(egress=True)
        assert lease.network.egress
        assert [le.slot for le in pool.ready()] == [2]
        assert lease.slot == 1
        second = await pool.acquire(egress=False)  # the last warm one
        with pytest.raises(NoFreeSlot):
            await pool.acquire(egress=True)
        for held in (lease, second):
            await pool.release(held)
    assert live_netns(fake) == set()


@pytest.mark.parametrize("warm", [0, 2])
async def test_a_cancelled_acquire_or_failed_owner_leaves_nothing(warm: int) -> None:
    """Cancel the build at each of its commands (or, with a warm lease, the owner right after
    taking it): what exists afterwards is only the warm pool."""
    for n in range(26):
        scope = anyio.CancelScope()
        stopped: list[int] = []  # the command the cancellation kept from running, if any

        async def maybe_cancel(
            index: int, _argv: tuple[str, ...], n: int = n, scope: anyio.CancelScope = scope,
            stopped: list[int] = stopped,
        ) -> None:  # fmt: skip
            if index == n and not warm:
                scope.cancel()
                try:
                    await anyio.lowlevel.checkpoint()  # a no-op in a (shielded) teardown
                except BaseException:
                    stopped.append(index)
                    raise

        fake = FakeSystem(before_run=maybe_cancel)
        async with networks(fake, warm=warm) as pool:
            pool.start()
            await pool.settle()
            with scope:
                lease = await pool.acquire(egress=False)
                try:
                    if warm:
                        scope.cancel()
                    await anyio.lowlevel.checkpoint()
                finally:
                    with anyio.CancelScope(shield=True):
                        await pool.release(lease)  # the owner's undo: at once
            pool.refill()
            await pool.settle()
            not_run = stopped[0] if stopped else None
            assert live_netns(fake, not_run) == {le.network.netns for le in pool.ready()}, n
            assert pool.statistics().in_use == 0, n
        assert live_netns(fake, not_run) == set(), n
        if warm:
            break


async def test_a_failing_warm_build_is_not_retried_at_once() -> None:
    fake = FakeSystem(fail_at=0)  # the first `ip netns add`
    async with networks(fake, warm=1) as pool:
        pool.start()
        await pool.settle()
        assert pool.ready() == []
        commands = len(fake.commands)
        pool.refill()
        await pool.settle()
        assert len(fake.commands) == commands  # backing off
        lease = await pool.acquire(egress=False)  # a capsule still gets a network
        await pool.release(lease)
    assert live_netns(fake) == set()


def test_settings_default_to_two_warm_slots() -> None:
    assert AgentSettings().warm_slots == 2


async def test_with_every_slot_held_a_teardown_in_flight_is_waited_for() -> None:
    """A resume right after a pause on a full agent gets the slot the pause is freeing."""
    gate = anyio.Event()
    fake = FakeSystem(before_run=netns_del_waits_for(gate))
    async with networks(fake, warm=0, slot_count=1) as pool:
        lease = await pool.acquire(egress=False)
        lease.background_teardown = True
        await pool.release(lease)
        got: list[SlotLease] = []

        async def resume() -> None:
            got.append(await pool.acquire(egress=True))

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            await anyio.wait_all_tasks_blocked()  # as far as it gets before the gate opens
            assert got == []  # waiting, not failing with NoFreeSlot
            gate.set()
        assert [le.slot for le in got] == [1]
        with pytest.raises(NoFreeSlot):  # nothing in flight: no slot is coming
            await pool.acquire(egress=False)
        await pool.release(got[0])
    assert live_netns(fake) == set()
