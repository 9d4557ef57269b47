"""Hosts, scheduling and the background loops (fake agents; SQLite and PostgreSQL): the
registration contract the real agent speaks, management, least-loaded placement, the host
monitor (`missing`) and the reconciler (orphans, auto-pauses, stray capsules)."""

from __future__ import annotations

import stat

import anyio
import pytest
from sqlalchemy import select

from nestbox.controlplane.db.models import HostRow, HostTokenRow
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.hosts import HOST_TOKEN_HEADER
from tests.conftest import HANG_S
from tests.integration.cp.cluster import cluster

pytestmark = pytest.mark.postgres  # touches database behaviour (CONTRIBUTING.md)


async def test_registration_contract(settings: CPSettings) -> None:
    async with cluster(settings, hosts=0) as c:
        r = await c.client.post("/v1/hosts", json={"provider": "lab"}, headers=c.admin)
        assert r.status_code == 201
        created = r.json()
        host_id, token = created["host"]["id"], created["registration_token"]
        assert created["host"]["status"] == "pending"
        reg = {"token": token, "address": "127.0.0.1:1", "arch": "x86_64", "cpu_cores": 2,
               "memory_mb": 4096, "disk_gb": 20}  # fmt: skip
        r = await c.client.post("/v1/hosts/register", json=reg)
        assert r.status_code == 200
        doc = r.json()
        assert doc["host"]["id"] == host_id
        assert doc["host"]["status"] == "online"
        assert doc["agent_token"]
        assert doc["refresh_token"]
        assert doc["token"]
        r = await c.client.post("/v1/hosts/register", json=reg)  # one use only
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"

        beat = {"capsules_running": 0, "cpu_cores": 2, "cpu_used_pct": 1.0, "load_1m": 0.0,
                "memory_total_mb": 4096, "memory_available_mb": 3000, "disk_total_gb": 20,
                "disk_free_gb": 10}  # fmt: skip
        url = f"/v1/hosts/{host_id}/heartbeat"
        r = await c.client.post(url, json=beat, headers={HOST_TOKEN_HEADER: doc["token"]})
        assert r.status_code == 200
        assert r.json() == {"status": "online"}
        r = await c.client.post(url, json=beat, headers={HOST_TOKEN_HEADER: "bad"})
        assert r.status_code == 401
        r = await c.client.post(url, json=beat)
        assert r.status_code == 401
        # a session JWT is no host token, and a host token is no session
        r = await c.client.get("/v1/capsules", headers={"Authorization": f"Bearer {doc['token']}"})
        assert r.status_code == 401

        r = await c.client.post(
            "/v1/hosts/auth/refresh", json={"refresh_token": doc["refresh_token"]}
        )
        assert r.status_code == 200
        renewed = r.json()
        r = await c.client.post(url, json=beat, headers={HOST_TOKEN_HEADER: renewed["token"]})
        assert r.status_code == 200
        r = await c.client.post(
            "/v1/hosts/auth/refresh", json={"refresh_token": doc["refresh_token"]}
        )
        assert r.status_code == 401  # rotated

        r = await c.client.get(f"/v1/hosts/{host_id}", headers=c.admin)
        assert r.json()["load"]["memory_available_mb"] == 3000
        assert r.json()["provider"] == "lab"

        r = await c.client.post(f"/v1/hosts/{host_id}/token", headers=c.admin)
        assert r.status_code == 201
        r = await c.client.post(
            "/v1/hosts/register", json={**reg, "token": r.json()["registration_token"]}
        )
        assert r.status_code == 200  # re-registration with a fresh token


async def test_host_management_rights(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        r = await c.client.post("/v1/hosts", json={}, headers=key)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "forbidden"
        assert (await c.client.get("/v1/hosts", headers=key)).json() == []
        host_id = c.hosts[0].host_id
        r = await c.client.get(f"/v1/hosts/{host_id}", headers=key)
        assert r.status_code == 404
        r = await c.client.delete(f"/v1/hosts/{host_id}", headers=key)
        assert r.status_code == 404
        # a team admin may add its own BYOC host
        r = await c.client.post("/v1/hosts", json={"type": "byoc"}, headers=key)
        assert r.status_code == 201
        listed = (await c.client.get("/v1/hosts", headers=key)).json()
        assert [h["type"] for h in listed] == ["byoc"]
        assert len((await c.client.get("/v1/hosts", headers=c.admin)).json()) == 2


async def test_delete_host_with_capsules(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        host = c.hosts[0]
        r = await c.client.delete(f"/v1/hosts/{host.host_id}", headers=c.admin)
        assert r.status_code == 409
        doc = r.json()
        assert doc["error"]["code"] == "host_has_capsules"
        assert doc["capsule_ids"] == [cid]
        assert doc["sandbox_ids"] == [cid]
        r = await c.client.delete(f"/v1/hosts/{host.host_id}?force=true", headers=c.admin)
        assert r.status_code == 204
        assert host.agent.calls[-1] == "terminate"
        r = await c.client.get(f"/v1/capsules/{cid}", headers=key)
        assert r.json()["status"] == "stopped"
        r = await c.client.delete(f"/v1/capsules/{cid}", headers=key)
        assert r.status_code == 204
        assert (await c.client.get(f"/v1/hosts/{host.host_id}", headers=c.admin)).status_code == 404


async def test_least_loaded_placement(settings: CPSettings) -> None:
    async with cluster(settings, hosts=0) as c:
        busy = await c.add_host("busy", memory_available_mb=9000, cpu_used_pct=70.0)
        idle = await c.add_host("idle")
        _, key = await c.user("ann@example.com")
        placed = [(await c.create(key))["host_id"] for _ in range(3)]
        assert placed == [idle.host_id] * 3
        assert len(idle.agent.capsules) == 3
        assert not busy.agent.capsules

        # What the database placed counts before any heartbeat reports it: with the same
        # load, new capsules spread to the host holding fewer.
        await c.heartbeat(busy)
        placed = [(await c.create(key, memory_mb=4096))["host_id"] for _ in range(2)]
        assert placed[0] == busy.host_id


async def test_silent_host_makes_capsules_missing(settings: CPSettings) -> None:
    fast = settings.model_copy(update={"heartbeat_unreachable_after_s": 0.6,
                                       "host_monitor_interval_s": 0.1,
                                       "reconcile_interval_s": 3600})  # fmt: skip
    async with cluster(fast, hosts=0) as c:
        host = await c.add_host("h")
        other = await c.add_host("o")
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        assert c.host_of(cid) in (host, other)
        silent = c.host_of(cid)
        alive = other if silent is host else host
        paused = (await c.create(key))["id"]
        await c.client.post(f"/v1/capsules/{paused}/pause", headers=key)
        silent_holds_paused = paused in silent.agent.capsules

        with anyio.fail_after(HANG_S):
            while True:
                await c.heartbeat(alive)  # the other host keeps beating
                r = await c.client.get(f"/v1/capsules/{cid}", headers=key)
                if r.json()["status"] == "missing":
                    break
                await anyio.sleep(0.1)
        doc = (await c.client.get(f"/v1/hosts/{silent.host_id}", headers=c.admin)).json()
        assert doc["status"] == "unreachable"
        assert (await c.client.get(f"/v1/hosts/{alive.host_id}", headers=c.admin)).json()[
            "status"
        ] == "online"
        r = await c.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "x"}, headers=key)
        assert r.status_code == 409
        # a new capsule avoids the silent host
        assert (await c.create(key))["host_id"] == alive.host_id

        # heartbeats return: the host is online and its capsules are what the agent says (both
        # hosts keep beating: with 0.6 s of grace a busy machine could let either lapse again)
        want = {cid: "running", **({paused: "paused"} if silent_holds_paused else {})}
        with anyio.fail_after(30):
            while True:
                await c.heartbeat(silent)
                await c.heartbeat(alive)
                seen = {i: (await c.client.get(f"/v1/capsules/{i}", headers=key)).json()["status"]
                        for i in want}  # fmt: skip
                if seen == want:
                    break
                await anyio.sleep(0.05)
        r = await c.client.get("/v1/admin/audit-logs", headers=c.admin)
        actions = [e["action"] for e in r.json()]
        assert "host.down" in actions
        assert "host.up" in actions


async def test_reconciler_follows_the_agents(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        agent = c.hosts[0].agent
        _, key = await c.user("ann@example.com")
        orphan, reaped, dead, gone = [(await c.create(key))["id"] for _ in range(4)]
        del agent.capsules[orphan]  # its VM vanished
        agent.auto_pause(reaped)  # the idle reaper paused it
        agent.capsules[dead].state = 9  # type: ignore[assignment]  # CAPSULE_STATE_ERROR
        # destroyed while its host could not do it: the reconciler finishes the job
        saved = agent.capsules[gone]
        await c.client.delete(f"/v1/capsules/{gone}", headers=key)
        agent.capsules[gone] = saved

        await c.services.reconciler.run_once()
        statuses = {cid: (await c.client.get(f"/v1/capsules/{cid}", headers=key)).json()["status"]
                    for cid in (orphan, reaped, dead)}  # fmt: skip
        assert statuses == {orphan: "stopped", reaped: "paused", dead: "error"}
        assert gone not in agent.capsules
        assert (await c.client.get(f"/v1/capsules/{gone}", headers=key)).status_code == 404
        listed = {
            x["id"]: x["status"] for x in (await c.client.get("/v1/capsules", headers=key)).json()
        }
        assert listed == statuses  # died on their own: visible until destroyed
        r = await c.client.get("/v1/audit-logs", headers=key)
        assert "capsule.auto_pause" in [e["action"] for e in r.json()]
        # a capsule that is stopped can still be destroyed (its host no longer knows it)
        assert (await c.client.delete(f"/v1/capsules/{orphan}", headers=key)).status_code == 204


async def test_heartbeat_counts_that_disagree_trigger_a_reconcile(settings: CPSettings) -> None:
    slow = settings.model_copy(update={"reconcile_interval_s": 3600})
    async with cluster(slow) as c:
        host = c.hosts[0]
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        host.agent.auto_pause(cid)  # e.g. the agent paused everything as it stopped
        await c.heartbeat(host)  # reports 0 running, 1 paused; the database says 1 running
        with anyio.fail_after(HANG_S):
            while True:
                r = await c.client.get(f"/v1/capsules/{cid}", headers=key)
                if r.json()["status"] == "paused":
                    break
                await anyio.sleep(0.05)


BAD_ADDRESSES = [
    "169.254.169.254:80",
    "127.0.0.1:9725/v1?",
    "localhost:22",
    "[::1]:80",
    "user@host:1",
    "host:0",
    "host:70000",
]
REGISTRATION = {"arch": "x86_64", "cpu_cores": 2, "memory_mb": 4096, "disk_gb": 20}


async def test_byoc_hosts_may_not_point_at_the_control_plane(settings: CPSettings) -> None:
    async with cluster(settings, hosts=0) as c:
        _, key = await c.user("ann@example.com")  # a team admin (owner of her team)
        r = await c.client.post("/v1/hosts", json={"type": "byoc"}, headers=key)
        assert r.status_code == 201, r.text
        host_id, token = r.json()["host"]["id"], r.json()["registration_token"]
        for address in BAD_ADDRESSES:
            reg = {**REGISTRATION, "token": token, "address": address}
            r = await c.client.post("/v1/hosts/register", json=reg)
            assert r.status_code == 400, (address, r.text)
            assert r.json()["error"]["code"] == "invalid_request", address
        # refused before the one-time token was spent; the host stays pending and addressless
        async with c.services.db.transaction() as tx:
            row = await tx.session.scalar(
                select(HostTokenRow).where(HostTokenRow.host_id == host_id)
            )
        assert row is not None
        assert row.used_at is None
        doc = (await c.client.get(f"/v1/hosts/{host_id}", headers=key)).json()
        assert (doc["status"], doc["address"]) == ("pending", "")

        # a platform admin's regular host may use loopback (as `make run` does), not the rest
        for address, status in (("169.254.169.254:80", 400), ("host:0", 400),
                                ("127.0.0.1:9725/v1?", 400), ("127.0.0.1:1", 200),
                                ("[::1]:1", 200), ("localhost:1", 200)):  # fmt: skip
            r = await c.client.post("/v1/hosts", json={}, headers=c.admin)
            reg = {**REGISTRATION, "token": r.json()["registration_token"], "address": address}
            r = await c.client.post("/v1/hosts/register", json=reg)
            assert r.status_code == status, (address, r.text)


async def test_agent_tokens_are_sealed_at_rest(settings: CPSettings) -> None:
    async with cluster(settings, hosts=0) as c:
        r = await c.client.post("/v1/hosts", json={}, headers=c.admin)
        reg = {**REGISTRATION, "token": r.json()["registration_token"], "address": "127.0.0.1:1"}
        doc = (await c.client.post("/v1/hosts/register", json=reg)).json()
        host_id, agent_token, proxy_token = (
            doc["host"]["id"],
            doc["agent_token"],
            doc["proxy_token"],
        )
        assert agent_token != proxy_token
        async with c.services.db.transaction() as tx:
            row = await tx.session.get(HostRow, host_id)
            assert row is not None
            stored = (row.agent_token_enc or "", row.proxy_token_enc or "")
            host = await tx.hosts.get(host_id)
        assert stored[0].startswith("v1.")
        assert stored[1].startswith("v1.")
        assert agent_token not in stored[0] + stored[1]
        assert proxy_token not in stored[0] + stored[1]
        assert host is not None
        assert c.services.hosts.agent_token(host) == agent_token
        assert c.services.hosts.proxy_token(host) == proxy_token
        key = settings.data_dir / "secret-key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
