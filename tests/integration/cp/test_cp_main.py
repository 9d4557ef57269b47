"""`nestbox-cp` as a real process: first start (migrations, admin, key file 0600, greeting),
a second start that makes nothing new, the key over real HTTP, docs, `--print-config`, a short
JWT secret refused with one line and exit 2, and `admin reset-key` (while the server runs and
while it does not; the new key works, the old one is revoked)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, free_port
from tests.integration.cp.process import control_plane
from tests.integration.cp.process import cp_env as _env


@pytest.mark.postgres
@pytest.mark.fresh_db
def test_first_start_and_restart(db: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "nestbox"
    port = free_port()
    env = _env(data_dir, db, port)
    base = f"http://127.0.0.1:{port}"
    key_file = data_dir / "admin-api-key"

    with control_plane(env) as first_output:
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "jwt-secret").stat().st_mode) == 0o600
        me = httpx.get(base + "/v1/me", headers={"X-API-Key": key})
        assert me.status_code == 200
        assert me.json()["is_admin"] is True
        assert httpx.get(base + "/v1/me").status_code == 401
        assert httpx.get(base + "/docs").status_code == 200
        signup = httpx.post(base + "/v1/auth/signup",
                            json={"email": "u@example.org", "password": "long enough"})  # fmt: skip
        token = signup.json()["token"]
    assert base in first_output[0]
    assert key in first_output[0]
    assert str(key_file) in first_output[0]

    with control_plane(env) as second_output:
        # Same database, same key file, same session secret: nothing new, everything still works.
        assert key_file.read_text().strip() == key
        assert httpx.get(base + "/v1/me", headers={"X-API-Key": key}).status_code == 200
        me = httpx.get(base + "/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200
        users = httpx.get(base + "/v1/admin/users", headers={"X-API-Key": key})
        assert len(users.json()) == 2
    assert key not in second_output[0]
    assert str(key_file) in second_output[0]


def test_print_config_hides_secrets(tmp_path: Path) -> None:
    env = _env(tmp_path, "postgresql://cp:hunter2@db.example:5432/nestbox", 9725)
    env["NESTBOX_CP_JWT_SECRET"] = "super-secret-value-of-32-bytes-or-more"
    out = subprocess.run(
        [PYTHON, "-m", "nestbox.controlplane", "--print-config"], env=env, capture_output=True,
        text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "hunter2" not in out.stdout
    assert "super-secret-value-of-32-bytes-or-more" not in out.stdout
    doc = json.loads(out.stdout)
    assert doc["database_url"].startswith("postgresql+asyncpg://cp:***@db.example")
    assert doc["listen"] == "127.0.0.1:9725"
    assert doc["data_dir"] == str(tmp_path)
    assert not (tmp_path / "cp.db").exists()  # printing the config touches nothing


def test_short_jwt_secret_refuses_to_start(tmp_path: Path) -> None:
    env = _env(tmp_path / "nestbox", "", free_port())
    env["NESTBOX_CP_JWT_SECRET"] = "x" * 31
    out = subprocess.run([PYTHON, "-m", "nestbox.controlplane"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "nestbox-cp: invalid setting jwt_secret: NESTBOX_CP_JWT_SECRET must be at least 32 bytes "
        "(unset it to have one generated)"
    ]
    assert not (tmp_path / "nestbox").exists()  # refused before anything was made

    env.pop("NESTBOX_CP_JWT_SECRET")
    (tmp_path / "nestbox").mkdir(mode=0o700)
    (tmp_path / "nestbox" / "jwt-secret").write_text("short\n")
    out = subprocess.run([PYTHON, "-m", "nestbox.controlplane"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("nestbox-cp: cannot use the data ")
    assert "jwt-secret holds fewer than 32 bytes" in out.stderr


def _reset_key(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([PYTHON, "-m", "nestbox.controlplane", "admin", "reset-key", *args],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.postgres
def test_admin_reset_key(db: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "nestbox"
    port = free_port()
    env = _env(data_dir, db, port)
    base = f"http://127.0.0.1:{port}"
    key_file = data_dir / "admin-api-key"

    with control_plane(env):
        first = key_file.read_text().strip()
        admin = {"X-API-Key": first}
        [listed] = httpx.get(base + "/v1/api-keys", headers=admin).json()
        # The operator's own key is not revoked through the API (409), only rotated here.
        assert httpx.delete(base + f"/v1/api-keys/{listed['id']}", headers=admin).status_code == 409
        assert httpx.get(base + "/v1/me", headers=admin).status_code == 200

        printed = _reset_key(env)  # while the server runs, on the same database
        second = key_file.read_text().strip()
        assert second != first
        assert second in printed
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert httpx.get(base + "/v1/me", headers=admin).status_code == 401  # the old one: gone
        me = httpx.get(base + "/v1/me", headers={"X-API-Key": second})
        assert me.status_code == 200
        assert me.json()["is_admin"] is True
        assert me.json()["email"] == "admin@localhost"

    # With the server stopped, and the admin demoted by someone: restored, and the key that
    # was in the file (still working) is revoked.
    with control_plane(env):
        signup = httpx.post(base + "/v1/auth/signup", json={"email": "o@example.org",
                                                            "password": "long enough"})  # fmt: skip
        other = signup.json()["user_id"]
        r = httpx.patch(base + f"/v1/admin/users/{other}", json={"is_admin": True},
                        headers={"X-API-Key": second})  # fmt: skip
        assert r.status_code == 200
        me = httpx.get(base + "/v1/me", headers={"X-API-Key": second}).json()
        r = httpx.patch(base + f"/v1/admin/users/{me['id']}", json={"is_admin": False},
                        headers={"Authorization": "Bearer " + signup.json()["token"]})  # fmt: skip
        assert r.status_code == 200
    _reset_key(env, "--email", "admin@localhost")
    third = key_file.read_text().strip()
    with control_plane(env):
        assert httpx.get(base + "/v1/me", headers={"X-API-Key": second}).status_code == 401
        me = httpx.get(base + "/v1/me", headers={"X-API-Key": third})
        assert me.status_code == 200
        assert me.json()["is_admin"] is True
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(".")] == []  # no temp file
