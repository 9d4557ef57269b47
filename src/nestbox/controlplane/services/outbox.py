"""The channel outbox: delivers `channel_deliveries` rows (written by `events.publish` in the
transaction of the change), so nothing that causes an event ever waits for a receiver.

A pass takes the oldest pending delivery of each channel that is due (so a channel's events
arrive in order: the next waits while one is retried), leases it (a compare-and-set moving
`next_attempt_at` `LEASE_S` ahead and counting the attempt, so of several control planes on one
database exactly one sends it, and a control plane that dies mid-send leaves it to be sent again
once the lease ends: a stop waits for attempts under way), sends it and records the outcome:
`delivered`, or due again after `channel_retry_base_s` x 3^(attempts-1) (at most an hour), or
`failed` after `channel_max_attempts`. Rows survive restarts, so a delivery is retried across
them; a receiver may see an event twice (after a crash mid-send) but then with the same
`X-Wrenn-Delivery`.

The loop sleeps until the earliest pending delivery is due, or until the event hub hears of a
new event (`kick`), and at most `IDLE_POLL_S` (events published by another control plane on
SQLite are found so). Once an hour it forgets events and finished deliveries older than
`event_retention_days`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import httpx

from nestbox.controlplane.db.channels import DELIVERED, FAILED
from nestbox.controlplane.secretbox import SecretError
from nestbox.controlplane.services.channels import DeliveryFailed, send

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.channels import Delivery
    from nestbox.controlplane.services.channels import ChannelService
    from nestbox.controlplane.settings import CPSettings

log = logging.getLogger(__name__)

LEASE_S = 120.0
"""Longer than an attempt can take (the timeout, and a shielded finish)."""
IDLE_POLL_S = 30.0
MAX_BACKOFF_S = 3600.0
PRUNE_EVERY_S = 3600.0
PARALLEL = 8


class Outbox:
    def __init__(
        self,
        db: Database,
        channels: ChannelService,
        settings: CPSettings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._channels = channels
        self._base_s = settings.channel_retry_base_s
        self._max_attempts = settings.channel_max_attempts
        self._timeout_s = settings.channel_timeout_s
        self._retention = timedelta(days=settings.event_retention_days)
        self._clock = clock
        self._kicked = anyio.Event()
        self.client: httpx.AsyncClient | None = None

    def kick(self, _event_id: int | None = None) -> None:
        """Look for due deliveries now (an event was published)."""
        self._kicked.set()

    def http(self) -> httpx.AsyncClient:
        """The senders' client (made by `run`; a test delivery before that gets its own)."""
        if self.client is None:
            self.client = self._new_client()
        return self.client

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self._timeout_s, follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )  # fmt: skip

    def backoff_s(self, attempts: int) -> float:
        return float(min(self._base_s * 3 ** max(attempts - 1, 0), MAX_BACKOFF_S))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        self.client = self.client or self._new_client()
        last_prune = 0.0
        try:
            task_status.started()
            while True:
                try:
                    while await self.run_once():
                        pass
                    if anyio.current_time() - last_prune > PRUNE_EVERY_S:
                        await self.prune()
                        last_prune = anyio.current_time()
                    wait = await self._until_due()
                except Exception as err:  # the database hiccuped: try again shortly
                    log.error("outbox pass failed: %r", err)
                    wait = self._base_s
                with anyio.move_on_after(wait):
                    await self._kicked.wait()
                self._kicked = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await self.client.aclose()

    async def _until_due(self) -> float:
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                due = await tx.channels.next_due()
        if due is None:
            return IDLE_POLL_S
        return min(max((due - self._clock()).total_seconds(), 0.0) + 0.01, IDLE_POLL_S)

    async def run_once(self) -> int:
        """One pass: how many deliveries were attempted."""
        now = self._clock()
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                due = await tx.channels.due(now)
            claimed = []
            for delivery in due:
                async with self._db.transaction() as tx:
                    lease = now + timedelta(seconds=max(LEASE_S, 2 * (self._timeout_s + 10)))
                    if await tx.channels.claim(delivery, lease):
                        claimed.append(delivery)
        limiter = anyio.CapacityLimiter(PARALLEL)
        async with anyio.create_task_group() as tg:
            for delivery in claimed:
                tg.start_soon(self._attempt, delivery, limiter)
        return len(claimed)

    async def _attempt(self, delivery: Delivery, limiter: anyio.CapacityLimiter) -> None:
        """One attempt, shielded (bounded by the timeout): a stopping control plane finishes
        what it sent rather than leaving a lease to run out."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout_s + 10):
            await self._attempt_once(delivery, limiter)

    async def _attempt_once(self, delivery: Delivery, limiter: anyio.CapacityLimiter) -> None:
        attempts = delivery.attempts + 1
        async with limiter:
            async with self._db.transaction() as tx:
                channel = await tx.channels.by_id(delivery.channel_id)
                payload = await tx.events.payload(delivery.event_id)
            status: int | None = None
            try:
                if channel is None or payload is None:
                    raise DeliveryFailed("the channel or the event is gone")
                try:
                    config = self._channels.open_config(channel)
                except SecretError:
                    raise DeliveryFailed("the channel's config does not open") from None
                status = await send(self.http(), self._channels.policy, channel.provider,
                                    config, payload, delivery_id=delivery.delivery_id,
                                    now=self._clock())  # fmt: skip
            except DeliveryFailed as err:
                await self._failed(delivery, attempts, str(err), err.status)
                return
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                await tx.channels.finish(delivery.id, status=DELIVERED, response_status=status,
                                         last_error="", finished_at=self._clock())  # fmt: skip
        log.info("delivered %s to channel %s", delivery.event_type, delivery.channel_id)

    async def _failed(
        self, delivery: Delivery, attempts: int, error: str, status: int | None
    ) -> None:
        now = self._clock()
        values: dict[str, object] = {"last_error": error[:500], "response_status": status}
        if attempts >= self._max_attempts:
            values.update(status=FAILED, finished_at=now)
            log.warning("gave up delivering %s to channel %s after %d attempts: %s",
                        delivery.event_type, delivery.channel_id, attempts, error)  # fmt: skip
        else:
            values["next_attempt_at"] = now + timedelta(seconds=self.backoff_s(attempts))
            log.info("delivery to channel %s failed (attempt %d): %s", delivery.channel_id,
                     attempts, error)  # fmt: skip
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                await tx.channels.finish(delivery.id, **values)

    async def prune(self) -> None:
        before = self._clock() - self._retention
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                await tx.channels.prune(before)
                await tx.events.prune(before)
