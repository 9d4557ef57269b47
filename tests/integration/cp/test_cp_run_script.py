"""`make run`'s recovery (scripts/run.py), against a real `nestbox-cp` process (SQLite),
without QEMU: a saved admin key that no longer works is replaced through
`nestbox-cp admin reset-key`; the agent's saved credentials are moved aside only when the
control plane says their host does not exist, never because of the launcher's own auth failure.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.conftest import PYTHON, ROOT, free_port
from tests.integration.cp.process import control_plane, cp_env

CP_COMMAND = [PYTHON, "-m", "nestbox.controlplane"]
UNKNOWN_HOST = "host-" + "0" * 25


def _run_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nestbox_make_run", ROOT / "scripts" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return _run_script()


def test_saved_host_verdict(run: ModuleType) -> None:
    url = "http://127.0.0.1:9725"
    assert run.saved_host_verdict(200, url + "/", url) is True
    assert run.saved_host_verdict(404, url, url) is False
    assert run.saved_host_verdict(200, "http://elsewhere:9725", url) is False
    for status in (401, 403, 500, 502, 503):
        with pytest.raises(SystemExit, match=f"failed \\({status}\\); its credentials are left"):
            run.saved_host_verdict(status, url, url)


def test_recovery_with_a_dead_admin_key(run: ModuleType, db: str, tmp_path: Path) -> None:
    data = tmp_path / "nestbox"
    port = free_port()
    env = cp_env(data, db, port)
    url = f"http://127.0.0.1:{port}"
    key_file = data / "admin-api-key"
    creds = data / "agents" / "a0" / "host-credentials.json"

    def registration(key: str) -> list[str]:
        args: list[str] = run.registration_args(
            {"X-API-Key": key}, cp_url=url, data=data, agent_id="a0", agent_listen="127.0.0.1:1"
        )
        return args

    with control_plane(env):
        good = key_file.read_text().strip()
        assert run.admin_key(url, data, env, CP_COMMAND) == good  # a working key is kept

        # The agent's credentials name a host; the launcher's key is dead: stop, move nothing.
        creds.parent.mkdir(parents=True)
        creds.write_text(json.dumps({"host_id": UNKNOWN_HOST, "cp_url": url}))
        with pytest.raises(SystemExit, match="401"):
            registration("wrn_" + "0" * 32)
        assert creds.exists()
        assert list(creds.parent.iterdir()) == [creds]

        # The saved key dead (the API refuses to revoke it, but a file can be restored from an
        # old backup, or rotated by another copy of the data): reset-key mints a new one.
        dead = "wrn_" + "1" * 32
        key_file.write_text(dead + "\n")
        key = run.admin_key(url, data, env, CP_COMMAND)
        assert key not in (good, dead)
        assert key_file.read_text().strip() == key
        me = httpx.get(url + "/v1/me", headers={"X-API-Key": key})
        assert me.json()["is_admin"] is True

        # The key file gone altogether: the same.
        key_file.unlink()
        key = run.admin_key(url, data, env, CP_COMMAND)
        assert httpx.get(url + "/v1/me", headers={"X-API-Key": key}).status_code == 200

        # With a working key, a host the control plane does not have (404) is stale.
        args = registration(key)
        assert args[0] == "--register"
        assert args[2:] == ["--address", "127.0.0.1:1"]
        assert not creds.exists()
        assert len(list(creds.parent.glob("host-credentials.json.stale-*"))) == 1

        # And a host it has is kept.
        [host] = httpx.get(url + "/v1/hosts", headers={"X-API-Key": key}).json()
        creds.write_text(json.dumps({"host_id": host["id"], "cp_url": url}))
        assert registration(key) == []
        assert creds.exists()


def test_first_start_gives_the_admin_a_dashboard_password(
    run: ModuleType, db: str, tmp_path: Path
) -> None:
    data = tmp_path / "nestbox"
    port = free_port()
    env = cp_env(data, db, port)
    url = f"http://127.0.0.1:{port}"
    with control_plane(env):
        key = (data / "admin-api-key").read_text().strip()
        email, password = run.admin_login(url, data, key)
        saved = data / "admin-password"
        assert saved.read_text().strip() == password
        assert saved.stat().st_mode & 0o777 == 0o600
        login = httpx.post(url + "/v1/auth/session", json={"email": email, "password": password})
        assert login.status_code == 200, login.text
        assert login.json()["is_admin"] is True
        # Later runs find it again, unchanged.
        assert run.admin_login(url, data, key) == (email, password)
        # A password the admin changed is not printed (the file no longer holds it).
        change = {"current_password": password, "new_password": "their own one"}
        r = httpx.post(url + "/v1/me/password", headers={"X-API-Key": key}, json=change)
        assert r.status_code == 204, r.text
        assert run.admin_login(url, data, key) == (email, None)
