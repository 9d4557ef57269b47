"""API keys: made once, used, tracked, revoked; only their hash is stored."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select

from nestbox.controlplane.db.models import ApiKeyRow
from nestbox.controlplane.services.bootstrap import bootstrap_admin, reset_admin_key
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.ids import IdPrefix, is_api_key, is_id
from tests.integration.cp.harness import RunningCP, signup


@pytest.mark.postgres
async def test_create_use_track_delete(cp: RunningCP) -> None:
    account = await signup(cp.client, "kim@example.org")
    r = await cp.client.post("/v1/api-keys", json={"name": "ci"}, headers=account.headers)
    assert r.status_code == 201
    created = r.json()
    key = created["key"]
    assert is_api_key(key)
    assert is_id(created["id"], IdPrefix.API_KEY)
    assert created["key_prefix"] == key[:10]
    assert created["last_used"] is None
    assert created["team_id"] == account.team_id

    me = await cp.client.get("/v1/me", headers={"X-API-Key": key})
    assert me.status_code == 200
    assert me.json()["team_id"] == account.team_id
    assert me.json()["role"] == "owner"

    listed = await cp.client.get("/v1/api-keys", headers=account.headers)
    assert listed.status_code == 200
    (entry,) = listed.json()
    assert entry["id"] == created["id"]
    assert entry["key"] is None  # the full key is shown once only
    last_used = datetime.fromisoformat(entry["last_used"])
    assert last_used.tzinfo is not None
    assert last_used >= datetime.fromisoformat(created["created_at"])

    deleted = await cp.client.delete(f"/v1/api-keys/{created['id']}", headers=account.headers)
    assert deleted.status_code == 204
    after = await cp.client.get("/v1/me", headers={"X-API-Key": key})
    assert after.status_code == 401
    assert after.json()["error"]["code"] == "unauthorized"
    again = await cp.client.delete(f"/v1/api-keys/{created['id']}", headers=account.headers)
    assert again.status_code == 404


@pytest.mark.postgres
async def test_only_the_hash_is_stored(cp: RunningCP) -> None:
    account = await signup(cp.client, "hash@example.org")
    r = await cp.client.post("/v1/api-keys", json={}, headers=account.headers)
    key = r.json()["key"]
    assert r.json()["name"] == "Unnamed API Key"
    async with cp.services.db.transaction() as tx:
        rows = (await tx.session.scalars(select(ApiKeyRow))).all()
    assert len(rows) == 1
    assert key not in (rows[0].key_hash, rows[0].key_prefix)
    assert len(rows[0].key_hash) == 64


async def test_a_key_can_manage_keys_of_its_team(cp: RunningCP) -> None:
    account = await signup(cp.client, "auto@example.org")
    first = await cp.client.post("/v1/api-keys", json={"name": "a"}, headers=account.headers)
    key = {"X-API-Key": first.json()["key"]}
    second = await cp.client.post("/v1/api-keys", json={"name": "b"}, headers=key)
    assert second.status_code == 201
    assert second.json()["created_by"] == account.user_id
    listed = await cp.client.get("/v1/api-keys", headers=key)
    assert {k["name"] for k in listed.json()} == {"a", "b"}


@pytest.mark.postgres
async def test_members_revoke_only_their_own_keys(cp: RunningCP) -> None:
    owner = await signup(cp.client, "owner@example.org")
    member = await signup(cp.client, "member@example.org")
    added = await cp.client.post(
        f"/v1/teams/{owner.team_id}/members", json={"email": member.email}, headers=owner.headers
    )
    assert added.status_code == 201
    switched = await cp.client.post(
        "/v1/auth/switch-team", json={"team_id": owner.team_id}, headers=member.headers
    )
    member_in_team = {"Authorization": f"Bearer {switched.json()['token']}"}
    owners_key = await cp.client.post("/v1/api-keys", json={"name": "o"}, headers=owner.headers)
    members_key = await cp.client.post("/v1/api-keys", json={"name": "m"}, headers=member_in_team)
    r = await cp.client.delete(f"/v1/api-keys/{owners_key.json()['id']}", headers=member_in_team)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    r = await cp.client.delete(f"/v1/api-keys/{members_key.json()['id']}", headers=member_in_team)
    assert r.status_code == 204


async def test_the_operators_key_is_not_revoked_through_the_api(
    cp: RunningCP, settings: CPSettings
) -> None:
    """The key in `admin-api-key` answers 409 to a revoke (by itself or by a session of its
    user); another key of the same admin is revoked as usual; after a reset-key the old one is
    gone and the new one is the protected one."""
    boot = await bootstrap_admin(cp.services.db, settings.data_dir, "op@test.io")
    assert boot is not None
    key = {"X-API-Key": boot.api_key}
    listed = (await cp.client.get("/v1/api-keys", headers=key)).json()
    [operator] = [k for k in listed if boot.api_key.startswith(k["key_prefix"])]
    r = await cp.client.delete(f"/v1/api-keys/{operator['id']}", headers=key)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "conflict"
    assert "reset-key" in r.json()["error"]["message"]
    other = (await cp.client.post("/v1/api-keys", json={"name": "o"}, headers=key)).json()
    r = await cp.client.delete(f"/v1/api-keys/{other['id']}", headers=key)
    assert r.status_code == 204, r.text  # positive control: revoking works for other keys
    assert (await cp.client.get("/v1/me", headers=key)).status_code == 200
    fresh = await reset_admin_key(cp.services.db, settings.data_dir, "op@test.io")
    new = {"X-API-Key": fresh.api_key}
    assert (await cp.client.get("/v1/me", headers=key)).status_code == 401
    listed = (await cp.client.get("/v1/api-keys", headers=new)).json()
    [now] = [k for k in listed if fresh.api_key.startswith(k["key_prefix"])]
    assert (await cp.client.delete(f"/v1/api-keys/{now['id']}", headers=new)).status_code == 409
