"""Capsule lifecycle through the public API, against fake agents (the lifecycle and a failed
create on PostgreSQL too): create/list/get/pause/resume/ping/destroy, the team wall (another
team's key gets 404 on every capsule route), credentials (401), admission (503), and the SDK's
shapes (statuses, aware timestamps, 404 after destroy)."""

from __future__ import annotations

from datetime import datetime

import pytest

from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.capsules import CapsuleStatus
from tests.integration.cp.cluster import cluster


@pytest.mark.postgres
async def test_lifecycle(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        doc = await c.create(key, template="minimal", timeout_sec=5)
        cid = doc["id"]
        assert doc["status"] == "running"
        assert doc["vcpus"] == 1
        assert doc["memory_mb"] == 256
        assert doc["timeout_sec"] == 60  # positive idle timeouts below 60 s are raised to it
        assert doc["host_ip"].startswith("10.99.0.")
        assert doc["metadata"]["agent_version"] == "fake"
        for name in ("created_at", "started_at", "last_active_at", "last_updated"):
            assert datetime.fromisoformat(doc[name]).tzinfo is not None, name

        r = await c.client.get("/v1/capsules", headers=key)
        assert [x["id"] for x in r.json()] == [cid]
        r = await c.client.get(f"/api/v1/capsules/{cid}", headers=key)  # the SDK's default base
        assert r.json()["status"] == "running"

        r = await c.client.post(f"/v1/capsules/{cid}/resume", headers=key)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "invalid_state"
        r = await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)
        assert r.status_code == 200
        assert r.json()["status"] == "paused"
        assert r.json()["host_ip"] == ""
        r = await c.client.post(f"/v1/capsules/{cid}/ping", headers=key)
        assert r.status_code == 409
        r = await c.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}, headers=key)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "invalid_state"
        r = await c.client.post(f"/v1/capsules/{cid}/resume", headers=key)
        assert r.status_code == 200
        assert r.json()["status"] == "running"
        r = await c.client.post(f"/v1/capsules/{cid}/ping", headers=key)
        assert r.status_code == 204

        r = await c.client.delete(f"/v1/capsules/{cid}", headers=key)
        assert r.status_code == 204
        assert cid not in c.hosts[0].agent.capsules
        r = await c.client.get(f"/v1/capsules/{cid}", headers=key)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        assert (await c.client.get("/v1/capsules", headers=key)).json() == []
        r = await c.client.delete(f"/v1/capsules/{cid}", headers=key)
        assert r.status_code == 404

        r = await c.client.get("/v1/audit-logs", headers=key)
        actions = [e["action"] for e in r.json()]
        for action in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
            assert action in actions


ROUTES = [
    ("GET", ""), ("DELETE", ""), ("POST", "/pause"), ("POST", "/resume"), ("POST", "/ping"),
    ("POST", "/exec"), ("GET", "/processes"), ("DELETE", "/processes/1"),
    ("POST", "/files/read"), ("POST", "/files/write"), ("POST", "/files/stream/read"),
    ("POST", "/files/stream/write"), ("POST", "/files/list"), ("POST", "/files/mkdir"),
    ("POST", "/files/remove"), ("POST", "/files/stat"), ("POST", "/files/move"),
]  # fmt: skip
BODIES = {"/exec": {"cmd": "echo hi"}, "/files/move": {"source": "/a", "destination": "/b"}}


async def test_other_team_gets_404_everywhere(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, owner = await c.user("owner@example.com")
        _, other = await c.user("other@example.com")
        cid = (await c.create(owner))["id"]
        for method, suffix in ROUTES:
            body = BODIES.get(suffix, {"path": "/root/x"})
            if suffix.endswith("write"):
                kw: dict[str, object] = {"files": {"file": ("u", b"x")}, "data": {"path": "/x"}}
            else:
                kw = {"json": body} if method == "POST" else {}
            r = await c.client.request(method, f"/v1/capsules/{cid}{suffix}", headers=other,
                                       **kw)  # type: ignore[arg-type]  # fmt: skip
            assert r.status_code == 404, (method, suffix, r.text)
            assert r.json()["error"]["code"] == "not_found", (method, suffix)
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid}, headers=other)
        assert r.status_code == 404
        # ... and the capsule is untouched
        r = await c.client.get(f"/v1/capsules/{cid}", headers=owner)
        assert r.json()["status"] == "running"
        assert (await c.client.get("/v1/capsules", headers=other)).json() == []


@pytest.mark.parametrize("headers", [
    {}, {"X-API-Key": "wrn_" + "0" * 32}, {"X-API-Key": "nonsense"},
    {"Authorization": "Bearer not.a.jwt"},
])  # fmt: skip
async def test_bad_or_missing_credentials_are_401(
    settings: CPSettings, headers: dict[str, str]
) -> None:
    async with cluster(settings, hosts=0) as c:
        calls = [("POST", "/v1/capsules"), ("GET", "/v1/capsules"), ("POST", "/v1/snapshots")]
        calls += [(method, f"/v1/capsules/cl-x{suffix}") for method, suffix in ROUTES]
        for method, path in calls:
            r = await c.client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]["code"] == "unauthorized"


async def test_no_host_is_503_host_unavailable(settings: CPSettings) -> None:
    async with cluster(settings, hosts=0) as c:
        _, key = await c.user("ann@example.com")
        r = await c.client.post("/v1/capsules", json={}, headers=key)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "host_unavailable"
        await c.add_host("late")
        assert (await c.client.post("/v1/capsules", json={}, headers=key)).status_code == 201


async def test_no_room_is_503_and_bad_template_404(settings: CPSettings) -> None:
    async with cluster(settings, hosts=0) as c:
        await c.add_host("tiny", memory_total_mb=2048, memory_available_mb=300)
        _, key = await c.user("ann@example.com")
        r = await c.client.post("/v1/capsules", json={"memory_mb": 4096}, headers=key)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "host_unavailable"
        r = await c.client.post("/v1/capsules", json={"template": "nope"}, headers=key)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        r = await c.client.post("/v1/capsules", json={"template": "../etc"}, headers=key)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_request"


@pytest.mark.postgres
async def test_failed_create_leaves_nothing(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        c.hosts[0].agent.fail_create = "unavailable"
        r = await c.client.post("/v1/capsules", json={}, headers=key)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "unavailable"
        assert (await c.client.get("/v1/capsules", headers=key)).json() == []
        assert c.hosts[0].agent.calls[-1] == "destroy"


def test_statuses_are_the_sdks() -> None:
    assert {s.value for s in CapsuleStatus} == {
        "pending", "starting", "running", "pausing", "paused", "snapshotting", "resuming",
        "stopping", "hibernated", "stopped", "missing", "error",
    }  # fmt: skip
