"""Teams, members and roles; and isolation: another team's resources are 404, never 403."""

from __future__ import annotations

import pytest

from tests.integration.cp.harness import Account, RunningCP, new_key, signup


async def test_another_teams_resources_are_not_found(cp: RunningCP) -> None:
    alice = await signup(cp.client, "alice@example.org")
    mallory = await signup(cp.client, "mallory@example.org")
    alice_key = await cp.client.post("/v1/api-keys", json={"name": "a"}, headers=alice.headers)
    key_id = alice_key.json()["id"]
    mallory_key = await new_key(cp.client, mallory)

    for headers in (mallory.headers, mallory_key):
        r = await cp.client.delete(f"/v1/api-keys/{key_id}", headers=headers)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        r = await cp.client.get(f"/v1/teams/{alice.team_id}", headers=headers)
        assert r.status_code == 404
        r = await cp.client.get(f"/v1/teams/{alice.team_id}/members", headers=headers)
        assert r.status_code == 404
        r = await cp.client.patch(
            f"/v1/teams/{alice.team_id}", json={"name": "pwned"}, headers=headers
        )
        assert r.status_code == 404
        r = await cp.client.delete(f"/v1/teams/{alice.team_id}", headers=headers)
        assert r.status_code == 404
        listed = await cp.client.get("/v1/api-keys", headers=headers)
        assert key_id not in {k["id"] for k in listed.json()}
    # Alice's key still works: nothing above touched it.
    r = await cp.client.get("/v1/me", headers={"X-API-Key": alice_key.json()["key"]})
    assert r.status_code == 200


@pytest.mark.postgres
async def test_team_lifecycle_and_roles(cp: RunningCP) -> None:
    owner = await signup(cp.client, "o@example.org", "Owner")
    admin = await signup(cp.client, "a@example.org", "Admin")
    member = await signup(cp.client, "m@example.org", "Member")
    team = owner.team_id

    r = await cp.client.post(
        f"/v1/teams/{team}/members", json={"email": "A@example.org", "role": "admin"},
        headers=owner.headers,
    )  # fmt: skip
    assert r.status_code == 201
    assert r.json() == {**r.json(), "user_id": admin.user_id, "role": "admin"}
    dup = await cp.client.post(
        f"/v1/teams/{team}/members", json={"email": admin.email}, headers=owner.headers
    )
    assert dup.status_code == 409
    missing = await cp.client.post(
        f"/v1/teams/{team}/members", json={"email": "ghost@example.org"}, headers=owner.headers
    )
    assert missing.status_code == 404

    admin_session = await _switch(cp, admin, team)
    r = await cp.client.post(
        f"/v1/teams/{team}/members", json={"email": member.email}, headers=admin_session
    )
    assert r.status_code == 201
    member_session = await _switch(cp, member, team)

    # Members see the team but cannot change it.
    detail = await cp.client.get(f"/v1/teams/{team}", headers=member_session)
    assert detail.status_code == 200
    assert detail.json()["team"]["role"] == "member"
    assert {m["role"] for m in detail.json()["members"]} == {"owner", "admin", "member"}
    for method, path, body in [
        ("PATCH", f"/v1/teams/{team}", {"name": "Mine"}),
        ("POST", f"/v1/teams/{team}/members", {"email": "x@example.org"}),
        ("PATCH", f"/v1/teams/{team}/members/{admin.user_id}", {"role": "member"}),
        ("DELETE", f"/v1/teams/{team}/members/{admin.user_id}", None),
        ("DELETE", f"/v1/teams/{team}", None),
    ]:
        r = await cp.client.request(method, path, json=body, headers=member_session)
        assert r.status_code == 403, (method, path)
        assert r.json()["error"]["code"] == "forbidden"

    # Admins manage members and the name, never the owner, and cannot delete the team.
    renamed = await cp.client.patch(
        f"/v1/teams/{team}", json={"name": "Lab"}, headers=admin_session
    )
    assert renamed.json()["name"] == "Lab"
    r = await cp.client.patch(
        f"/v1/teams/{team}/members/{owner.user_id}", json={"role": "member"},
        headers=admin_session,
    )  # fmt: skip
    assert r.status_code == 403
    r = await cp.client.patch(
        f"/v1/teams/{team}/members/{member.user_id}", json={"role": "admin"},
        headers=admin_session,
    )  # fmt: skip
    assert r.status_code == 204
    r = await cp.client.patch(
        f"/v1/teams/{team}/members/{member.user_id}", json={"role": "owner"},
        headers=admin_session,
    )  # fmt: skip
    assert r.status_code == 400
    assert (await cp.client.delete(f"/v1/teams/{team}", headers=admin_session)).status_code == 403

    # The owner cannot leave; others can, and then the team is gone for them.
    assert (
        await cp.client.post(f"/v1/teams/{team}/leave", headers=owner.headers)
    ).status_code == 403
    assert (
        await cp.client.post(f"/v1/teams/{team}/leave", headers=member_session)
    ).status_code == 204
    assert (await cp.client.get(f"/v1/teams/{team}", headers=member_session)).status_code == 401
    assert (await cp.client.get(f"/v1/teams/{team}", headers=member.headers)).status_code == 404

    removed = await cp.client.delete(
        f"/v1/teams/{team}/members/{admin.user_id}", headers=owner.headers
    )
    assert removed.status_code == 204
    members = await cp.client.get(f"/v1/teams/{team}/members", headers=owner.headers)
    assert [m["user_id"] for m in members.json()] == [owner.user_id]


@pytest.mark.postgres
async def test_deleting_a_team_revokes_its_keys(cp: RunningCP) -> None:
    owner = await signup(cp.client, "del@example.org")
    created = await cp.client.post("/v1/teams", json={"name": "Temp"}, headers=owner.headers)
    team = created.json()["id"]
    session = await _switch(cp, owner, team)
    key = await cp.client.post("/v1/api-keys", json={"name": "t"}, headers=session)
    key_headers = {"X-API-Key": key.json()["key"]}
    assert (await cp.client.get("/v1/me", headers=key_headers)).status_code == 200
    assert (await cp.client.delete(f"/v1/teams/{team}", headers=owner.headers)).status_code == 204
    assert (await cp.client.get("/v1/me", headers=key_headers)).status_code == 401
    assert (await cp.client.get("/v1/me", headers=session)).status_code == 401
    teams = await cp.client.get("/v1/teams", headers=owner.headers)
    assert [t["id"] for t in teams.json()] == [owner.team_id]


async def test_team_creation_needs_a_session(cp: RunningCP) -> None:
    owner = await signup(cp.client, "sess@example.org")
    key = await new_key(cp.client, owner)
    r = await cp.client.post("/v1/teams", json={"name": "Nope"}, headers=key)
    assert r.status_code == 401
    bad = await cp.client.post("/v1/teams", json={"name": "<script>"}, headers=owner.headers)
    assert bad.status_code == 400


@pytest.mark.postgres
async def test_user_search_finds_teammates_or_an_exact_email(cp: RunningCP) -> None:
    owner = await signup(cp.client, "searcher@example.org")
    mate = await signup(cp.client, "findme-mate@example.org")
    await signup(cp.client, "findme-stranger@example.org")
    r = await cp.client.post(f"/v1/teams/{owner.team_id}/members", json={"email": mate.email},
                             headers=owner.headers)  # fmt: skip
    assert r.status_code == 201

    async def search(q: str, headers: dict[str, str]) -> list[str]:
        r = await cp.client.get("/v1/users/search", params={"email": q}, headers=headers)
        assert r.status_code == 200, r.text
        return [u["email"] for u in r.json()]

    key = await new_key(cp.client, owner)
    for headers in (owner.headers, key):
        # A prefix finds teammates only; strangers only by their exact email.
        assert await search("findme-mate@", headers) == ["findme-mate@example.org"]
        assert await search("findme-stranger@", headers) == []
        assert await search("findme-stranger@example.org", headers) == [
            "findme-stranger@example.org"
        ]
        assert await search("FINDME-STRANGER@example.org", headers) == [
            "findme-stranger@example.org"
        ]
    # The stranger sees nobody by prefix: they share no team with anyone.
    stranger = await cp.client.post("/v1/auth/login", json={
        "email": "findme-stranger@example.org", "password": "correct horse"})  # fmt: skip
    token = {"Authorization": f"Bearer {stranger.json()['token']}"}
    assert await search("findme-mate@", token) == []
    assert await search("searcher@", token) == []
    short = await cp.client.get("/v1/users/search", params={"email": "fi"}, headers=owner.headers)
    assert short.status_code == 400
    no_at = await cp.client.get("/v1/users/search", params={"email": "findme"},
                                headers=owner.headers)  # fmt: skip
    assert no_at.status_code == 400


async def _switch(cp: RunningCP, account: Account, team_id: str) -> dict[str, str]:
    r = await cp.client.post(
        "/v1/auth/switch-team", json={"team_id": team_id}, headers=account.headers
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}
