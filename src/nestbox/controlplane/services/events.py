"""Events: what happened to a team's capsules, snapshots and hosts, published once and read by
the SSE stream (`GET /v1/events/stream`) and the notification channels.

To publish, call `publish(tx, ...)` (or `publish_audit(tx, audit_event)` right after recording
an audit event whose action is an event type) inside the transaction that makes the change:
the event is a row of that transaction (`events`), together with one outbox row per channel
of the team that subscribes to it (`channel_deliveries`), so it exists exactly when the change
does, and nothing is sent while the caller waits. Streams learn of it at commit: PostgreSQL
`NOTIFY` (every control plane on the database, in commit order) or, on SQLite, an in-process
after-commit callback (`db/events.py`).

`EventHub` (one per process, run as a background loop) turns those notifications into events,
fans them out to the open streams of the event's team (a shared host's events to platform
admins), and kicks the outbox. A stream that falls 256 events behind is closed (the client
reconnects) rather than buffered without bound.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
from sqlalchemy.engine import make_url

from nestbox.controlplane.db.capsules import DESTROYED
from nestbox.controlplane.db.events import NOTIFY_CHANNEL, listen_locally
from nestbox.controlplane.services.views import capsule_view
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.events import SUBSCRIBABLE, EventActor, EventResource, EventType, EventView

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.audit import AuditEvent
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.services.principal import Principal

log = logging.getLogger(__name__)

SYSTEM = EventActor(type="system")
RESOURCE_TYPES = {"capsule": "sandbox", "template": "snapshot", "host": "host"}
"""Our audit resource types -> Wrenn's event resource types."""
STREAM_BUFFER = 256
LISTEN_RETRY_S = 2.0


def actor_of(principal: Principal) -> EventActor:
    if principal.api_key_id:
        return EventActor(type="api_key", id=principal.api_key_id, name=principal.email)
    return EventActor(type="user", id=principal.user_id or "", name=principal.email)


async def publish(
    tx: Tx,
    event: EventType | str,
    *,
    team_id: str | None,
    resource_id: str,
    resource_type: str,
    actor: EventActor = SYSTEM,
    outcome: str | None = None,
    error: str | None = None,
    metadata: Mapping[str, object] | None = None,
    capsule: Capsule | None = None,
    now: datetime | None = None,
) -> int:
    """Publish one event in `tx` (see the module's text); its id. `resource_type` is Wrenn's
    (sandbox, snapshot, host); `capsule` fills the event's `sandbox` (the row as it is now,
    a destroyed one shown as stopped); `metadata` values become strings."""
    kind = EventType(event)
    at = now or datetime.now(UTC)
    sandbox = None
    if capsule is not None:
        shown = replace(capsule, status=CapsuleStatus.STOPPED.value) \
            if capsule.status == DESTROYED else capsule  # fmt: skip
        sandbox = capsule_view(shown)
    view = EventView(
        event=kind, outcome=outcome, timestamp=at, team_id=team_id, actor=actor,  # type: ignore[arg-type]  # checked by the model
        resource=EventResource(id=resource_id, type=resource_type),
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
        error=error if outcome == "error" else None, sandbox=sandbox,
    )  # fmt: skip
    payload = view.model_dump(mode="json", exclude_none=True)
    event_id = await tx.events.add(team_id, kind.value, payload, at)
    if team_id is not None and kind in SUBSCRIBABLE:
        for channel_id in await tx.channels.subscribed(team_id, kind.value):
            await tx.channels.enqueue(channel_id, event_id, kind.value, at)
    await tx.events.notify(event_id)
    return event_id


async def publish_audit(tx: Tx, audit: AuditEvent, **metadata: object) -> None:
    """Publish what an audit event describes, if it is an event (capsule.create|pause|resume|
    destroy, capsule.auto_pause, capsule.state.changed, template.snapshot.*, host.up|down);
    anything else is ignored. Call it in the transaction that recorded `audit`."""
    action = audit.action
    extra = {**audit.metadata, **metadata}
    outcome: str | None = "success" if audit.status == "success" else "error"
    error = str(extra.pop("error", "")) or None if outcome == "error" else None
    if action == "capsule.auto_pause":
        action, extra["reason"] = EventType.CAPSULE_PAUSE.value, "ttl_expired"
    if action not in EventType.__members__.values() or action == EventType.CONNECTED:
        return
    if action in (EventType.CAPSULE_STATE_CHANGED, EventType.HOST_UP, EventType.HOST_DOWN):
        outcome = None
    team_id = audit.team_id
    capsule = None
    if audit.resource_type == "capsule" and audit.resource_id:
        capsule = await tx.capsules.get(audit.resource_id)
    elif audit.resource_type == "host" and audit.resource_id:
        host = await tx.hosts.get(audit.resource_id)
        team_id = host.team_id if host is not None else None
    actor = SYSTEM  # hosts, loops, and principals acting for the platform (no user id)
    if audit.actor_type in ("user", "api_key") and audit.actor_id:
        kind: Literal["user", "api_key"] = "user" if audit.actor_type == "user" else "api_key"
        actor = EventActor(type=kind, id=audit.actor_id, name=audit.actor_name)
    await publish(
        tx, action, team_id=team_id, resource_id=audit.resource_id,
        resource_type=RESOURCE_TYPES.get(audit.resource_type, audit.resource_type),
        actor=actor, outcome=outcome, error=error, metadata=extra, capsule=capsule,
    )  # fmt: skip


async def publish_state_change(
    tx: Tx, capsule_id: str, before: str, after: str, **metadata: object
) -> None:
    """A `capsule.state.changed` event for a status change nobody asked for through the API
    (the reconciler, the host monitor, a timeout)."""
    capsule = await tx.capsules.get(capsule_id)
    if capsule is None:
        return
    await publish(
        tx, EventType.CAPSULE_STATE_CHANGED, team_id=capsule.team_id, resource_id=capsule_id,
        resource_type="sandbox", metadata={"from": before, "to": after, **metadata},
        capsule=capsule,
    )  # fmt: skip


# ── the hub ──


@dataclass(eq=False)
class Subscription:
    """One open stream: the events of `team_id` (and, for a platform admin, of shared hosts)."""

    team_id: str
    is_admin: bool
    send: MemoryObjectSendStream[dict[str, Any]]
    receive: MemoryObjectReceiveStream[dict[str, Any]]
    closed: bool = field(default=False)

    def wants(self, team_id: str | None) -> bool:
        return team_id == self.team_id or (team_id is None and self.is_admin)


class EventHub:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._subs: set[Subscription] = set()
        self._ids: deque[int] = deque()
        self._wake = anyio.Event()
        self._listeners: list[Callable[[int], None]] = []

    def on_event(self, callback: Callable[[int], None]) -> None:
        """Call `callback(event_id)` for every event this process hears of (the outbox)."""
        self._listeners.append(callback)

    @contextmanager
    def subscribe(self, principal: Principal) -> Iterator[Subscription]:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](STREAM_BUFFER)
        sub = Subscription(principal.team_id, principal.is_admin, send, receive)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            send.close()
            receive.close()

    def _heard(self, event_id: int) -> None:
        self._ids.append(event_id)
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hear of committed events (LISTEN or in-process) and fan them out, until cancelled."""
        async with anyio.create_task_group() as tg:
            if self._db.dialect == "postgresql":
                await tg.start(self._listen_postgres)
            else:
                stop = listen_locally(self._db.url, self._heard)
                tg.start_soon(_call_on_cancel, stop)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._ids:
                    batch = [self._ids.popleft() for _ in range(min(len(self._ids), 100))]
                    try:
                        await self._dispatch(batch)
                    except Exception as err:  # the database hiccuped: these are lost to streams
                        log.error("could not read events %s: %r", batch, err)

    async def _dispatch(self, ids: list[int]) -> None:
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                found = await tx.events.by_ids(ids)
        for event_id, team_id, payload in found:
            for sub in list(self._subs):
                if sub.closed or not sub.wants(team_id):
                    continue
                try:
                    sub.send.send_nowait(payload)
                except anyio.WouldBlock:
                    log.warning("an event stream fell behind; closing it")
                    sub.closed = True
                    sub.send.close()
                    self._subs.discard(sub)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    sub.closed = True
                    self._subs.discard(sub)
            for callback in self._listeners:
                callback(event_id)

    async def _listen_postgres(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """LISTEN on a connection of its own, reconnecting when it breaks (events committed
        while it was down reach no stream; the outbox polls, so channels miss nothing)."""
        import asyncpg  # type: ignore[import-untyped]  # PostgreSQL only

        url = make_url(self._db.url).set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        started = False
        while True:
            try:
                conn = await asyncpg.connect(dsn)
            except (OSError, asyncpg.PostgresError) as err:
                log.error("cannot LISTEN for events: %r", err)
            else:
                lost = anyio.Event()
                try:
                    await conn.add_listener(
                        NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: self._heard(int(payload))
                    )
                    conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                    if not started:
                        task_status.started()
                        started = True
                    await lost.wait()
                    log.warning("the event LISTEN connection closed; reconnecting")
                finally:
                    with anyio.CancelScope(shield=True):
                        await conn.close(timeout=5)
            if not started:
                task_status.started()
                started = True
            await anyio.sleep(LISTEN_RETRY_S)


async def _call_on_cancel(callback: Callable[[], None]) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        callback()
