"""`nestbox-cp` as a real process: first start (migrations, admin, key file 0600, greeting),
a second start that makes nothing new, the key over real HTTP, docs, and `--print-config`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import PYTHON, free_port

START_TIMEOUT_S = 60.0


def _env(data_dir: Path, db: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
    env.update(
        NESTBOX_DIR=str(data_dir),
        # A plain postgresql:// URL, as an operator writes it; the CP picks the async driver.
        NESTBOX_DATABASE_URL=db.replace("postgresql+asyncpg://", "postgresql://"),
        NESTBOX_CP_LISTEN=f"127.0.0.1:{port}",
        NESTBOX_CP_JWT_SECRET="",
    )
    env.pop("NESTBOX_CP_JWT_SECRET")
    return env


@contextlib.contextmanager
def control_plane(env: dict[str, str]) -> Iterator[list[str]]:
    """Run `nestbox-cp` until the block ends; the list gets its output once it has stopped."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "nestbox.controlplane"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    try:
        url = "http://" + env["NESTBOX_CP_LISTEN"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "nestbox-cp did not answer in time"
            time.sleep(0.1)
        yield output
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.stdout:
            with proc.stdout:
                output.append(proc.stdout.read())


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
        assert httpx.get(base + "/docs/docs.js").status_code == 200
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
    env["NESTBOX_CP_JWT_SECRET"] = "super-secret-value"
    out = subprocess.run(
        [PYTHON, "-m", "nestbox.controlplane", "--print-config"], env=env, capture_output=True,
        text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "hunter2" not in out.stdout
    assert "super-secret-value" not in out.stdout
    doc = json.loads(out.stdout)
    assert doc["database_url"].startswith("postgresql+asyncpg://cp:***@db.example")
    assert doc["listen"] == "127.0.0.1:9725"
    assert doc["data_dir"] == str(tmp_path)
    assert not (tmp_path / "cp.db").exists()  # printing the config touches nothing
