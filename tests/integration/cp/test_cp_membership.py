"""Membership and credentials (SQLite and PostgreSQL, fake agent): removing a member revokes the
API keys they made in that team and locks out their sessions for it; open WebSocket sessions
(PTY) of a revoked key or removed member are closed with 1008 within 10 s; a key whose maker is
no longer a member, or is disabled, stops working."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
from sqlalchemy import delete, update
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from nestbox.controlplane.db.models import ApiKeyRow, TeamMemberRow
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import Cluster, cluster
from tests.integration.cp.harness import Account, new_key, signup

pytestmark = pytest.mark.postgres  # touches database behaviour (CONTRIBUTING.md)

CLOSE_WITHIN_S = 10.0
POLICY_VIOLATION = 1008


async def _join(c: Cluster, owner: Account, email: str) -> tuple[Account, dict[str, str]]:
    """A new user added to `owner`'s team: their account and a session in that team."""
    member = await signup(c.client, email)
    r = await c.client.post(f"/v1/teams/{owner.team_id}/members", json={"email": email},
                            headers=owner.headers)  # fmt: skip
    assert r.status_code == 201, r.text
    r = await c.client.post("/v1/auth/switch-team", json={"team_id": owner.team_id},
                            headers=member.headers)  # fmt: skip
    assert r.status_code == 200, r.text
    return member, {"Authorization": f"Bearer {r.json()['token']}"}


async def _open_pty(c: Cluster, cid: str, headers: dict[str, str]) -> ClientConnection:
    ws = await connect(f"{c.ws_url}/v1/capsules/{cid}/pty", additional_headers=headers)
    await ws.send(json.dumps({"type": "start", "cmd": "/bin/bash"}))
    started = json.loads(await ws.recv())
    assert started["type"] == "started", started
    await ws.send(b"hi\n")
    assert await ws.recv() == b"echo:hi\n"
    return ws


async def _until_closed(ws: ClientConnection) -> list[Any]:
    """Every frame the server sends until it closes the socket."""
    frames: list[Any] = []
    try:
        async for message in ws:
            frames.append(json.loads(message) if isinstance(message, str) else message)
    except ConnectionClosed:
        pass
    return frames


async def test_removing_a_member_revokes_keys_and_closes_sessions(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        owner, owner_key = await c.user("owner@example.com")
        member, member_session = await _join(c, owner, "member@example.com")
        r = await c.client.post("/v1/api-keys", json={"name": "m"}, headers=member_session)
        assert r.status_code == 201
        member_key = {"X-API-Key": r.json()["key"]}
        own_team_key = await new_key(c.client, member)  # in the member's personal team
        cid = (await c.create(owner_key))["id"]
        assert (await c.client.get(f"/v1/capsules/{cid}", headers=member_key)).status_code == 200

        by_key = await _open_pty(c, cid, member_key)
        by_session = await _open_pty(c, cid, member_session)
        by_owner = await _open_pty(c, cid, owner_key)
        try:
            removed_at = time.monotonic()
            r = await c.client.delete(f"/v1/teams/{owner.team_id}/members/{member.user_id}",
                                      headers=owner.headers)  # fmt: skip
            assert r.status_code == 204

            # At once: the key is gone, the session no longer reaches the team.
            r = await c.client.get("/v1/me", headers=member_key)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
            r = await c.client.get(f"/v1/capsules/{cid}", headers=member_session)
            assert r.status_code == 401
            keys = (await c.client.get("/v1/api-keys", headers=owner_key)).json()
            assert "m" not in {k["name"] for k in keys}
            # What the member has elsewhere is untouched.
            assert (await c.client.get("/v1/me", headers=own_team_key)).status_code == 200
            assert (await c.client.get("/v1/me", headers=member.headers)).status_code == 200

            # The open terminals of the key and of the session close within the bound.
            with anyio.fail_after(CLOSE_WITHIN_S):
                key_frames = await _until_closed(by_key)
                session_frames = await _until_closed(by_session)
            assert time.monotonic() - removed_at < CLOSE_WITHIN_S
            for ws, frames in ((by_key, key_frames), (by_session, session_frames)):
                assert ws.close_code == POLICY_VIOLATION
                assert ws.close_reason == "credentials revoked"
                assert frames[-1]["type"] == "error"
                assert frames[-1]["data"].startswith("credentials revoked")

            # The owner's terminal lives on.
            await by_owner.send(b"still\n")
            assert await by_owner.recv() == b"echo:still\n"
        finally:
            for ws in (by_key, by_session, by_owner):
                await ws.close()


async def test_key_of_a_former_or_disabled_member_stops_working(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        owner, owner_key = await c.user("owner@example.com")
        member, session = await _join(c, owner, "member@example.com")
        r = await c.client.post("/v1/api-keys", json={"name": "m"}, headers=session)
        member_key = {"X-API-Key": r.json()["key"]}
        assert (await c.client.get("/v1/me", headers=member_key)).status_code == 200

        # Membership gone without the revocation (another control plane's half-done change,
        # a manual fix in the database): the check on every request still refuses the key.
        async with c.services.db.transaction() as tx:
            await tx.session.execute(
                delete(TeamMemberRow).where(
                    TeamMemberRow.team_id == owner.team_id,
                    TeamMemberRow.user_id == member.user_id,
                )
            )
        r = await c.client.get("/v1/me", headers=member_key)
        assert r.status_code == 401
        assert "no longer a member" in r.json()["error"]["message"]
        # A key whose maker is gone (the column is set to NULL when a user row goes).
        orphan = await new_key(c.client, owner, "orphan")
        async with c.services.db.transaction() as tx:
            await tx.session.execute(
                update(ApiKeyRow).where(ApiKeyRow.name == "orphan").values(created_by=None)
            )
        assert (await c.client.get("/v1/me", headers=orphan)).status_code == 401

        # A disabled user's keys stop too, and their open terminals close.
        key2 = await new_key(c.client, owner, "second")
        cid = (await c.create(owner_key))["id"]
        ws = await _open_pty(c, cid, key2)
        try:
            r = await c.client.patch(f"/v1/admin/users/{owner.user_id}",
                                     json={"status": "disabled"}, headers=c.admin)  # fmt: skip
            assert r.status_code == 200, r.text
            assert (await c.client.get("/v1/me", headers=key2)).status_code == 401
            with anyio.fail_after(CLOSE_WITHIN_S):
                await _until_closed(ws)
            assert ws.close_code == POLICY_VIOLATION
        finally:
            await ws.close()


async def test_leaving_revokes_own_keys(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        owner, _ = await c.user("owner@example.com")
        _, session = await _join(c, owner, "leaver@example.com")
        r = await c.client.post("/v1/api-keys", json={"name": "mine"}, headers=session)
        key = {"X-API-Key": r.json()["key"]}
        r = await c.client.post(f"/v1/teams/{owner.team_id}/leave", headers=key)
        assert r.status_code == 204
        assert (await c.client.get("/v1/me", headers=key)).status_code == 401
        keys = (await c.client.get("/v1/api-keys", headers=owner.headers)).json()
        assert [k["name"] for k in keys] == ["k"]  # the owner's own; the leaver's is gone
