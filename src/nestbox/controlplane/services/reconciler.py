"""The reconciler: every `reconcile_interval_s` (and at once when a silent host comes back),
compare each online host's capsules in the database with what its agent's `ListCapsules` says,
and make the database follow the agent.

- a capsule the agent no longer has -> `stopped` (an orphan: its VM is gone);
- a capsule the agent holds in another state (it died: `error`; the idle reaper paused it:
  `paused`; the host came back: whatever it is now) -> that state;
- a capsule its user destroyed that the agent still holds -> destroyed on the agent.

Capsules in a transitional status (`pending`, `pausing`, …) belong to the API call doing the
transition and are left alone; every update is conditional on the row being unchanged since it
was read, so an API call that changed it meanwhile always wins.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.db.audit import AuditEvent
from nestbox.controlplane.db.capsules import DESTROYED, Expect
from nestbox.controlplane.errors import HostUnavailable
from nestbox.controlplane.services.views import from_unix_ms, status_of
from nestbox.protocol.capsules import CapsuleStatus

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from nestbox.controlplane.db import Database
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
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._targets = targets
        self._clock = clock
        self._kicked = anyio.Event()

    def kick(self, host_id: str | None = None) -> None:
        """Run a pass now (a host came back, say) instead of at the next interval."""
        self._kicked.set()

    async def run(
        self, interval_s: float, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Reconcile every `interval_s` seconds or when kicked, until cancelled."""
        task_status.started()
        while True:
            with anyio.move_on_after(interval_s):
                await self._kicked.wait()
            self._kicked = anyio.Event()
            await self.run_once()

    async def run_once(self) -> None:
        """One pass over every online host; a host that fails is logged and skipped."""
        async with self._db.transaction() as tx:
            hosts = await tx.hosts.with_status("online", "draining")
        for host in hosts:
            try:
                await self.reconcile_host(host)
            except (AgentCallError, HostUnavailable) as err:
                log.debug("reconcile %s skipped: %s", host.id, err.message)
            except Exception as err:  # one host's failure must not stop the others
                log.error("reconcile %s failed: %r", host.id, err, extra={"host_id": host.id})
                log.debug("reconcile traceback", exc_info=err)

    async def reconcile_host(self, host: Host) -> None:
        # Rows first, then the agent: a change an API call makes in between is then newer
        # than what we read, and the conditional update leaves it alone.
        async with self._db.transaction() as tx:
            rows = await tx.capsules.on_host(host.id)
        agent = self._targets.agent(host)
        answer = await agent.list_capsules()
        held = {c.capsule_id: c for c in answer.capsules}
        auto_paused = set(answer.auto_paused_ids)
        for row in rows:
            values = self._drift(row, held.get(row.id))
            if values:
                await self._apply(row, values, auto_paused)
        known = {r.id for r in rows}
        for capsule_id in held.keys() - known:
            await self._stray(host, capsule_id)

    def _drift(self, row: Capsule, found: pb.Capsule | None) -> dict[str, Any]:
        """What to change in `row` so it matches the agent (empty: nothing)."""
        if row.status in TRANSITIONAL:
            return {}
        if found is None:
            if row.status == CapsuleStatus.STOPPED:
                return {}
            return {"status": CapsuleStatus.STOPPED.value, "host_ip": ""}
        status = status_of(found.state)
        if status in TRANSITIONAL:
            return {}  # the agent is busy with it; look again next time
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
        async with self._db.transaction() as tx:
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
                await tx.audit.record(AuditEvent(
                    action=action, resource_type="capsule", resource_id=row.id,
                    team_id=row.team_id, actor_type="system",
                    metadata={"from": row.status, "to": new},
                ))  # fmt: skip
        if done and "status" in values:
            log.info("capsule %s: %s -> %s (reconciled)", row.id, row.status, values["status"],
                     extra={"capsule_id": row.id})  # fmt: skip

    async def _stray(self, host: Host, capsule_id: str) -> None:
        """A capsule the agent holds and the database does not show on this host."""
        async with self._db.transaction() as tx:
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
