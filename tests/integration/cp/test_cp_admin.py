"""The first start's admin (bootstrap) and platform administration."""

from __future__ import annotations

import stat

import pytest

from nestbox.controlplane.services.bootstrap import bootstrap_admin
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.ids import is_api_key
from tests.integration.cp.harness import RunningCP, signup


async def test_bootstrap_makes_one_admin_and_a_private_key_file(
    cp: RunningCP, settings: CPSettings
) -> None:
    first = await bootstrap_admin(cp.services.db, settings.data_dir, "root@example.org")
    assert first is not None
    key_file = settings.data_dir / "admin-api-key"
    assert first.key_file == key_file
    assert key_file.read_text().strip() == first.api_key
    assert is_api_key(first.api_key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert await bootstrap_admin(cp.services.db, settings.data_dir, "root@example.org") is None

    admin = {"X-API-Key": first.api_key}
    me = await cp.client.get("/v1/me", headers=admin)
    assert me.json()["is_admin"] is True
    assert me.json()["has_password"] is False
    # The admin sets a first password with the key, then logs in.
    r = await cp.client.post("/v1/me/password", json={"new_password": "admin password"},
                             headers=admin)  # fmt: skip
    assert r.status_code == 204
    login = await cp.client.post(
        "/v1/auth/login", json={"email": "root@example.org", "password": "admin password"}
    )
    assert login.status_code == 200
    assert login.json()["is_admin"] is True


@pytest.mark.postgres
async def test_admin_endpoints(cp: RunningCP, settings: CPSettings) -> None:
    first = await bootstrap_admin(cp.services.db, settings.data_dir, "root@example.org")
    assert first is not None
    admin = {"X-API-Key": first.api_key}
    user = await signup(cp.client, "plain@example.org")

    for path in ("/v1/admin/users", "/v1/admin/teams", "/v1/admin/audit-logs"):
        assert (await cp.client.get(path, headers=user.headers)).status_code == 403
        assert (await cp.client.get(path, headers=admin)).status_code == 200
    users = await cp.client.get("/v1/admin/users", headers=admin)
    assert {u["email"] for u in users.json()} == {"root@example.org", "plain@example.org"}
    teams = await cp.client.get("/v1/admin/teams", headers=admin)
    assert {t["id"]: t["members"] for t in teams.json()}[user.team_id] == 1

    disabled = await cp.client.patch(
        f"/v1/admin/users/{user.user_id}", json={"status": "disabled"}, headers=admin
    )
    assert disabled.status_code == 200
    assert disabled.json()["status"] == "disabled"
    assert (await cp.client.get("/v1/me", headers=user.headers)).status_code == 401
    login = await cp.client.post(
        "/v1/auth/login", json={"email": user.email, "password": "correct horse"}
    )
    assert login.status_code == 403
    self_lockout = await cp.client.patch(
        f"/v1/admin/users/{first.user_id}", json={"is_admin": False}, headers=admin
    )
    assert self_lockout.status_code == 400
    log = await cp.client.get("/v1/admin/audit-logs", headers=admin)
    assert "user.update" in {e["action"] for e in log.json()}


async def test_team_audit_log_is_the_teams_own(cp: RunningCP) -> None:
    a = await signup(cp.client, "aud-a@example.org")
    b = await signup(cp.client, "aud-b@example.org")
    await cp.client.post("/v1/api-keys", json={"name": "x"}, headers=a.headers)
    log_a = await cp.client.get("/v1/audit-logs", headers=a.headers)
    log_b = await cp.client.get("/v1/audit-logs", headers=b.headers)
    assert "api_key.create" in {e["action"] for e in log_a.json()}
    assert {e["team_id"] for e in log_b.json()} == {b.team_id}
