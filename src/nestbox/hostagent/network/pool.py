"""Slot networks as leases: built ahead of need (the warm pool), torn down off the critical path.

A `SlotLease` is one slot and its network (`setup.open_slot_network`), with the undo stack that
removes the network and then gives the slot back. `SlotNetworks` hands leases out:

- **Warm pool.** Up to `warm_slots` leases without egress are built ahead, in the runtime's task
  group, so a capsule made without egress gets a finished network at once (the build costs
  75-150 ms of `ip`/`iptables`/`tc` processes). A warm lease is *built but never used*: it goes
  to exactly one capsule and is torn down after it, never returned to the pool, so no state
  (conntrack entries, neighbour caches, queued packets) passes from one capsule to the next.
  The owner calls `refill()` once the capsule that took one is up (or failed): a refill is
  about twenty `ip`/`iptables`/`tc` processes, which must not compete for the CPUs with the
  very start-up they would speed up. Egress capsules, and any capsule when the pool is empty,
  get a lease built on the spot, as before. Warm leases count as free slots in `statistics()`.
  When no slot is free, a warm lease is torn down to make room for an egress capsule, and a
  lease being built or torn down is waited for.
- **Teardown.** `release` removes a lease's network at once (a failed or cancelled create:
  what the caller made is gone when it returns). After a pause or destroy the runtime marks the
  lease `background_teardown` first: `release` then only schedules the teardown in the task
  group and returns, so the verb returns once QEMU is gone. The slot stays held until its
  network is gone, failures are logged, and `aclose` (runtime shutdown) waits for every
  teardown, stops the builders and removes the warm leases.

Nothing here survives the agent: warm leases hold no capsule, so start-up cleanup
(`cleanup_leftovers` with the slots of re-adopted capsules) removes the ones of a crashed run.
The pool starts filling on `start()` (after that cleanup) or on the first `acquire`.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.network.setup import open_slot_network
from nestbox.hostagent.network.slots import NoFreeSlot, SlotPoolStatistics
from nestbox.hostagent.undo import TeardownError, UndoStack, unwind, unwind_after_failure

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from nestbox.hostagent.network.slots import SlotNetwork, SlotPool
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_S = 10.0
"""A warm build failed: no new one is started for this long (a broken host is not hammered)."""


@dataclass(eq=False)
class SlotLease:
    """One slot with its network; `stack` removes the network, then frees the slot."""

    network: SlotNetwork
    stack: UndoStack
    warm: bool = False
    """Built ahead by the pool (not on the capsule's critical path)."""
    built_ms: int = 0
    background_teardown: bool = False
    """Set by the owner before a normal teardown (pause, destroy): `release` then returns at
    once and the network goes in the background. Unset (failures): `release` waits."""

    @property
    def slot(self) -> int:
        return self.network.slot


@dataclass
class _Counts:
    building: int = 0
    tearing_down: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)

    def bump(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class SlotNetworks:
    """Leases of this agent's slots (see the module docstring)."""

    def __init__(
        self,
        system: System,
        settings: AgentSettings,
        slots: SlotPool,
        task_group: TaskGroup,
        *,
        warm: int,
        teardown_within: float,
    ) -> None:
        self.system = system
        self.settings = settings
        self.slots = slots
        self.warm = warm
        self.teardown_within = teardown_within
        self._tg = task_group
        self._ready: collections.deque[SlotLease] = collections.deque()
        self._counts = _Counts()
        self._started = False
        self._closing = False
        self._retry_at = 0.0
        self._builders: set[anyio.CancelScope] = set()

    # ── handing out ─────────────────────────────────────────────────────────────────────

    def start(self) -> None:
        """Start filling the warm pool (idempotent). Call once start-up cleanup is done."""
        if not self._started and not self._closing:
            self._started = True
            self.refill()

    async def acquire(self, *, egress: bool) -> SlotLease:
        """A lease: a warm one when one is ready and `egress` is off, else built now. Call
        `refill()` when the capsule's start-up is over.

        :raise NoFreeSlot: :raise SystemCommandError: (nothing is left behind)
        """
        if not self._started:
            self.start()
        while True:
            if not egress and self._ready:
                return self._ready.popleft()
            try:
                return await self._build(egress=egress)
            except NoFreeSlot:
                if self._ready:  # held only by warm leases: give one back, build ours there
                    await self._discard(self._ready.popleft())
                elif self._counts.building or self._counts.tearing_down:
                    await self._counts.changed.wait()  # a slot is about to be warm or free
                else:
                    raise

    async def release(self, lease: SlotLease) -> None:
        """Tear the lease's network down and free its slot: now, or in the background when
        `lease.background_teardown` is set. :raise TeardownError: (now only)"""
        if not lease.background_teardown or self._closing:
            await unwind(lease.stack, self.teardown_within)
            self.refill()
            return
        self._counts.tearing_down += 1
        self._tg.start_soon(self._teardown, lease)

    # ── state ───────────────────────────────────────────────────────────────────────────

    @property
    def closing(self) -> bool:
        """`aclose()` has begun: no more warm leases; releases tear down at once."""
        return self._closing

    def ready(self) -> list[SlotLease]:
        """The warm leases waiting for a capsule."""
        return list(self._ready)

    def statistics(self) -> SlotPoolStatistics:
        """The slot pool's figures, warm leases (built or being built) counted as free."""
        stats = self.slots.statistics()
        # A build not yet past its allocation holds no slot yet.
        spare = min(len(self._ready) + self._counts.building, stats.in_use)
        return SlotPoolStatistics(total=stats.total, in_use=stats.in_use - spare,
                                  free=stats.free + spare)  # fmt: skip

    async def settle(self) -> None:
        """Wait until no warm build and no background teardown is in flight (tests, bench)."""
        while self._counts.building or self._counts.tearing_down:
            await self._counts.changed.wait()

    async def aclose(self) -> None:
        """Stop the builders, wait for the teardowns, remove the warm leases. Shielded."""
        with anyio.CancelScope(shield=True):
            self._closing = True
            for scope in self._builders:
                scope.cancel()
            with anyio.move_on_after(self.teardown_within):
                await self.settle()
            while self._ready:
                await self._discard(self._ready.popleft())

    # ── building and tearing down ───────────────────────────────────────────────────────

    async def _build(self, *, egress: bool, warm: bool = False) -> SlotLease:
        started = time.monotonic()
        stack = UndoStack("slot network")
        try:
            slot = await self.slots.allocate()
            stack.push_async_callback(self.slots.release, slot)
            stack.what = f"slot {slot} network"
            network = await open_slot_network(
                self.system, self.settings, slot, egress=egress, stack=stack
            )
        except BaseException:
            await unwind_after_failure(stack, self.teardown_within)
            raise
        built_ms = round((time.monotonic() - started) * 1000)
        return SlotLease(network, stack, warm=warm, built_ms=built_ms)

    def refill(self) -> None:
        """Build warm leases in the background until the pool is full again (the owner calls
        it once the start-up that took a warm lease is over)."""
        if not self._started or self._closing or time.monotonic() < self._retry_at:
            return
        missing = self.warm - len(self._ready) - self._counts.building
        free = self.slots.statistics().free
        for _ in range(min(missing, free)):
            self._counts.building += 1
            self._tg.start_soon(self._build_warm)

    async def _build_warm(self) -> None:
        scope = anyio.CancelScope()
        self._builders.add(scope)
        try:
            with scope:
                if self._closing:  # started after aclose() cancelled the builders
                    return
                try:
                    lease = await self._build(egress=False, warm=True)
                except NoFreeSlot:
                    return
                except Exception as err:
                    self._retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S
                    log.warning("building a warm slot network failed: %r", err)
                    return
                # (the property: mypy would take `_closing` as still False after the check above)
                if self.closing:  # aclose() began while this one was being built
                    await self._discard(lease)
                    return
                self._ready.append(lease)
                log.debug("warm slot ready", extra={"slot": lease.slot, "ms": lease.built_ms})
        finally:
            self._builders.discard(scope)
            self._counts.building -= 1
            self._counts.bump()

    async def _teardown(self, lease: SlotLease) -> None:
        try:
            await unwind(lease.stack, self.teardown_within)
        except TeardownError as err:
            log.error("%s", err)
        finally:
            self._counts.tearing_down -= 1
            self._counts.bump()
        self.refill()

    async def _discard(self, lease: SlotLease) -> None:
        try:
            await unwind(lease.stack, self.teardown_within)
        except TeardownError as err:
            log.error("%s", err)
