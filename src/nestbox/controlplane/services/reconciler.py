"""The reconciler: every `reconcile_interval_s` (and at once when a silent host comes back),
compare each online host's capsules in the database with what its agent's `ListCapsules` says,
and make the database follow the agent.

- a capsule the agent no longer has -> `stopped` (an orphan: its VM is gone);
- a capsule the agent holds in another state (it died: `error`; the idle reaper paused it:
  `paused`; the host came back: whatever it is now) -> that state;
- a capsule its user destroyed that the agent still holds -> destroyed on the agent.

Capsules in a transitional status (`pending`, `pausing`, `resuming`, `snapshotting`, …) belong
to the API call doing the transition and are left alone while it runs: while a call of this
process holds the capsule's lock, and for `stuck_after_s` after the row last changed (a call of
another control plane on the same database). After that the row is stuck (its call died with
its process, or never wrote its outcome) and is settled from the agent: a stable state there is
taken; a create the agent never heard of is `destroyed`, any other capsule it no longer has
`stopped`; a capsule the agent is still busy with is looked at again next pass. Stuck rows on a
host that is not online become `missing`, as the host monitor does when a host goes silent, and
those on no host `stopped`. A pass runs as the loop starts, so a restart settles what the last
run left at once. Hosts are reconciled at the same time, and an agent that does not list its
capsules within `host_timeout_s` is skipped: one that stopped answering (still `online` until
the host monitor sees its silence) holds neither the others nor the next pass.

Every update is conditional on the row being unchanged since it was read, so an API call that
changed it meanwhile always wins.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.db.audit import AuditEvent
from nestbox.controlplane.db.capsules import DESTROYED, Expect
from nestbox.controlplane.errors import HostUnavailable
from nestbox.controlplane.services.events import publish_audit, publish_state_change
from nestbox.controlplane.services.views import from_unix_ms, status_of
from nestbox.protocol.capsules import CapsuleStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import TaskStatus

    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.db.hosts import Host
    from nestbox.controlplane.services.targets import Targets
    from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

log = logging.getLogger(__name__)

TRANSITIONAL = frozenset({
    CapsuleStatus.PENDING, CapsuleStatus.STARTING, CapsuleStatus.PAUSING,
    CapsuleStatus.RESUMING, CapsuleStatus.SNAPSHOTTING, CapsuleStatus.STOPPING,
})  # fmt: skip


class Reconciler:
    def __init__(
        self,
        db: Database,
        targets: Targets,
        *,
        busy: Callable[[str], bool] = lambda capsule_id: False,
        stuck_after_s: float = 5.0,
        host_timeout_s: float = 20.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._host_timeout_s = host_timeout_s
        self._targets = targets
        self._busy = busy
        self._stuck_after = timedelta(seconds=stuck_after_s)
        self._clock = clock
        self._kicked = anyio.Event()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Tx]:
        """A transaction that a stopping app does not cancel halfway (the loop is cancelled
        at any await; a connection torn down mid-query is not given back cleanly)."""
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                yield tx

    def kick(self, host_id: str | None = None) -> None:
        """Run a pass now (a host came back, say) instead of at the next interval."""
        self._kicked.set()

    async def run(
        self, interval_s: float, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Reconcile now, then every `interval_s` seconds or when kicked, until cancelled."""
        task_status.started()
        while True:
            try:
                await self.run_once()
            except Exception as err:  # the database hiccuped: the next pass tries again
                log.error("reconcile pass failed: %r", err)
                log.debug("reconcile traceback", exc_info=err)
            with anyio.move_on_after(interval_s):
                await self._kicked.wait()
            self._kicked = anyio.Event()

    async def run_once(self) -> None:
        """One pass over every online host at once (a host that fails, or whose agent does not
        list its capsules within `host_timeout_s`, is logged and skipped), then the stuck rows
        of hosts that are not online."""
        async with self._tx() as tx:
            hosts = await tx.hosts.with_status("online", "draining")
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(self._pass_host, host)
        await self.settle_offline({h.id for h in hosts})

    async def _pass_host(self, host: Host) -> None:
        try:
            await self.reconcile_host(host)
        except TimeoutError:
            log.warning("reconcile %s: its agent did not list its capsules in %g s, skipped",
                        host.id, self._host_timeout_s, extra={"host_id": host.id})  # fmt: skip
        except (AgentCallError, HostUnavailable) as err:
            log.debug("reconcile %s skipped: %s", host.id, err.message)
        except Exception as err:  # one host's failure must not stop the others
            log.error("reconcile %s failed: %r", host.id, err, extra={"host_id": host.id})
            log.debug("reconcile traceback", exc_info=err)

    async def settle_offline(self, online: set[str]) -> None:
        """Stuck rows whose host is not among `online`: `missing` (the host may come back;
        its heartbeat then has them reconciled) or, with no host at all, `stopped`."""
        async with self._tx() as tx:
            stuck = [c for c in await tx.capsules.in_status(
                TRANSITIONAL, before=self._clock() - self._stuck_after)
                if c.host_id not in online and not self._busy(c.id)]  # fmt: skip
        for row in stuck:
            async with self._tx() as tx:
                host = await tx.hosts.get(row.host_id) if row.host_id else None
            status = CapsuleStatus.STOPPED if host is None else CapsuleStatus.MISSING
            await self._apply(row, {"status": status.value, "host_ip": ""}, set())

    async def reconcile_host(self, host: Host) -> None:
        # Rows first, then the agent: a change an API call makes in between is then newer
        # than what we read, and the conditional update leaves it alone.
        async with self._tx() as tx:
            rows = await tx.capsules.on_host(host.id)
        agent = self._targets.agent(host)
        # An agent that hangs (stopped, or its machine gone silent) is `online` until the host
        # monitor notices: its listing would hold the pass for the call's whole timeout, and
        # with it the next pass and every kick. :raise TimeoutError:
        with anyio.fail_after(self._host_timeout_s):
            answer = await agent.list_capsules()
        held = {c.capsule_id: c for c in answer.capsules}
        auto_paused = set(answer.auto_paused_ids)
        for row in rows:
            found = held.get(row.id)
            values = self._settle(row, found) if self._stuck(row) else self._drift(row, found)
            if values:
                await self._apply(row, values, auto_paused)
        known = {r.id for r in rows}
        for capsule_id in held.keys() - known:
            await self._stray(host, capsule_id)

    def _stuck(self, row: Capsule) -> bool:
        """A row in a transitional status that no call is working on any more."""
        return (
            row.status in TRANSITIONAL
            and not self._busy(row.id)
            and self._clock() - row.last_updated >= self._stuck_after
        )

    def _settle(self, row: Capsule, found: pb.Capsule | None) -> dict[str, Any]:
        """What a stuck row becomes: what the agent says, or, if it has no such capsule,
        `destroyed` (a create that never happened) or `stopped`."""
        if found is None:
            never_made = row.status in (CapsuleStatus.PENDING, CapsuleStatus.STARTING)
            return {"status": DESTROYED if never_made else CapsuleStatus.STOPPED.value,
                    "host_ip": ""}  # fmt: skip
        values = self._follow(row, found)
        if values.get("status") == CapsuleStatus.RUNNING and row.started_at is None:
            values["started_at"] = self._clock()
        return values

    def _drift(self, row: Capsule, found: pb.Capsule | None) -> dict[str, Any]:
        """What to change in `row` so it matches the agent (empty: nothing)."""
        if row.status in TRANSITIONAL:
            return {}
        if found is None:
            if row.status == CapsuleStatus.STOPPED:
                return {}
            return {"status": CapsuleStatus.STOPPED.value, "host_ip": ""}
        return self._follow(row, found)

    def _follow(self, row: Capsule, found: pb.Capsule) -> dict[str, Any]:
        """The agent's view of a capsule it holds as row values (empty: nothing differs, or
        the agent is busy with it and we look again next time)."""
        status = status_of(found.state)
        if status in TRANSITIONAL:
            return {}
        values: dict[str, Any] = {}
        if status != row.status:
            values["status"] = status.value
        host_ip = found.host_ip if status == CapsuleStatus.RUNNING else ""
        if host_ip != row.host_ip:
            values["host_ip"] = host_ip
        active = from_unix_ms(found.last_active_at_unix_ms)
        if active is not None and (row.last_active_at is None or active > row.last_active_at):
            values["last_active_at"] = active
        return values

    async def _apply(self, row: Capsule, values: dict[str, Any], auto_paused: set[str]) -> None:
        async with self._tx() as tx:
            done = await tx.capsules.update(
                row.id, expect=Expect(row.status, row.last_updated), **values
            )
            new = values.get("status")
            if done and new is not None:
                action = (
                    "capsule.auto_pause"
                    if new == CapsuleStatus.PAUSED and row.id in auto_paused
                    else "capsule.state.changed"
                )
                audit = AuditEvent(
                    action=action, resource_type="capsule", resource_id=row.id,
                    team_id=row.team_id, actor_type="system",
                    metadata={"from": row.status, "to": new},
                )  # fmt: skip
                await tx.audit.record(audit)
                # The stream: every change as capsule.state.changed, an auto-pause also as
                # capsule.pause (reason ttl_expired), as Wrenn does.
                auto = action == "capsule.auto_pause"
                reason = "ttl_expired" if auto else "host_state_sync"
                await publish_state_change(tx, row.id, row.status, new, reason=reason)
                if auto:
                    await publish_audit(tx, audit)
        if done and "status" in values:
            log.info("capsule %s: %s -> %s (reconciled)", row.id, row.status, values["status"],
                     extra={"capsule_id": row.id})  # fmt: skip

    async def _stray(self, host: Host, capsule_id: str) -> None:
        """A capsule the agent holds and the database does not show on this host."""
        async with self._tx() as tx:
            row = await tx.capsules.get(capsule_id)
        if row is None or row.host_id != host.id:
            log.warning("host %s holds capsule %s the control plane does not know",
                        host.id, capsule_id, extra={"host_id": host.id})  # fmt: skip
            return
        if row.status == DESTROYED:
            try:
                await self._targets.agent(host).destroy_capsule(capsule_id)
            except AgentCallError as err:
                log.warning("could not destroy %s on %s: %s", capsule_id, host.id, err.message)
                return
            log.info("destroyed %s on %s (its user had destroyed it)", capsule_id, host.id)
