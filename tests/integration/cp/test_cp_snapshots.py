"""Snapshot templates through the public API (fake agents; the main flow on PostgreSQL
too)."""

from __future__ import annotations

from datetime import datetime

import pytest

from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import cluster


@pytest.mark.postgres
async def test_snapshot_then_capsules_from_it(settings: CPSettings) -> None:
    async with cluster(settings, hosts=2) as c:
        _, key = await c.user("ann@example.com")
        _, other = await c.user("bob@example.com")
        cid = (await c.create(key))["id"]
        holder = c.host_of(cid)

        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "base-1"},
                                headers=key)  # fmt: skip
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["name"] == "base-1"
        assert doc["type"] == "snapshot"
        assert doc["platform"] is False
        assert doc["protected"] is False
        assert datetime.fromisoformat(doc["created_at"]).tzinfo is not None
        assert (doc["vcpus"], doc["memory_mb"]) == (1, 256)
        r = await c.client.get(f"/v1/capsules/{cid}", headers=key)
        assert r.json()["status"] == "paused"  # left paused, as in Wrenn

        # capsules from it go to the host that holds it, whatever the load
        for _ in range(2):
            made = await c.create(key, template="base-1")
            assert made["host_id"] == holder.host_id
            assert made["template"] == "base-1"
        # the other team sees nothing of it
        r = await c.client.post("/v1/capsules", json={"template": "base-1"}, headers=other)
        assert r.status_code == 404
        names = {t["name"] for t in (await c.client.get("/v1/snapshots", headers=other)).json()}
        assert names == {"minimal", "minimal-base", "base"}  # the platform's

        listed = (await c.client.get("/v1/snapshots?type=snapshot", headers=key)).json()
        assert {t["name"]: t["platform"] for t in listed} == {
            "base-1": False, "minimal": True, "base": True,
        }  # fmt: skip
        mine = next(t for t in listed if t["name"] == "base-1")
        assert mine["created_by"] is not None  # the key's id
        assert (mine["default_user"], mine["default_env"]) == ("root", {})
        bases = (await c.client.get("/v1/snapshots?type=base", headers=key)).json()
        assert [(t["name"], t["created_by"]) for t in bases] == [("minimal-base", "platform")]
        assert (await c.client.get("/v1/snapshots?type=x", headers=key)).status_code == 400

        # of a paused capsule too; same name needs overwrite
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "base-1"},
                                headers=key)  # fmt: skip
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "conflict"
        again = {"sandbox_id": cid, "name": "base-1"}
        r = await c.client.post("/v1/snapshots?overwrite=true", json=again, headers=key)
        assert r.status_code == 201
        assert len([t for t in holder.agent.templates if t.startswith("tpl-")]) == 1
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "minimal"},
                                headers=key)  # fmt: skip
        assert r.status_code == 409  # platform names are reserved
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid}, headers=key)
        assert r.status_code == 201
        assert r.json()["name"].startswith("template-")

        assert (await c.client.delete("/v1/snapshots/minimal", headers=key)).status_code == 403
        assert (await c.client.delete("/v1/snapshots/base-1", headers=other)).status_code == 404
        assert (await c.client.delete("/v1/snapshots/base-1", headers=key)).status_code == 204
        assert (await c.client.delete("/v1/snapshots/base-1", headers=key)).status_code == 404
        r = await c.client.post("/v1/capsules", json={"template": "base-1"}, headers=key)
        assert r.status_code == 404


async def test_snapshot_needs_running_or_paused(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        c.hosts[0].agent.capsules.pop(cid)
        await c.services.reconciler.run_once()  # -> stopped
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid}, headers=key)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "invalid_state"
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": "cl-none"}, headers=key)
        assert r.status_code == 404


@pytest.mark.parametrize("route", ["/v1/snapshots", "/v1/admin/templates"])
async def test_a_template_in_use_is_not_deleted(settings: CPSettings, route: str) -> None:
    """Both deletion routes are one path (`SnapshotService.delete`): 409 with the ids of the
    capsules made from the template while any is not gone, then 204; another team gets 404."""
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        _, other = await c.user("bob@example.com")
        source = (await c.create(key))["id"]
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": source, "name": "tpl-a"},
                                headers=key)  # fmt: skip
        assert r.status_code == 201, r.text
        users = sorted([(await c.create(key, template="tpl-a"))["id"] for _ in range(2)])
        r = await c.client.delete(f"{route}/tpl-a", headers=key)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "conflict"
        assert r.json()["capsule_ids"] == users
        assert (await c.client.delete(f"{route}/tpl-a", headers=other)).status_code == 404
        # still there, still usable
        assert (await c.create(key, template="tpl-a"))["template"] == "tpl-a"
        on_host = [t for t in c.hosts[0].agent.templates if t.startswith("tpl-")]
        assert len(on_host) == 1
        for capsule in (await c.client.get("/v1/capsules", headers=key)).json():
            if capsule["id"] != source:
                r = await c.client.delete(f"/v1/capsules/{capsule['id']}", headers=key)
                assert r.status_code == 204
        r = await c.client.delete(f"{route}/tpl-a", headers=key)
        assert r.status_code == 204, r.text
        assert on_host[0] not in c.hosts[0].agent.templates
        assert (await c.client.delete(f"{route}/tpl-a", headers=key)).status_code == 404
