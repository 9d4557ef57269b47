"""Stuck rows (SQLite and PostgreSQL, fake agents): rows left in pending, pausing, resuming or
snapshotting (a control plane killed mid-call, an outcome never written) are settled from the
owning agent's ListCapsules, by every reconciler pass and by the first pass of a control plane
that starts; rows of a host that is not online become `missing`; a row a call of this process
still works on, or one younger than the grace, is left alone. Settled rows stop counting
against the host's capacity and the team's quota."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from sqlalchemy import update

from nestbox.controlplane.app import create_app
from nestbox.controlplane.db.models import CapsuleRow, HostRow
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import HANG_S
from tests.integration.cp.cluster import Cluster, cluster
from tests.integration.cp.harness import running

pytestmark = pytest.mark.postgres  # touches database behaviour (CONTRIBUTING.md)

LONG_AGO = timedelta(minutes=5)


async def _stick(c: Cluster, capsule_id: str, status: str, age: timedelta = LONG_AGO) -> None:
    """Leave the row in `status` as a dead call would have, `age` ago."""
    async with c.services.db.transaction() as tx:
        await tx.session.execute(update(CapsuleRow).where(CapsuleRow.id == capsule_id).values(
            status=status, last_updated=datetime.now(UTC) - age))  # fmt: skip


async def _status(c: Cluster, capsule_id: str) -> str:
    async with c.services.db.transaction() as tx:
        row = await tx.capsules.get(capsule_id)
    assert row is not None
    return row.status


async def test_stuck_rows_follow_the_agent(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        account, key = await c.user("ann@example.com")
        agent = c.hosts[0].agent
        ids = [(await c.create(key))["id"] for _ in range(7)]
        ran, paused, gone, never, snap, young, busy = ids
        agent.capsules[paused].state = pb.CapsuleState.PAUSED
        del agent.capsules[gone]
        del agent.capsules[never]
        await _stick(c, ran, "resuming")  # the resume happened; its answer was lost
        await _stick(c, paused, "pausing")
        await _stick(c, gone, "pausing")  # the VM vanished meanwhile
        await _stick(c, never, "pending")  # the create never reached the agent
        await _stick(c, snap, "snapshotting")
        agent.capsules[snap].state = pb.CapsuleState.SNAPSHOTTING  # the agent is still at it
        await _stick(c, young, "pausing", age=timedelta(seconds=0))
        await _stick(c, busy, "pausing")

        async with c.services.capsules.locks.hold(busy):  # a call here still works on it
            await c.services.reconciler.run_once()
        assert await _status(c, ran) == "running"
        assert await _status(c, paused) == "paused"
        assert await _status(c, gone) == "stopped"
        assert await _status(c, never) == "destroyed"
        assert await _status(c, snap) == "snapshotting"
        assert await _status(c, young) == "pausing"
        assert await _status(c, busy) == "pausing"
        r = await c.client.get(f"/v1/capsules/{never}", headers=key)
        assert r.status_code == 404  # a create that never happened is not shown
        r = await c.client.get(f"/v1/capsules/{ran}", headers=key)
        assert r.json()["host_ip"] == agent.capsules[ran].host_ip

        agent.capsules[snap].state = pb.CapsuleState.PAUSED
        await _stick(c, young, "pausing")
        await c.services.reconciler.run_once()
        assert await _status(c, snap) == "paused"
        assert await _status(c, young) == "running"
        assert await _status(c, busy) == "running"
        async with c.services.db.transaction() as tx:
            assert await tx.capsules.count_holding(account.team_id) == 3
            audit = await tx.audit.list(account.team_id, limit=100, before_id=None)
        changes = [e.event for e in audit if e.event.action == "capsule.state.changed"]
        assert {"from": "pending", "to": "destroyed"} in [e.metadata for e in changes]


async def test_stuck_rows_stop_counting_against_the_quota(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"team_capsule_quota": 1})) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        del c.hosts[0].agent.capsules[cid]
        await _stick(c, cid, "pending")
        r = await c.client.post("/v1/capsules", json={"template": "minimal"}, headers=key)
        assert r.status_code == 429
        await c.services.reconciler.run_once()
        await c.create(key)


async def test_stuck_rows_of_an_unreachable_host_go_missing(settings: CPSettings) -> None:
    async with cluster(settings, hosts=2) as c:
        _, key = await c.user("ann@example.com")
        ids = [(await c.create(key))["id"] for _ in range(4)]
        silent = c.host_of(ids[0])
        stuck = [cid for cid in ids if c.host_of(cid) is silent]
        for cid in ids:
            await _stick(c, cid, "resuming")
        async with c.services.db.transaction() as tx:
            await tx.session.execute(update(HostRow).where(HostRow.id == silent.host_id)
                                     .values(status="unreachable"))  # fmt: skip
        await c.services.reconciler.run_once()
        for cid in ids:
            assert await _status(c, cid) == ("missing" if cid in stuck else "running"), cid


async def test_a_starting_control_plane_settles_at_once(settings: CPSettings) -> None:
    """The first pass runs as the reconciler starts, not an interval later."""
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        c.hosts[0].agent.capsules[cid].state = pb.CapsuleState.PAUSED
        await _stick(c, cid, "pausing")
        later = settings.model_copy(update={"reconcile_interval_s": 3600})
        async with running(create_app(later)):  # a second control plane on the same database
            # The row is in the database the other app writes: nothing to wait on but it.
            with anyio.fail_after(HANG_S):
                while await _status(c, cid) != "paused":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
