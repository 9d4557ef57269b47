"""Signup, login, sessions (JWT), switching team, `/v1/me`, passwords (login by email in any
case, a second signup, switching team, the user-row updates: on PostgreSQL too)."""

from __future__ import annotations

from datetime import datetime

import pytest

from nestbox.protocol.ids import IdPrefix, is_id
from tests.integration.cp.harness import RunningCP, signup


async def test_signup_returns_a_working_session(cp: RunningCP) -> None:
    r = await cp.client.post(
        "/v1/auth/signup", json={"email": "Ada@Example.org", "password": "correct horse",
                                 "name": "Ada"}
    )  # fmt: skip
    assert r.status_code == 201
    doc = r.json()
    assert doc["email"] == "ada@example.org"
    assert doc["role"] == "owner"
    assert is_id(doc["user_id"], IdPrefix.USER)
    assert is_id(doc["team_id"], IdPrefix.TEAM)
    assert datetime.fromisoformat(doc["expires_at"]).tzinfo is not None
    me = await cp.client.get("/v1/me", headers={"Authorization": f"Bearer {doc['token']}"})
    assert me.status_code == 200
    assert me.json()["id"] == doc["user_id"]
    assert me.json()["team_id"] == doc["team_id"]
    assert me.json()["has_password"] is True


@pytest.mark.postgres
async def test_login(cp: RunningCP) -> None:
    account = await signup(cp.client, "bob@example.org", "Bob")
    r = await cp.client.post(
        "/v1/auth/login", json={"email": "BOB@example.org", "password": "correct horse"}
    )
    assert r.status_code == 200
    assert r.json()["user_id"] == account.user_id
    assert r.json()["team_id"] == account.team_id
    bad = await cp.client.post(
        "/v1/auth/login", json={"email": "bob@example.org", "password": "wrong horse"}
    )
    assert bad.status_code == 401
    assert bad.json()["error"]["code"] == "unauthorized"
    nobody = await cp.client.post(
        "/v1/auth/login", json={"email": "nobody@example.org", "password": "wrong horse"}
    )
    assert nobody.status_code == 401
    assert nobody.json() == bad.json()


@pytest.mark.postgres
async def test_signup_twice_is_a_conflict(cp: RunningCP) -> None:
    await signup(cp.client, "carol@example.org")
    r = await cp.client.post(
        "/v1/auth/signup", json={"email": "carol@example.org", "password": "another one"}
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"


async def test_validation_errors_are_invalid_request(cp: RunningCP) -> None:
    r = await cp.client.post("/v1/auth/signup", json={"email": "no-at-sign", "password": "short"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert "email" in error["message"]
    assert "password" in error["message"]
    assert "short" not in error["message"]  # the input is never echoed
    r = await cp.client.post(
        "/v1/auth/login", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    extra = await cp.client.post(
        "/v1/auth/login", json={"email": "a@b.c", "password": "x", "admin": True}
    )
    assert extra.status_code == 400


async def test_bad_or_missing_credentials_are_401(cp: RunningCP) -> None:
    account = await signup(cp.client, "dan@example.org")
    cases = [
        {},
        {"X-API-Key": "wrn_" + "0" * 32},
        {"X-API-Key": "not-a-key"},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": f"Bearer {account.token[:-2]}xx"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ]
    for headers in cases:
        r = await cp.client.get("/v1/me", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "unauthorized"


async def test_forged_token_of_another_secret_is_rejected(cp: RunningCP) -> None:
    from nestbox.controlplane.services import jwt

    account = await signup(cp.client, "eve@example.org")
    forged = jwt.encode({"sub": account.user_id, "team_id": account.team_id, "typ": "",
                         "exp": 4_000_000_000}, b"some other secret")  # fmt: skip
    r = await cp.client.get("/v1/me", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401


@pytest.mark.postgres
async def test_switch_team(cp: RunningCP) -> None:
    ada = await signup(cp.client, "ada2@example.org")
    created = await cp.client.post("/v1/teams", json={"name": "Research"}, headers=ada.headers)
    assert created.status_code == 201
    team_id = created.json()["id"]
    r = await cp.client.post("/v1/auth/switch-team", json={"team_id": team_id}, headers=ada.headers)
    assert r.status_code == 200
    assert r.json()["team_id"] == team_id
    me = await cp.client.get("/v1/me", headers={"Authorization": f"Bearer {r.json()['token']}"})
    assert me.json()["team_id"] == team_id
    # Someone else's team does not exist for Ada.
    bob = await signup(cp.client, "bob2@example.org")
    r = await cp.client.post(
        "/v1/auth/switch-team", json={"team_id": bob.team_id}, headers=ada.headers
    )
    assert r.status_code == 404


@pytest.mark.postgres
async def test_password_change(cp: RunningCP) -> None:
    account = await signup(cp.client, "pat@example.org")
    wrong = await cp.client.post(
        "/v1/me/password",
        json={"current_password": "not it at all", "new_password": "battery staple"},
        headers=account.headers,
    )
    assert wrong.status_code == 401
    ok = await cp.client.post(
        "/v1/me/password",
        json={"current_password": "correct horse", "new_password": "battery staple"},
        headers=account.headers,
    )
    assert ok.status_code == 204
    login = await cp.client.post(
        "/v1/auth/login", json={"email": "pat@example.org", "password": "battery staple"}
    )
    assert login.status_code == 200


@pytest.mark.postgres
async def test_rename_me(cp: RunningCP) -> None:
    account = await signup(cp.client, "ren@example.org", "Old")
    r = await cp.client.patch("/v1/me", json={"name": "New"}, headers=account.headers)
    assert r.status_code == 200
    assert r.json()["name"] == "New"


async def test_served_under_api_prefix_too(cp: RunningCP) -> None:
    account = await signup(cp.client, "sdk@example.org")
    r = await cp.client.get("/api/v1/me", headers=account.headers)
    assert r.status_code == 200
