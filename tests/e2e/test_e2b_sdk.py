"""E2B's unmodified `e2b` 2.63.0 SDK (its own venv, cached in `.cache/`) against the whole
Nestbox stack with only E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY (issue 16): the REST
facade (`controlplane/e2b/api.py`) and the envd gateway (`controlplane/e2b/gateway.py` → the
agent's `/envd/`) with a real QEMU capsule; `e2b_script.py` runs the calls in one process, on
one sandbox, and prints what it saw. Then the gateway's refusals, in raw bytes.

SQLite only: the facade's rows are the capsule rows `/v1` already exercises on both
databases (plus one small table of lifetimes), and the time budget is tight.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.integration.upstream_venv import upstream_venv

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.sdk, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).with_name("e2b_script.py")
SQLITE_ONLY = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


_OTHER_KEYS: dict[str, str] = {}


def other_team_key(stack: Stack) -> str:
    """An API key of a new user's own team (one per stack: a signup hashes a password)."""
    if stack.db in _OTHER_KEYS:
        return _OTHER_KEYS[stack.db]
    email = f"e2b-{secrets.token_hex(4)}@example.com"
    with httpx.Client(base_url=stack.cp.url, trust_env=False, timeout=60) as client:
        r = client.post("/v1/auth/signup", json={"email": email, "password": "correct horse"})
        assert r.status_code == 201, r.text
        bearer = {"Authorization": f"Bearer {r.json()['token']}"}
        r = client.post("/v1/api-keys", json={"name": "e2b"}, headers=bearer)
        assert r.status_code == 201, r.text
        key = _OTHER_KEYS[stack.db] = str(r.json()["key"])
        return key


def e2b_env(stack: Stack, key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update({"E2B_API_URL": stack.cp.url, "E2B_SANDBOX_URL": stack.cp.url,
                "E2B_API_KEY": key, **extra})  # fmt: skip
    return env


@SQLITE_ONLY
def test_e2b_sdk_end_to_end(stack: Stack) -> None:
    python = upstream_venv("e2b", "2.63.0")
    other = other_team_key(stack)
    proc = subprocess.run(
        [str(python), str(SCRIPT)], env=e2b_env(stack, stack.cp.admin_key,
                                                E2B_TEST_OTHER_KEY=other),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0:  # never leave a sandbox or a snapshot behind
        made = [json.loads(line) for line in lines if line.startswith('{"s')]
        for doc in made:
            if "sandbox" in doc:
                stack.destroy(doc["sandbox"])
            if "snapshot" in doc:
                stack.api.delete(f"/templates/{doc['snapshot']}")
    assert proc.returncode == 0, f"{proc.stderr[-6000:]}\n--- cp ---\n{stack.cp.log_tail()}"
    print(proc.stderr)  # the steps' timings
    seen = json.loads(lines[-1])

    assert seen["info"] == {"state": "running", "metadata": {"suite": "e2b", "run": seen_run(seen)},
                            "ends_later": True}  # fmt: skip
    assert seen["running"] is True
    assert seen["exit3"] == {"code": 3, "stdout": "hello-x-/tmp\n", "stderr": "bad\n"}
    assert seen["stream_chunks"] == ["line1\n", "line2\n", "line3\n"]
    assert (seen["bg_listed"], seen["bg_killed"], seen["bg_gone"]) == (True, True, True)
    assert seen["read_text"] == "hi there"
    assert seen["bytes_roundtrip"] is True
    assert (seen["make_dir"], seen["make_dir_again"]) == (True, False)
    assert seen["list"] == ["blob.bin", "d", "hello.txt"]
    assert seen["exists"] == [True, False]
    assert seen["renamed"] == [False, "hi there"]
    assert seen["removed"] is False
    assert seen["read_missing"] == "NotFound"
    assert seen["watch"] is True
    assert (seen["pty_echo"], seen["pty_resized"], seen["pty_killed"]) == (True, True, True)
    assert seen["timeout_moved"] is True
    assert seen["listed"] is True
    assert seen["listed_other_run"] == []
    assert seen["other"] == {
        "get_info": "SandboxNotFoundException", "connect": "SandboxNotFoundException",
        "set_timeout": "SandboxNotFoundException", "pause": "SandboxNotFoundException",
        "metrics": "SandboxNotFoundException", "kill": "returned False", "list": [],
        "logs": 404, "snapshot": "SandboxNotFoundException",
    }  # fmt: skip
    # envd's log lines: the failed command's end, bounded, paged, kept through pause/resume
    assert seen["logs_status"] == 200
    assert seen["logs_exit3"] == [["info", "/bin/bash"]]
    assert seen["logs_bounded"] is True
    assert seen["logs_page"] == [200, 1]
    assert seen["logs_after_resume"] == [["info", "/bin/bash"]]
    # snapshots: a sandbox from one has the files and processes; deleted once, by the team
    snapshot_id = f"e2b-{str(seen_run(seen))[:8]}:default"
    assert seen["snapshot"] == [True, [snapshot_id]]
    assert seen["source_stays_paused"] == "paused"
    assert seen["snapshots_listed"] == [snapshot_id]
    assert seen["snapshots_of_sbx"] == [snapshot_id]
    assert seen["snapshots_other"] == []
    assert seen["from_snapshot"] == ["persisted\n", True]
    assert seen["from_snapshot_killed"] is True
    assert seen["snapshot_delete_other"] is False
    assert (seen["snapshot_delete"], seen["snapshot_delete_again"]) == (True, False)
    assert seen["paused"] is True
    assert seen["paused_state"] == "paused"
    assert seen["pause_again"] == "returned False"
    assert seen["running_while_paused"] is False
    assert seen["connected_state"] == "running"
    assert seen["file_survived"] == "persisted\n"
    assert seen["process_survived"] is True
    assert seen["static_connect"] == "persisted\n"
    assert seen["metrics_type"] == "list"
    assert (seen["kill"], seen["kill_again"]) == (True, False)
    assert seen["after_kill"] == "SandboxNotFoundException"
    assert seen["running_after_kill"] == "returned False"
    assert seen["run_after_kill"] is not None


def seen_run(seen: dict[str, object]) -> object:
    info = seen["info"]
    assert isinstance(info, dict)
    return info["metadata"]["run"]


# ── the gateway's refusals, in raw bytes ──


def raw(stack: Stack, method: str, path: str, headers: dict[str, str],
        body: bytes = b"") -> tuple[int, bytes]:  # fmt: skip
    """One request with exactly this request line (http.client sends the path as given)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.cp.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        headers = {"Host": f"127.0.0.1:{stack.cp.port}", **headers}
        if body or method == "POST":
            headers["Content-Length"] = str(len(body))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@SQLITE_ONLY
def test_gateway_refusals(stack: Stack, capsule: str) -> None:
    r = stack.api.get(f"/sandboxes/{capsule}")
    assert r.status_code == 200, r.text
    token = r.json()["envdAccessToken"]
    other = other_team_key(stack)
    assert stack.idle is not None
    r = stack.api.get(f"/sandboxes/{stack.idle[0]}")  # a read: the idle timer runs on
    assert r.status_code == 200, r.text
    idle_token = r.json()["envdAccessToken"]
    assert idle_token != token
    mine = {"E2b-Sandbox-Id": capsule, "E2b-Sandbox-Port": "49983"}
    ok = {**mine, "X-Access-Token": token}
    start = b'{"process":{"cmd":"/bin/sh","args":["-c","echo owned > /tmp/owned"]}}'
    rpc = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}

    # Positive controls: the token, and the team's own key, reach envd.
    assert raw(stack, "GET", "/health", ok)[0] in (200, 204)
    status, body = raw(stack, "POST", "/filesystem.Filesystem/Stat", {**ok, **rpc}, b'{"path":"/"}')
    assert status == 200, body
    assert raw(stack, "GET", "/health", {**mine, "X-API-Key": stack.cp.admin_key})[0] in (200, 204)
    # The SDK's form without E2B_SANDBOX_URL: `49983-<id>.<domain>`, with the header as ever.
    host = {"Host": f"49983-{capsule}.localhost:{stack.cp.port}"}
    assert raw(stack, "GET", "/health", {**host, **ok})[0] in (200, 204)

    refusals = {
        "no token": (401, "POST", "/process.Process/Start", {**mine, **rpc}),
        "wrong token": (
            401,
            "POST",
            "/process.Process/Start",
            {**mine, **rpc, "X-Access-Token": token[:-2] + "xx"},
        ),
        "another capsule's token": (
            401,
            "POST",
            "/process.Process/Start",
            {**mine, **rpc, "X-Access-Token": idle_token},
        ),
        "another team's key": (
            404,
            "POST",
            "/process.Process/Start",
            {**mine, **rpc, "X-API-Key": other},
        ),
        "another port": (400, "GET", "/health", {**ok, "E2b-Sandbox-Port": "8000"}),
        "/init": (403, "POST", "/init", ok),
        "/snapshot/prepare": (403, "POST", "/snapshot/prepare", ok),
        "dot segment": (403, "POST", "/files/../init", ok),
        "encoded": (403, "POST", "/process.Process%2fStart", {**ok, **rpc}),
        "trailing slash": (403, "POST", "/process.Process/Start/", {**ok, **rpc}),
        "wrong method": (403, "GET", "/process.Process/Start", ok),
        "query on an RPC": (403, "POST", "/process.Process/Start?x=1", {**ok, **rpc}),
        "forged agent token": (400, "GET", "/health", {**ok, "X-Agent-Token": "x"}),
        "malformed id": (404, "GET", "/health", {**ok, "E2b-Sandbox-Id": capsule + "x"}),
        "host names another": (
            400,
            "GET",
            "/health",
            {**ok, "Host": f"49983-{stack.idle[0]}.localhost:{stack.cp.port}"},
        ),
        # Without the header a `49983-` host is the port proxy's, which refuses envd (issue 9).
        "bare host form": (403, "GET", "/health", {**host, "X-Access-Token": token}),
    }
    got = {}
    for name, (_, method, path, headers) in refusals.items():
        got[name] = raw(stack, method, path, headers, start if method == "POST" else b"")[0]
    assert got == {name: want for name, (want, *_) in refusals.items()}
    # Nothing ran: the refused Start never reached envd.
    out = stack.exec(capsule, "cat /tmp/owned 2>/dev/null; echo end")
    assert out["stdout"] == "end\n"


@SQLITE_ONLY
def test_agent_gateway_takes_the_agent_token_only(stack: Stack, capsule: str) -> None:
    agent_token, proxy_token = next(iter(stack.cp.host_tokens().values()))
    base = f"http://127.0.0.1:{stack.agent.port}/envd/{capsule}"
    with httpx.Client(trust_env=False, timeout=60) as client:
        assert client.get(f"{base}/health", headers={"X-Agent-Token": agent_token}).status_code \
            in (200, 204)  # fmt: skip
        assert client.get(f"{base}/health").status_code == 401
        assert (
            client.get(f"{base}/health", headers={"X-Nestbox-Proxy-Token": proxy_token}).status_code
            == 401
        )
        assert (
            client.get(
                f"{base}/health", headers={"Authorization": f"Bearer {agent_token}"}
            ).status_code
            == 401
        )
    conn = http.client.HTTPConnection("127.0.0.1", stack.agent.port, timeout=60)
    try:
        for path in (
            f"/envd/{capsule}/init",
            f"/envd/{capsule}/files/../init",
            f"/envd/{capsule}/%2e%2e/init",
            f"/envd/{capsule}/snapshot/prepare",
        ):
            conn.putrequest("POST", path, skip_accept_encoding=True)
            conn.putheader("X-Agent-Token", agent_token)
            conn.putheader("Content-Length", "2")
            conn.endheaders(b"{}")
            response = conn.getresponse()
            response.read()
            assert response.status == 403, path
    finally:
        conn.close()
