"""Deleting a team (SQLite and PostgreSQL, fake agents): the team holding the platform admin's
key is refused (409 `team_protected`) and the operator keeps their way in; any other team's
capsules are destroyed on their agents, its templates deleted there and in the database, its
keys revoked; a capsule its host could not destroy then is destroyed by the reconciler; a create
that finishes after the deletion leaves no VM behind."""

from __future__ import annotations

import anyio
import httpx
import pytest

from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import HANG_S
from tests.integration.cp.cluster import cluster
from tests.integration.cp.harness import Account, signup

pytestmark = pytest.mark.postgres  # touches database behaviour (CONTRIBUTING.md)


async def _team_with_key(
    client: httpx.AsyncClient, owner: Account, name: str
) -> tuple[str, dict[str, str], dict[str, str]]:
    """A new team of `owner`: its id, a session in it and a key of it."""
    r = await client.post("/v1/teams", json={"name": name}, headers=owner.headers)
    team = r.json()["id"]
    r = await client.post("/v1/auth/switch-team", json={"team_id": team}, headers=owner.headers)
    session = {"Authorization": f"Bearer {r.json()['token']}"}
    r = await client.post("/v1/api-keys", json={"name": "t"}, headers=session)
    return team, session, {"X-API-Key": r.json()["key"]}


async def test_the_admins_team_cannot_be_deleted(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        me = (await c.client.get("/v1/me", headers=c.admin)).json()
        r = await c.client.delete(f"/v1/teams/{me['team_id']}", headers=c.admin)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "team_protected"
        assert (await c.client.get("/v1/me", headers=c.admin)).status_code == 200
        assert (await c.client.get("/v1/admin/users", headers=c.admin)).status_code == 200

        # An ordinary user's team is not protected by an admin's key elsewhere.
        owner = await signup(c.client, "owner@example.com")
        team, _, _ = await _team_with_key(c.client, owner, "Temp")
        r = await c.client.delete(f"/v1/teams/{team}", headers=owner.headers)
        assert r.status_code == 204


async def test_deleting_a_team_destroys_its_capsules_and_templates(settings: CPSettings) -> None:
    async with cluster(settings, hosts=2) as c:
        owner = await signup(c.client, "owner@example.com")
        team, _, key = await _team_with_key(c.client, owner, "Doomed")
        _, bystander = await c.user("bob@example.com")
        running = [(await c.create(key))["id"] for _ in range(3)]
        paused = (await c.create(key))["id"]
        assert (await c.client.post(f"/v1/capsules/{paused}/pause", headers=key)).status_code == 200
        snap = await c.client.post("/v1/snapshots", json={"sandbox_id": running[0],
                                                          "name": "mine"}, headers=key)  # fmt: skip
        assert snap.status_code == 201
        [template_id] = [t for h in c.hosts for t in h.agent.templates if t.startswith("tpl-")]
        from_snapshot = (await c.create(key, template="mine"))["id"]
        kept = (await c.create(bystander))["id"]
        doomed = {*running, paused, from_snapshot}
        on_agents = {cid for h in c.hosts for cid in h.agent.capsules}
        assert doomed | {kept} == on_agents

        r = await c.client.delete(f"/v1/teams/{team}", headers=owner.headers)
        assert r.status_code == 204
        on_agents = {cid for h in c.hosts for cid in h.agent.capsules}
        assert on_agents == {kept}
        assert all(template_id not in h.agent.templates for h in c.hosts)
        async with c.services.db.transaction() as tx:
            assert await tx.templates.of_team(team) == []
            assert await tx.capsules.list_team(team) == []
            assert await tx.capsules.count_holding(team) == 0
        assert (await c.client.get("/v1/me", headers=key)).status_code == 401
        assert (await c.client.get(f"/v1/capsules/{kept}", headers=bystander)).status_code == 200
        # The capsules no longer count on their hosts.
        async with c.services.db.transaction() as tx:
            committed = await tx.capsules.committed()
        assert sum(x.capsules for x in committed.values()) == 1


async def test_a_capsule_left_on_a_silent_host_is_destroyed_later(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        owner = await signup(c.client, "owner@example.com")
        team, _, key = await _team_with_key(c.client, owner, "Doomed")
        cid = (await c.create(key))["id"]
        host = c.hosts[0]
        token, host.agent.token = host.agent.token, "not-the-agent-token"  # the host refuses us
        r = await c.client.delete(f"/v1/teams/{team}", headers=owner.headers)
        assert r.status_code == 204
        assert cid in host.agent.capsules
        host.agent.token = token
        await c.services.reconciler.run_once()
        assert cid not in host.agent.capsules


async def test_a_create_finishing_after_the_deletion_leaves_no_vm(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        owner = await signup(c.client, "owner@example.com")
        team, _, key = await _team_with_key(c.client, owner, "Doomed")
        agent = c.hosts[0].agent
        entered, release = anyio.Event(), anyio.Event()

        async def hold(request: pb.CreateCapsuleRequest) -> None:
            entered.set()
            await release.wait()

        # the reconciler has called the agent already, as it may when the machine is busy
        await c.services.reconciler.run_once()
        assert agent.calls or c.hosts[0].app.rpcs, "the reconciler asked the agent nothing"
        agent.create_hook = hold
        answers = []

        async def make() -> None:
            answers.append(await c.client.post("/v1/capsules", json={"template": "minimal"},
                                               headers=key))  # fmt: skip

        async with anyio.create_task_group() as tg:
            tg.start_soon(make)
            with anyio.fail_after(HANG_S):
                while not entered.is_set():
                    assert not answers, f"answered before the agent was asked: {answers[0].text}"
                    await anyio.sleep(0.02)
            r = await c.client.delete(f"/v1/teams/{team}", headers=owner.headers)
            assert r.status_code == 204
            release.set()
        assert answers[0].status_code == 404
        assert agent.capsules == {}
