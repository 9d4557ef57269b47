"""Limits and input bounds (fake agent where capsules are needed): the per-team capsule quota
(create and resume; SQLite and PostgreSQL), per-address rate limits on login, signup and key
creation (with an injected clock), ids matched whole (raw requests: a trailing newline is not
the id), the buffered-file byte budget, and bounded multipart part headers."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import httpx
import pytest

from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import cluster
from tests.integration.cp.harness import RunningCP, new_key, signup

MIB = 1024 * 1024


def _raw(base: str, method: str, target: str, headers: dict[str, str],
         body: bytes = b"") -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """Send `target` byte for byte (http.client does not normalise or decode it)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        raw = response.read()
        doc = json.loads(raw) if raw else None
        return response.status, dict(response.getheaders()), doc
    finally:
        conn.close()


async def raw(base: str, method: str, target: str, headers: dict[str, str],
              body: bytes = b"") -> tuple[int, dict[str, str], Any]:  # fmt: skip
    return await anyio.to_thread.run_sync(_raw, base, method, target, headers, body)


@pytest.mark.postgres
async def test_capsule_quota_on_create_and_resume(settings: CPSettings) -> None:
    quota = settings.model_copy(update={"team_capsule_quota": 2})
    async with cluster(quota) as c:
        _, key = await c.user("ann@example.com")
        _, other = await c.user("bob@example.com")
        first = (await c.create(key))["id"]
        await c.create(key)
        r = await c.client.post("/v1/capsules", json={"template": "minimal"}, headers=key)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "quota_exceeded"
        assert "quota is 2" in r.json()["error"]["message"]
        assert len(c.hosts[0].agent.capsules) == 2  # the agent was never asked
        await c.create(other)  # another team has its own quota

        # A paused capsule holds no place; resuming it needs one.
        r = await c.client.post(f"/v1/capsules/{first}/pause", headers=key)
        assert r.status_code == 200
        third = (await c.create(key))["id"]
        r = await c.client.post(f"/v1/capsules/{first}/resume", headers=key)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "quota_exceeded"
        assert (await c.client.get(f"/v1/capsules/{first}", headers=key)).json()["status"] == (
            "paused"
        )
        assert (await c.client.delete(f"/v1/capsules/{third}", headers=key)).status_code == 204
        r = await c.client.post(f"/v1/capsules/{first}/resume", headers=key)
        assert r.status_code == 200
        assert r.json()["status"] == "running"

        # Racing creates cannot both take the last place (the team's row is locked).
        _, racer = await c.user("cyd@example.com")
        await c.create(racer)
        answers = await asyncio.gather(*(
            c.client.post("/v1/capsules", json={"template": "minimal"}, headers=racer)
            for _ in range(6)
        ))  # fmt: skip
        assert sorted(r.status_code for r in answers) == [201] + [429] * 5


async def test_rate_limits_per_route_and_address(cp: RunningCP) -> None:
    now = [1000.0]
    limiter = cp.services.limiter
    limiter.clock = lambda: now[0]
    burst, per_s = limiter.burst, limiter.per_s
    assert (burst, per_s * 60) == (10, 10.0)  # the defaults
    account = await signup(cp.client, "rate@example.org")  # signup's bucket: 1 token spent
    wrong = {"email": "rate@example.org", "password": "not the password"}
    for _ in range(burst):
        assert (await cp.client.post("/v1/auth/login", json=wrong)).status_code == 401
    r = await cp.client.post("/v1/auth/login", json=wrong)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    assert r.headers["retry-after"] == "6"  # one token back in 60 / 10 s
    right = {"email": "rate@example.org", "password": "correct horse"}
    assert (await cp.client.post("/v1/auth/login", json=right)).status_code == 429

    # Another address has its own bucket; other routes are not limited by this one.
    transport = httpx.ASGITransport(app=cp.app, client=("192.0.2.7", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://cp.test") as elsewhere:
        assert (await elsewhere.post("/v1/auth/login", json=right)).status_code == 200
    assert (await cp.client.get("/v1/me", headers=account.headers)).status_code == 200

    # Signup and key creation have buckets of their own.
    for i in range(burst - 1):
        await signup(cp.client, f"s{i}@example.org")
    r = await cp.client.post("/v1/auth/signup", json={"email": "x@example.org",
                                                      "password": "long enough"})  # fmt: skip
    assert r.status_code == 429
    for _ in range(burst):
        await new_key(cp.client, account)
    r = await cp.client.post("/v1/api-keys", json={"name": "one too many"},
                             headers=account.headers)  # fmt: skip
    assert r.status_code == 429

    # The window: a token is back after 6 s, not before.
    now[0] += 5.9
    assert (await cp.client.post("/v1/auth/login", json=right)).status_code == 429
    now[0] += 0.2
    assert (await cp.client.post("/v1/auth/login", json=right)).status_code == 200
    assert (await cp.client.post("/v1/auth/login", json=right)).status_code == 429

    now[0] += 60
    await new_key(cp.client, account)


async def test_ids_are_matched_whole(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        account, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        keys = (await c.client.get("/v1/api-keys", headers=key)).json()
        key_id = keys[0]["id"]
        status, _, _ = await raw(c.url, "GET", f"/v1/capsules/{cid}", key)
        assert status == 200
        for target in (f"/v1/capsules/{cid}%0A", f"/v1/capsules/{cid}%0a",
                       f"/api/v1/capsules/{cid}%0A", f"/v1/capsules/{cid}%00",
                       f"/v1/capsules/{cid}%20", f"/v1/capsules/%20{cid}",
                       f"/v1/capsules/{cid.upper()}", f"/v1/teams/{account.team_id}%0A",
                       f"/v1/teams/{account.team_id}%0A/members"):  # fmt: skip
            status, _, doc = await raw(c.url, "GET", target, account.headers)
            assert status == 404, target
            assert doc["error"]["code"] == "not_found", target
        for method, target in (("POST", f"/v1/capsules/{cid}%0A/pause"),
                               ("DELETE", f"/v1/capsules/{cid}%0A"),
                               ("DELETE", f"/v1/api-keys/{key_id}%0A"),
                               ("DELETE", f"/v1/teams/{account.team_id}/members/"
                                          f"{account.user_id}%0A"),
                               ("DELETE", "/v1/snapshots/minimal%0A")):  # fmt: skip
            status, _, doc = await raw(c.url, method, target, account.headers)
            assert status == 404, target
        # The E2B surface (its own routes, same ids): logs and snapshots included.
        status, _, _ = await raw(c.url, "GET", f"/sandboxes/{cid}/logs", key)
        assert status == 200
        for method, target in (("GET", f"/sandboxes/{cid}%0A"),
                               ("GET", f"/sandboxes/{cid}%0A/logs"),
                               ("GET", f"/v2/sandboxes/{cid}%00/logs"),
                               ("GET", f"/v2/sandboxes/{cid.upper()}/logs"),
                               ("GET", f"/sandboxes/%20{cid}/logs"),
                               ("POST", f"/sandboxes/{cid}%0A/snapshots"),
                               ("POST", f"/sandboxes/{cid}%2F..%2F/snapshots"),
                               ("POST", f"/sandboxes/{cid}%0A/pause"),
                               ("DELETE", f"/sandboxes/{cid}%0A")):  # fmt: skip
            body = b'{"name": "taken"}' if target.endswith("/snapshots") else b""
            status, _, doc = await raw(c.url, method, target, key, body)
            assert status == 404, target
            assert doc["error"]["code"] == "not_found", target
        # Nothing above touched the real ones.
        assert (await c.client.get(f"/v1/capsules/{cid}", headers=key)).json()["status"] == (
            "running"
        )
        assert (await c.client.get("/v1/me", headers=key)).status_code == 200
        # Ids in bodies too.
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": cid + "\n"}, headers=key)
        assert r.status_code == 404
        r = await c.client.post("/v1/auth/switch-team", json={"team_id": account.team_id + "\n"},
                                headers=account.headers)  # fmt: skip
        assert r.status_code == 404


async def test_buffered_files_share_a_byte_budget(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        base = f"/v1/capsules/{cid}/files"
        budget = c.services.files.budget
        content = b"x" * (2 * MIB)

        async def write(data: bytes) -> httpx.Response:
            return await c.client.post(base + "/write", data={"path": "/root/f"},
                                       files={"file": ("f", data, "application/octet-stream")},
                                       headers=key)  # fmt: skip

        assert (await write(content)).status_code == 204
        budget.limit = MIB
        r = await write(content)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "unavailable"
        assert r.headers["retry-after"] == "1"
        assert budget.in_use == 0
        r = await c.client.post(base + "/read", json={"path": "/root/f"}, headers=key)
        assert r.status_code == 503
        assert budget.in_use == 0
        # Streamed transfers are not buffered and not limited.
        r = await c.client.post(base + "/stream/read", json={"path": "/root/f"}, headers=key)
        assert r.content == content

        budget.limit = 4 * MIB
        assert (await write(content)).status_code == 204
        r = await c.client.post(base + "/read", json={"path": "/root/f"}, headers=key)
        assert r.content == content
        assert budget.in_use == 0  # given back once the answer was sent
        # Held while in flight: with 3 MiB held elsewhere, a 2 MiB read does not fit.
        other = budget.hold()
        other.add(3 * MIB)
        r = await c.client.post(base + "/read", json={"path": "/root/f"}, headers=key)
        assert r.status_code == 503
        other.release()
        assert budget.in_use == 0


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ("".join(f"X-H{i}: v\r\n" for i in range(9)), "header count"),
        (f"X-Big: {'a' * 5000}\r\n", "header"),
    ],
    ids=["count", "size"],
)
async def test_multipart_part_headers_are_bounded(settings: CPSettings, extra: str,
                                                  why: str) -> None:  # fmt: skip
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n{extra}\r\n"
                f"/root/x\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"x\"\r\n\r\nhello\r\n--{boundary}--\r\n").encode()  # fmt: skip
        headers = {**key, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        for route in ("/write", "/stream/write"):
            status, _, doc = await raw(c.url, "POST", f"/v1/capsules/{cid}/files{route}",
                                       headers, body)  # fmt: skip
            assert status == 400, route
            assert why in doc["error"]["message"].lower()
        assert "/root/x" not in c.hosts[0].agent.capsules[cid].files
        # Too many parts.
        many = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"p{i}\"\r\n\r\n"
                       f"v\r\n" for i in range(70)) + f"--{boundary}--\r\n"  # fmt: skip
        status, _, doc = await raw(c.url, "POST", f"/v1/capsules/{cid}/files/write", headers,
                                   many.encode())  # fmt: skip
        assert status == 400
        assert "more than 64 parts" in doc["error"]["message"]
