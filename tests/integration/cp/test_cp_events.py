"""The event stream (`GET /v1/events/stream`) against fake agents: a team sees its own capsule
lifecycle (create, pause, resume, auto-pause, missing, destroy, snapshots) with Wrenn's fields
and nothing of another team's; on PostgreSQL a stream on one control plane sees what another
control plane on the same database did (LISTEN/NOTIFY); heartbeat comments; a revoked key's
stream ends."""

from __future__ import annotations

from datetime import datetime

import pytest

from nestbox.controlplane.app import create_app
from nestbox.controlplane.settings import CPSettings
from tests.conftest import eventually, free_port
from tests.integration.asgi_server import serve
from tests.integration.cp.cluster import cluster
from tests.integration.cp.harness import running
from tests.integration.cp.sse import open_stream


def quiet(settings: CPSettings, **more: object) -> CPSettings:
    """The reconciler runs only when the test kicks it."""
    return settings.model_copy(update={"reconcile_interval_s": 3600,
                                       "host_monitor_interval_s": 3600, **more})  # fmt: skip


async def test_a_team_sees_its_own_lifecycle_only(settings: CPSettings) -> None:
    async with cluster(quiet(settings)) as c:
        ann, ann_key = await c.user("ann@example.com")
        bob, bob_key = await c.user("bob@example.com")
        async with open_stream(c.url, ann_key) as mine, open_stream(c.url, bob.headers) as theirs:
            cid = (await c.create(ann_key))["id"]
            created = await mine.wait_for("capsule.create", cid)
            assert created["outcome"] == "success"
            assert created["team_id"] == ann.team_id
            assert created["resource"] == {"id": cid, "type": "sandbox"}
            assert created["actor"]["type"] == "api_key"
            assert created["actor"]["name"] == ann.email
            assert created["sandbox"]["status"] == "running"
            assert datetime.fromisoformat(created["timestamp"]).tzinfo is not None

            assert (await c.client.post(f"/v1/capsules/{cid}/pause", headers=ann_key)).is_success
            await mine.wait_for("capsule.pause", cid)
            assert (await c.client.post(f"/v1/capsules/{cid}/resume", headers=ann_key)).is_success
            resumed = await mine.wait_for("capsule.resume", cid)
            assert resumed["sandbox"]["status"] == "running"

            # The idle reaper pauses it on the host: the reconciler tells the stream.
            c.host_of(cid).agent.auto_pause(cid)
            await c.services.reconciler.run_once()
            changed = await mine.wait_for("capsule.state.changed", cid)
            assert changed["metadata"] == {"from": "running", "to": "paused",
                                           "reason": "ttl_expired"}  # fmt: skip
            assert "outcome" not in changed
            [auto] = await eventually(
                lambda: [e for e in mine.events if e["event"] == "capsule.pause"][1:]
            )
            assert auto["actor"]["type"] == "system"
            assert auto["metadata"]["reason"] == "ttl_expired"

            r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "snap"},
                                    headers=ann_key)  # fmt: skip
            assert r.status_code == 201, r.text
            snap = await mine.wait_for("template.snapshot.create")
            assert snap["resource"]["type"] == "snapshot"
            assert (await c.client.delete("/v1/snapshots/snap", headers=ann_key)).is_success
            await mine.wait_for("template.snapshot.delete")

            assert (await c.client.delete(f"/v1/capsules/{cid}", headers=ann_key)).is_success
            destroyed = await mine.wait_for("capsule.destroy", cid)
            assert destroyed["sandbox"]["status"] == "stopped"

            # Bob's own capsule reaches Bob's stream; nothing of Ann's ever did.
            bobs = (await c.create(bob_key))["id"]
            await theirs.wait_for("capsule.create", bobs)
            assert all(e.get("team_id") in (None, bob.team_id) for e in theirs.events)
            assert cid not in str(theirs.events)
            assert bobs not in str(mine.events)


async def test_missing_and_host_events(settings: CPSettings) -> None:
    async with cluster(quiet(settings, heartbeat_unreachable_after_s=0.001)) as c:
        _, key = await c.user("ann@example.com")
        async with open_stream(c.url, key) as mine, open_stream(c.url, c.admin) as admin:
            cid = (await c.create(key))["id"]
            # A control plane that only just started heard nothing yet: no host is silent
            # before it has listened for as long as the limit (a restart is not host loss).
            assert await c.services.hosts.mark_silent(0.001, listened_for_s=0.0) == []
            r = await c.client.get(f"/v1/capsules/{cid}", headers=key)
            assert r.json()["status"] == "running"
            await c.services.hosts.mark_silent(0.001, listened_for_s=0.001)
            changed = await mine.wait_for("capsule.state.changed", cid)
            assert changed["metadata"]["to"] == "missing"
            # A shared host's events go to platform admins, not to every team.
            await admin.wait_for("host.down")
            await c.heartbeat(c.hosts[0])
            await admin.wait_for("host.up")
            assert "host.down" not in mine.kinds()


async def test_heartbeat_comments_and_a_revoked_key_ends_the_stream(
    settings: CPSettings,
) -> None:
    fast = quiet(settings, events_heartbeat_s=0.2, session_recheck_s=0.1)
    async with cluster(fast) as c:
        ann, key = await c.user("ann@example.com")
        async with open_stream(c.url, key) as stream:
            await eventually(lambda: stream.comments, what="a keepalive comment")
            assert stream.comments[0] == ": keepalive"
            [made] = (await c.client.get("/v1/api-keys", headers=ann.headers)).json()
            r = await c.client.delete(f"/v1/api-keys/{made['id']}", headers=ann.headers)
            assert r.status_code == 204
            await eventually(lambda: stream.ended, what="the revoked key's stream ends")


@pytest.mark.postgres
async def test_two_control_planes_share_events(settings: CPSettings) -> None:
    """On PostgreSQL, an event one control plane publishes reaches the streams of another
    (LISTEN/NOTIFY); on SQLite, two apps on one file in one process (the in-process path)."""
    async with cluster(quiet(settings)) as c:
        _, key = await c.user("ann@example.com")
        other = create_app(settings)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        async with running(other), serve(other, port), open_stream(url, key) as stream:
            cid = (await c.create(key))["id"]
            await stream.wait_for("capsule.create", cid)
