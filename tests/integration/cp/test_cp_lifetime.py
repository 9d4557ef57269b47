"""Issue 13's E2B-style extensions on the control plane, against fake agents: metadata (limits,
returned everywhere, filters), keyset paging of `GET /v1/capsules` (250 capsules, new ones made
between pages: each old one exactly once), set-timeout, lifetimes (`ttl_sec` then pause or
destroy, re-armed by a resume), auto-resume, fork (rows, quota, failure), stdin and the watch
stream. The real-capsule side is `tests/e2e/test_lifetime.py`; team walls are in
`test_cp_cross_team.py`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nestbox.controlplane.db.capsules import PageKey
from nestbox.controlplane.db.models import CapsuleRow
from nestbox.controlplane.services.paging import NEXT_CURSOR_HEADER, encode_cursor
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import eventually
from tests.integration.cp.cluster import Cluster, cluster
from tests.integration.cp.harness import new_key

OLD = 250
PAGE = 37


async def _insert_rows(c: Cluster, team_id: str, host_id: str, n: int) -> list[str]:
    """`n` rows straight into the database in one flush (the listing is what is tested, not
    250 creates); every fifth shares its created_at with the one before (ties sort by id)."""
    base = datetime.now(UTC) - timedelta(hours=1)
    rows = [
        CapsuleRow(
            id=f"cl-{i:025d}", team_id=team_id, host_id=host_id, template="minimal",
            status="paused" if i % 10 == 0 else "running", vcpus=1, memory_mb=256,
            disk_mb=5120, meta={"batch": "old", "parity": str(i % 2)},
            created_at=base + timedelta(milliseconds=i - (i % 5 == 4)), last_updated=base,
        )
        for i in range(n)
    ]  # fmt: skip
    async with c.services.db.transaction() as tx:
        tx.session.add_all(rows)
    return [r.id for r in rows]


async def _pages(
    c: Cluster, key: dict[str, str], query: str, between: Any = None
) -> list[dict[str, Any]]:
    """Every page of `query` (limit `PAGE`), calling `between()` after each page."""
    got: list[dict[str, Any]] = []
    cursor = ""
    while True:
        r = await c.client.get(f"/v1/capsules?limit={PAGE}{query}{cursor}", headers=key)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page) <= PAGE
        got += page
        nxt = r.headers.get(NEXT_CURSOR_HEADER)
        if nxt is None:
            return got
        assert len(page) == PAGE
        cursor = f"&cursor={nxt}"
        if between is not None:
            await between()


@pytest.mark.postgres
async def test_list_pages_and_filters(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"team_capsule_quota": 0})) as c:
        ann, key = await c.user("ann@example.com")
        idle = await c.add_host("idle", beat=False)  # holds the rows: the new ones go to h0
        old = await _insert_rows(c, ann.team_id, idle.host_id, OLD)
        made: list[str] = []

        async def create_one() -> None:
            made.append((await c.create(key, metadata={"batch": "new"}))["id"])

        listed = await _pages(c, key, "", between=create_one)
        ids = [x["id"] for x in listed]
        assert len(ids) == len(set(ids)), "a capsule listed twice"
        assert [i for i in ids if i in set(old)] == old  # each once, oldest first
        assert len(made) == OLD // PAGE
        assert set(ids) - set(old) <= set(made)  # new ones only ever after the old ones

        # No limit: the whole listing as a bare array (the wrenn SDK's shape), no cursor.
        r = await c.client.get("/v1/capsules", headers=key)
        assert NEXT_CURSOR_HEADER not in r.headers
        assert [x["id"] for x in r.json()] == old + made

        # Filters, paged too: status, metadata (every pair must match), both.
        paused = await _pages(c, key, "&status=paused")
        assert [x["id"] for x in paused] == old[::10]
        odd = await _pages(c, key, "&metadata.batch=old&metadata.parity=1")
        assert [x["id"] for x in odd] == old[1::2]
        both = await _pages(c, key, "&status=running,paused&metadata.batch=new")
        assert [x["id"] for x in both] == made
        r = await c.client.get("/v1/capsules?metadata.batch=none", headers=key)
        assert r.json() == []

        # Bad queries are 400 invalid_request; another team's cursor shows it nothing.
        for bad in ("limit=0", "limit=1001", "limit=x", "cursor=%%%", "cursor=e30",
                    "status=sleeping", "metadata.%20=x", "metadata.accel=kvm"):  # fmt: skip
            r = await c.client.get(f"/v1/capsules?{bad}", headers=key)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), bad
        _, other = await c.user("bob@example.com")
        cursor = encode_cursor(PageKey(datetime(2000, 1, 1, tzinfo=UTC), "cl-0"))
        r = await c.client.get(f"/v1/capsules?limit=5&cursor={cursor}", headers=other)
        assert r.json() == []


async def test_metadata_is_checked_and_returned_everywhere(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        for bad in ({"agent_version": "x"}, {"": "x"}, {"a b": "x"}, {"k": "v" * 513},
                    {f"k{i}": "v" for i in range(21)}, {"k": 1}):  # fmt: skip
            r = await c.client.post("/v1/capsules", json={"metadata": bad}, headers=key)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), bad
        doc = await c.create(key, metadata={"owner": "ann", "job.id": "42"})
        cid = doc["id"]
        assert doc["metadata"]["owner"] == "ann"
        assert doc["metadata"]["agent_version"] == "fake"  # the system's, beside the user's
        for r in (await c.client.get(f"/v1/capsules/{cid}", headers=key),
                  await c.client.post(f"/v1/capsules/{cid}/pause", headers=key),
                  await c.client.post(f"/v1/capsules/{cid}/resume", headers=key)):  # fmt: skip
            assert r.json()["metadata"]["job.id"] == "42", r.text
        [listed] = (await c.client.get("/v1/capsules?metadata.job.id=42", headers=key)).json()
        assert listed["id"] == cid


async def test_set_timeout(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        agent = c.hosts[0].agent
        r = await c.client.post(f"/v1/capsules/{cid}/timeout", json={"timeout_sec": 300},
                                headers=key)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["timeout_sec"] == 300
        assert agent.capsules[cid].idle_timeout_sec == 300
        r = await c.client.post(f"/v1/capsules/{cid}/timeout", json={"timeout_sec": 5},
                                headers=key)  # fmt: skip
        assert agent.capsules[cid].idle_timeout_sec == r.json()["timeout_sec"] == 60  # the floor
        await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)
        r = await c.client.post(f"/v1/capsules/{cid}/timeout", json={"timeout_sec": 0},
                                headers=key)  # fmt: skip
        assert r.status_code == 200  # a paused capsule's too: kept for its next run
        assert agent.capsules[cid].idle_timeout_sec == 0
        for bad in ({}, {"timeout_sec": -1}, {"ttl_sec": 10**9}, {"on_timeout": "explode"},
                    {"idle": 5}):  # fmt: skip
            r = await c.client.post(f"/v1/capsules/{cid}/timeout", json=bad, headers=key)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), bad
        await c.client.delete(f"/v1/capsules/{cid}", headers=key)
        r = await c.client.post(f"/v1/capsules/{cid}/timeout", json={"timeout_sec": 60},
                                headers=key)  # fmt: skip
        assert r.status_code == 404


async def test_lifetime_pauses_or_destroys_and_a_resume_rearms_it(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"lifetime_interval_s": 0.1})) as c:
        _, key = await c.user("ann@example.com")
        agent = c.hosts[0].agent
        doc = await c.create(key, ttl_sec=1)
        cid = doc["id"]
        assert (doc["on_timeout"], doc["ttl_sec"]) == ("pause", 1)
        end = datetime.fromisoformat(doc["expires_at"])
        assert end - datetime.fromisoformat(doc["started_at"]) == timedelta(seconds=1)
        long = await c.create(key, ttl_sec=3600)

        async def status(capsule_id: str) -> str:
            r = await c.client.get(f"/v1/capsules/{capsule_id}", headers=key)
            return str(r.json()["status"]) if r.status_code == 200 else str(r.status_code)

        await eventually(lambda: _is(status(cid), "paused"), what="paused at its lifetime")
        assert agent.capsules[cid].state == pb.CapsuleState.PAUSED
        assert datetime.now(UTC) >= end
        assert await status(long["id"]) == "running"  # its lifetime is an hour

        r = await c.client.post(f"/v1/capsules/{cid}/resume", headers=key)
        assert datetime.fromisoformat(r.json()["expires_at"]) > end  # a new run, a new end
        await eventually(lambda: _is(status(cid), "paused"), what="paused again")

        # Set on a live capsule: from now; `destroy` removes it.
        body = {"ttl_sec": 1, "on_timeout": "destroy"}
        r = await c.client.post(f"/v1/capsules/{long['id']}/timeout", json=body, headers=key)
        assert r.json()["on_timeout"] == "destroy"
        await eventually(lambda: _is(status(long["id"]), "404"), what="destroyed at its end")
        assert long["id"] not in agent.capsules
        actions = [e["action"] for e in (await c.client.get("/v1/audit-logs", headers=key)).json()]
        assert "capsule.timeout" in actions


async def _is(value: Any, want: str) -> bool:
    return bool(await value == want)


async def test_auto_resume(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        auto = (await c.create(key, auto_resume=True))["id"]
        plain = (await c.create(key))["id"]
        for cid in (auto, plain):
            await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)
        r = await c.client.post(f"/v1/capsules/{plain}/exec", json={"cmd": "echo hi"},
                                headers=key)  # fmt: skip
        assert (r.status_code, r.json()["error"]["code"]) == (409, "invalid_state")
        r = await c.client.post(f"/v1/capsules/{auto}/exec", json={"cmd": "echo hi"},
                                headers=key)  # fmt: skip
        assert (r.status_code, r.json()["stdout"]) == (200, "hi\n")
        doc = (await c.client.get(f"/v1/capsules/{auto}", headers=key)).json()
        assert (doc["status"], doc["auto_resume"]) == ("running", True)
        # a file call resumes it too; so do concurrent calls, once
        await c.client.post(f"/v1/capsules/{auto}/pause", headers=key)
        r = await c.client.post(f"/v1/capsules/{auto}/files/list", json={"path": "/root"},
                                headers=key)  # fmt: skip
        assert r.status_code == 200, r.text


async def test_auto_resume_default_is_a_setting(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"auto_resume_default": True})) as c:
        _, key = await c.user("ann@example.com")
        assert (await c.create(key))["auto_resume"] is True
        assert (await c.create(key, auto_resume=False))["auto_resume"] is False


async def test_fork(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"team_capsule_quota": 4})) as c:
        _, key = await c.user("ann@example.com")
        agent = c.hosts[0].agent
        src = await c.create(key, metadata={"job": "a"}, timeout_sec=120, ttl_sec=600)
        cid = src["id"]
        await c.client.post(f"/v1/capsules/{cid}/files/write", data={"path": "/root/f"},
                            files={"file": ("f", b"data")}, headers=key)  # fmt: skip
        bg = {"cmd": "sleep", "args": ["300"], "background": True, "tag": "bg"}
        assert (await c.client.post(f"/v1/capsules/{cid}/exec", json=bg, headers=key)).is_success

        r = await c.client.post(f"/v1/capsules/{cid}/fork", json={"count": 3}, headers=key)
        assert r.status_code == 201, r.text
        doc = r.json()
        assert (doc["source_id"], doc["paused_ms"]) == (cid, 7)
        copies = [x["id"] for x in doc["capsules"]]
        assert len(set(copies)) == 3
        assert cid not in copies
        assert [list(req.capsule_ids) for req in agent.forks] == [copies]
        for x in doc["capsules"]:
            assert x["status"] == "running"
            assert (x["template"], x["timeout_sec"], x["ttl_sec"]) == ("minimal", 120, 600)
            assert x["metadata"]["job"] == "a"
            assert x["expires_at"] is not None
            assert agent.capsules[x["id"]].files["/root/f"] == b"data"
        listed = {x["id"] for x in (await c.client.get("/v1/capsules", headers=key)).json()}
        assert listed == {cid, *copies}

        # over the quota (4): refused before the agent is asked
        r = await c.client.post(f"/v1/capsules/{cid}/fork", json={"count": 1}, headers=key)
        assert (r.status_code, r.json()["error"]["code"]) == (429, "quota_exceeded")
        assert len(agent.forks) == 1
        # the copies outlive the source
        await c.client.delete(f"/v1/capsules/{cid}", headers=key)
        r = await c.client.post(f"/v1/capsules/{copies[0]}/exec", json={"cmd": "echo ok"},
                                headers=key)  # fmt: skip
        assert r.json()["stdout"] == "ok\n"

        src2 = copies[0]
        for bad in ({"count": 0}, {"count": 11}, {"count": "x"}):
            r = await c.client.post(f"/v1/capsules/{src2}/fork", json=bad, headers=key)
            assert r.status_code == 400, bad
        await c.client.delete(f"/v1/capsules/{copies[1]}", headers=key)
        await c.client.post(f"/v1/capsules/{copies[2]}/pause", headers=key)
        r = await c.client.post(f"/v1/capsules/{copies[2]}/fork", json={}, headers=key)
        assert r.status_code == 409  # paused, without auto_resume
        agent.fail_fork = "unavailable"
        r = await c.client.post(f"/v1/capsules/{src2}/fork", json={"count": 1}, headers=key)
        assert r.status_code == 503, r.text
        listed = {x["id"] for x in (await c.client.get("/v1/capsules", headers=key)).json()}
        assert listed == {src2, copies[2]}  # the failed copy's row is hidden


async def test_stdin_and_watch(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"session_recheck_s": 0.01})) as c:
        ann, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        agent = c.hosts[0].agent
        bg = {"cmd": "cat", "background": True, "tag": "cat", "stdin": True}
        pid = (await c.client.post(f"/v1/capsules/{cid}/exec", json=bg, headers=key)).json()["pid"]
        url = f"/v1/capsules/{cid}/processes"
        r = await c.client.post(f"{url}/{pid}/stdin", json={"data": "héllo\n"}, headers=key)
        assert r.status_code == 204, r.text
        r = await c.client.post(f"{url}/cat/stdin", json={"data": "AP8=", "encoding": "base64"},
                                headers=key)  # fmt: skip
        assert r.status_code == 204
        proc = agent.capsules[cid].processes[pid]
        assert bytes(proc.stdin_data) == "héllo\n".encode() + b"\x00\xff"
        assert (await c.client.delete(f"{url}/cat/stdin", headers=key)).status_code == 204
        assert proc.stdin_closed
        r = await c.client.post(f"{url}/{pid}/stdin", json={"data": "late"}, headers=key)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
        r = await c.client.post(f"{url}/{pid}/stdin", json={"data": "!", "encoding": "base64"},
                                headers=key)  # fmt: skip
        assert r.status_code == 400
        r = await c.client.post(f"{url}/999/stdin", json={"data": "x"}, headers=key)
        assert r.status_code == 404

        r = await c.client.get(f"/v1/capsules/{cid}/files/watch?path=/nope", headers=key)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
        r = await c.client.get(f"/v1/capsules/{cid}/files/watch", headers=key)
        assert r.status_code == 400
        watch = f"/v1/capsules/{cid}/files/watch?path=/tmp"
        async with c.client.stream("GET", watch, headers=key) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            assert json.loads((await anext(lines)).removeprefix("data: "))["type"] == "start"
            for name in ("a.txt", "a.txt"):
                w = await c.client.post(f"/v1/capsules/{cid}/files/write",
                                        data={"path": f"/tmp/{name}"},
                                        files={"file": ("f", b"x")}, headers=key)  # fmt: skip
                assert w.status_code == 204
            events = [await _next_event(lines), await _next_event(lines)]
            # A revoked key's watch ends at its next event (credentials checked again).
            watcher = await new_key(c.client, ann, "watcher")
            async with c.client.stream("GET", watch, headers=watcher) as r2:
                lines2 = r2.aiter_lines()
                assert json.loads((await anext(lines2)).removeprefix("data: "))["type"] == "start"
                keys = (await c.client.get("/v1/api-keys", headers=key)).json()
                revoked = next(k["id"] for k in keys if k["name"] == "watcher")
                assert (await c.client.delete(f"/v1/api-keys/{revoked}", headers=key)).is_success
                await c.client.post(f"/v1/capsules/{cid}/files/write", data={"path": "/tmp/b"},
                                    files={"file": ("f", b"x")}, headers=key)  # fmt: skip
                rest = [line async for line in lines2 if line and not line.startswith(":")]
            assert rest[0] == "event: error"
            assert json.loads(rest[1].removeprefix("data: "))["error"]["code"] == "unauthorized"
        assert events == [
            {"type": "create", "name": "a.txt", "path": "/tmp/a.txt"},
            {"type": "write", "name": "a.txt", "path": "/tmp/a.txt"},
        ]


async def _next_event(lines: Any) -> dict[str, Any]:
    async for line in lines:
        if line.startswith("data: "):
            doc: dict[str, Any] = json.loads(line.removeprefix("data: "))
            return doc
    raise AssertionError("the stream ended")
