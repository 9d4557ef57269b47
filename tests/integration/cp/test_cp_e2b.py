"""E2B's REST facade (`controlplane/e2b/`) against fake agents: E2B's shapes and status codes,
lifetimes (kill or pause when they end), listing filters and paging, connect and resume, and
both error shapes. The real SDK on the real stack is `tests/e2e/test_e2b_sdk.py`."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from nestbox.controlplane.e2b.service import parse_metadata_query
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.envdgateway import envd_route
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import eventually
from tests.integration.cp.cluster import Cluster, cluster
from tests.integration.upstream_venv import upstream_venv


async def one_by_one(c: Cluster, path: str, key: dict[str, str], field: str) -> list[str]:
    """Every item of an E2B listing, read a page of one at a time (`x-next-token`)."""
    seen: list[str] = []
    token = None
    for _ in range(10):
        params = {"limit": "1", **({"nextToken": token} if token else {})}
        r = await c.client.get(path, params=params, headers=key)
        seen += [s[field] for s in r.json()]
        token = r.headers.get("x-next-token")
        if token is None:
            break
    return seen


async def two_teams(c: Cluster) -> tuple[dict[str, str], dict[str, str]]:
    """An API key of a user's own team, and one of another user's team."""
    _, key = await c.user("e2b@example.com")
    _, other = await c.user("other@example.com")
    return key, other


async def test_create_get_list_kill(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("e2b@example.com")
        c.hosts[0].agent.templates["base"] = (1, 512)
        r = await c.client.post("/v2/sandboxes", headers=key, json={
            "templateID": "base", "timeout": 120, "metadata": {"app": "a", "n": "1"},
            "envVars": {"X": "1"}})  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        sid = created["sandboxID"]
        assert created["templateID"] == "base"  # E2B's default: our `base` template
        assert created["envdVersion"] == "0.5.7"
        assert created["envdAccessToken"].startswith("ea_")
        assert set(created) == {"templateID", "sandboxID", "clientID", "envdVersion",
                                "envdAccessToken"}  # fmt: skip

        r = await c.client.get(f"/sandboxes/{sid}", headers=key)
        detail = r.json()
        assert detail["state"] == "running"
        assert detail["metadata"] == {"app": "a", "n": "1"}  # the agent's own keys left out
        assert detail["envdAccessToken"] == created["envdAccessToken"]
        end = datetime.fromisoformat(detail["endAt"])
        assert timedelta(seconds=60) < end - datetime.now(UTC) <= timedelta(seconds=120)

        r = await c.client.post("/v2/sandboxes", headers=key, json={"templateID": "minimal"})
        second = r.json()["sandboxID"]
        r = await c.client.get("/v2/sandboxes", params={"metadata": "app=a"}, headers=key)
        assert [s["sandboxID"] for s in r.json()] == [sid]
        r = await c.client.get("/v2/sandboxes", params={"metadata": "app=b"}, headers=key)
        assert r.json() == []
        r = await c.client.get("/v2/sandboxes", params={"state": "paused"}, headers=key)
        assert r.json() == []

        assert await one_by_one(c, "/v2/sandboxes", key, "sandboxID") == [sid, second]
        r = await c.client.get("/v2/sandboxes", params={"nextToken": "bm9uc2Vuc2U"}, headers=key)
        assert r.status_code == 400  # a token this API never gave

        r = await c.client.delete(f"/sandboxes/{sid}", headers=key)
        assert r.status_code == 204
        r = await c.client.delete(f"/sandboxes/{sid}", headers=key)
        assert r.status_code == 404
        assert r.json()["code"] == 404  # E2B's shape
        assert r.json()["error"]["code"] == "not_found"  # ours
        r = await c.client.get(f"/sandboxes/{sid}", headers=key)
        assert r.status_code == 404

        for body in ({"templateID": "minimal", "network": {"allowOut": ["1.1.1.1"]}},
                     {"templateID": "minimal", "timeout": 86_401},
                     {"templateID": "../x"}):  # fmt: skip
            r = await c.client.post("/v2/sandboxes", headers=key, json=body)
            assert r.status_code == 400, body
            assert r.json()["code"] == 400
        r = await c.client.post("/v2/sandboxes", headers={"X-API-KEY": "wrn_" + "0" * 32},
                                json={"templateID": "minimal"})  # fmt: skip
        assert r.status_code == 401
        assert list(c.hosts[0].agent.capsules) == [second]


async def test_pause_connect_resume(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("e2b@example.com")
        r = await c.client.post("/v2/sandboxes", headers=key, json={"templateID": "minimal"})
        sid = r.json()["sandboxID"]
        token = r.json()["envdAccessToken"]
        assert (await c.client.post(f"/sandboxes/{sid}/pause", headers=key)).status_code == 204
        r = await c.client.post(f"/sandboxes/{sid}/pause", headers=key)
        assert r.status_code == 409  # the SDK's pause() answers False
        r = await c.client.get(f"/sandboxes/{sid}", headers=key)
        assert r.json()["state"] == "paused"
        r = await c.client.post(f"/v2/sandboxes/{sid}/connect", headers=key, json={"timeout": 90})
        assert r.status_code == 201, r.text  # resumed
        assert r.json()["envdAccessToken"] == token  # the SDK's instance connect() keeps it
        r = await c.client.post(f"/v2/sandboxes/{sid}/connect", headers=key, json={})
        assert r.status_code == 200  # already running
        r = await c.client.post(f"/sandboxes/{sid}/resume", headers=key, json={})
        assert r.status_code == 409
        r = await c.client.post(f"/sandboxes/{sid}/refreshes", headers=key, json={"duration": 5})
        assert r.status_code == 204
        end = datetime.fromisoformat((await c.client.get(f"/sandboxes/{sid}", headers=key))
                                     .json()["endAt"])  # fmt: skip
        assert end - datetime.now(UTC) > timedelta(seconds=60)  # a refresh never shortens


async def test_lifetimes_end_in_kill_or_pause(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("e2b@example.com")
        r = await c.client.post("/v2/sandboxes", headers=key, json={"templateID": "minimal"})
        killed = r.json()["sandboxID"]
        r = await c.client.post("/v2/sandboxes", headers=key,
                                json={"templateID": "minimal", "autoPause": True})  # fmt: skip
        paused = r.json()["sandboxID"]
        agent = c.hosts[0].agent
        for sid in (killed, paused):
            r = await c.client.post(f"/sandboxes/{sid}/timeout", headers=key, json={"timeout": 0})
            assert r.status_code == 204

        async def ended() -> bool:
            gone = (await c.client.get(f"/sandboxes/{killed}", headers=key)).status_code == 404
            r = await c.client.get(f"/sandboxes/{paused}", headers=key)
            return gone and r.json()["state"] == "paused"

        await eventually(ended, within=20)
        assert killed not in agent.capsules
        assert paused in agent.capsules


async def test_logs_paged_filtered_and_team_scoped(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        key, other = await two_teams(c)
        r = await c.client.post("/v2/sandboxes", headers=key, json={"templateID": "minimal"})
        sid = r.json()["sandboxID"]
        levels = ["info", "warn", "error", "debug", "info"]
        c.hosts[0].agent.capsules[sid].logs = [
            pb.LogEntry(ts_unix_ms=1_700_000_000_000 + i, level=levels[i], message=f"line {i}",
                        fields={"logger": "nestbox.envd", "pid": str(i)})
            for i in range(5)
        ]  # fmt: skip

        r = await c.client.get(f"/sandboxes/{sid}/logs", headers=key)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert [e["message"] for e in doc["logEntries"]] == [f"line {i}" for i in range(5)]
        assert [e["line"] for e in doc["logs"]] == [f"line {i}" for i in range(5)]
        first = doc["logEntries"][0]
        assert first["level"] == "info"
        assert first["fields"] == {"logger": "nestbox.envd", "pid": "0"}
        assert datetime.fromisoformat(first["timestamp"]) == datetime.fromtimestamp(
            1_700_000_000, UTC
        )
        # paging: from a time on, at most `limit`
        r = await c.client.get(f"/sandboxes/{sid}/logs?start=1700000000002&limit=2", headers=key)
        assert [e["message"] for e in r.json()["logEntries"]] == ["line 2", "line 3"]
        for bad in ("start=-1", "limit=1001", "start=x"):
            r = await c.client.get(f"/sandboxes/{sid}/logs?{bad}", headers=key)
            assert r.status_code == 400, bad
            assert r.json()["code"] == 400

        # v2: level and above, search, backward (newest first) up to a cursor
        r = await c.client.get(f"/v2/sandboxes/{sid}/logs?level=warn", headers=key)
        assert [e["message"] for e in r.json()["logs"]] == ["line 1", "line 2"]
        r = await c.client.get(f"/v2/sandboxes/{sid}/logs?search=line%204", headers=key)
        assert [e["message"] for e in r.json()["logs"]] == ["line 4"]
        r = await c.client.get(f"/v2/sandboxes/{sid}/logs?direction=backward"
                               "&cursor=1700000000003&limit=2", headers=key)  # fmt: skip
        assert [e["message"] for e in r.json()["logs"]] == ["line 3", "line 2"]
        r = await c.client.get(f"/v2/sandboxes/{sid}/logs?direction=up", headers=key)
        assert r.status_code == 400

        # another team's key, an unknown id: 404; paused: 409 (the lines wait in the guest)
        for path in (f"/sandboxes/{sid}/logs", f"/v2/sandboxes/{sid}/logs"):
            r = await c.client.get(path, headers=other)
            assert r.status_code == 404
        r = await c.client.get("/sandboxes/cap_00000000000000000000000000/logs", headers=key)
        assert r.status_code == 404
        assert (await c.client.post(f"/sandboxes/{sid}/pause", headers=key)).status_code == 204
        r = await c.client.get(f"/sandboxes/{sid}/logs", headers=key)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "invalid_state"


async def test_snapshots_create_list_use_delete(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        key, other = await two_teams(c)
        r = await c.client.post("/v2/sandboxes", headers=key,
                                json={"templateID": "minimal", "timeout": 600})  # fmt: skip
        sid = r.json()["sandboxID"]
        end = (await c.client.get(f"/sandboxes/{sid}", headers=key)).json()["endAt"]

        r = await c.client.post(f"/sandboxes/{sid}/snapshots", headers=key, json={"name": "s1"})
        assert r.status_code == 201, r.text
        assert r.json() == {"snapshotID": "s1:default", "names": ["s1:default"]}
        detail = (await c.client.get(f"/sandboxes/{sid}", headers=key)).json()
        assert detail["state"] == "running"  # E2B's source sandbox runs on...
        assert detail["endAt"] == end  # ...with the same end
        r = await c.client.post(f"/sandboxes/{sid}/snapshots", headers=key, json={})
        assert r.status_code == 201
        unnamed = r.json()["snapshotID"]
        r = await c.client.post(f"/sandboxes/{sid}/snapshots", headers=key, json={"name": "s1"})
        assert r.status_code == 201  # the same name again: replaced (E2B: a new build)

        # a sandbox from a snapshot id, tag and all
        r = await c.client.post("/v2/sandboxes", headers=key, json={"templateID": "s1:default"})
        assert r.status_code == 201, r.text
        assert r.json()["templateID"] == "s1"
        copy = r.json()["sandboxID"]

        r = await c.client.get("/snapshots", headers=key)
        assert r.status_code == 200
        assert sorted(s["snapshotID"] for s in r.json()) == sorted(["s1:default", unnamed])
        # creation order: `s1` was replaced after `unnamed` was taken
        assert await one_by_one(c, "/snapshots", key, "snapshotID") == [unnamed, "s1:default"]
        r = await c.client.get("/snapshots", params={"name": "s1"}, headers=key)
        assert [s["snapshotID"] for s in r.json()] == ["s1:default"]
        r = await c.client.get("/snapshots", params={"sandboxID": "cap_x"}, headers=key)
        assert r.json() == []
        assert (await c.client.get("/snapshots", headers=other)).json() == []

        # another team: nothing to snapshot, use or delete
        r = await c.client.post(f"/sandboxes/{sid}/snapshots", headers=other, json={})
        assert r.status_code == 404
        r = await c.client.post("/v2/sandboxes", headers=other, json={"templateID": "s1:default"})
        assert r.status_code == 404
        assert (await c.client.delete("/templates/s1:default", headers=other)).status_code == 404
        # what cannot be honoured, or named
        for body in ({"memory": False}, {"name": "../x"}):
            r = await c.client.post(f"/sandboxes/{sid}/snapshots", headers=key, json=body)
            assert r.status_code == 400, body
        assert (await c.client.delete("/templates/minimal", headers=key)).status_code == 403

        r = await c.client.delete("/templates/s1:default", headers=key)
        assert r.status_code == 409  # a sandbox still runs from it
        assert r.json()["code"] == 409
        assert (await c.client.delete(f"/sandboxes/{copy}", headers=key)).status_code == 204
        assert (await c.client.delete("/templates/s1:default", headers=key)).status_code == 204
        assert (await c.client.delete("/templates/s1:default", headers=key)).status_code == 404
        assert [s["snapshotID"] for s in (await c.client.get("/snapshots", headers=key)).json()] \
            == [unnamed]  # fmt: skip


def test_paging_and_queries() -> None:
    assert parse_metadata_query("app%3Dx=a%2526b&k=v") == {"app=x": "a&b", "k": "v"}
    assert envd_route("POST", b"/process.Process/Start", b"") is None
    assert envd_route("GET", b"/files", b"path=%2Froot%2Fa&username=user") is None
    for method, path, query in (("POST", b"/init", b""), ("POST", b"/snapshot/prepare", b""),
                                ("POST", b"/ports/scan", b""),
                                ("GET", b"/process.Process/Start", b""),
                                ("POST", b"/process.Process/Start", b"x=1"),
                                ("POST", b"/files/../init", b""), ("GET", b"/files", b"a=\x00"),
                                ("POST", b"/process.Process/Start/", b"")):  # fmt: skip
        assert envd_route(method, path, query) is not None, path


async def test_template_builds_map_onto_the_recipe_builder(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        key, other = await two_teams(c)
        r = await c.client.post("/v3/templates", headers=key,
                                json={"name": "mytpl:v1", "cpuCount": 1})  # fmt: skip
        assert r.status_code == 202, r.text
        tid, bid = r.json()["templateID"], r.json()["buildID"]
        assert tid.startswith("mytpl~")
        build = f"/v2/templates/{tid}/builds/{bid}"
        status = f"/templates/{tid}/builds/{bid}/status"

        r = await c.client.get(f"/templates/{tid}/files/abc", headers=key)
        assert r.status_code == 400
        assert "Template.copy" in r.json()["message"]
        for body, named in (({"fromImage": "python:3"}, "from_image"),
                            ({"steps": [{"type": "COPY", "args": ["a", "/b"]}]},
                             "step 1 (copy)")):  # fmt: skip
            r = await c.client.post(build, headers=key, json=body)
            assert r.status_code == 400
            assert named in r.json()["message"]
        for who, path in ((other, f"/templates/{tid}/files/abc"), (other, status)):
            assert (await c.client.get(path, headers=who)).status_code == 404
        r = await c.client.post(build, headers=other, json={"fromTemplate": "minimal"})
        assert r.status_code == 404

        steps = [{"type": "ENV", "args": ["A", "1", "B", "2"]},
                 {"type": "RUN", "args": ["apt-get install -y vim", "root"]},
                 {"type": "USER", "args": ["user"]}, {"type": "WORKDIR", "args": ["/home/user"]},
                 {"type": "RUN", "args": ["echo hi"]}]  # fmt: skip
        r = await c.client.post(build, headers=key, json={
            "fromTemplate": "minimal", "steps": steps, "startCmd": "python3 -m http.server",
            "readyCmd": "curl -s localhost:8000"})  # fmt: skip
        assert r.status_code == 202, r.text
        [made] = [b for b in (await c.client.get("/v1/admin/builds", headers=key)).json()
                  if b["name"] == "mytpl"]  # fmt: skip
        assert made["recipe"] == ["ENV A=1", "ENV B=2", "RUN apt-get install -y vim",
                                  "USER user", "WORKDIR /home/user", "RUN echo hi",
                                  "START python3 -m http.server"]  # fmt: skip
        assert made["healthcheck"] == "curl -s localhost:8000"
        assert made["vcpus"] == 1
        r = await c.client.get(status, headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("waiting", "building", "ready", "error")
        assert r.json()["templateID"] == tid


TEMPLATE_SCRIPT = """
import json
from e2b import Template
out, logs = {}, []
t = (Template().from_template("minimal").set_envs({"A": "1"}).run_cmd("echo hi")
     .apt_install(["vim"]).set_workdir("/root").set_start_cmd("sleep 1000", "true"))
try:
    Template.build(t, "sdk-tpl", cpu_count=1, on_build_logs=lambda e: logs.append(e.message))
except Exception as err:
    out["build"] = [type(err).__name__, str(err)]
out["logs"] = logs
open("f.txt", "w").write("x")
for name, t in (("copy", Template(file_context_path=".").from_template("minimal")
                 .copy("f.txt", "/tmp/x")),
                ("image", Template().from_image("python:3").run_cmd("echo"))):
    try:
        Template.build(t, "sdk-" + name)
    except Exception as err:
        out[name] = [type(err).__name__, str(err)]
print(json.dumps(out))
"""


@pytest.mark.sdk
async def test_the_sdks_template_builder(settings: CPSettings, tmp_path: Path) -> None:
    """E2B's own `Template.build` against fake agents: the build is queued as a recipe and its
    logs and outcome reach the SDK (the fake agent fails its `apt-get`)."""
    python = upstream_venv("e2b", "2.63.0")
    async with cluster(settings) as c:
        _, key = await c.user("e2b@example.com")
        (tmp_path / "build.py").write_text(TEMPLATE_SCRIPT)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("E2B_")},
            "E2B_API_URL": c.url,
            "E2B_SANDBOX_URL": c.url,
            "E2B_API_KEY": key["X-API-Key"],
        }
        proc = await anyio.run_process([str(python), "build.py"], env=env, check=False,
                                       cwd=str(tmp_path))  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        out = json.loads(proc.stdout.decode().splitlines()[-1])
        [made] = (await c.client.get("/v1/admin/builds", headers=key)).json()
    assert made["name"] == "sdk-tpl"
    assert made["recipe"][:2] == ["ENV A=1", "RUN echo hi"]
    assert made["recipe"][-2:] == ["WORKDIR /root", "START sleep 1000"]
    assert made["healthcheck"] == "true"
    assert out["build"][0] == "BuildException"
    assert made["error"] in out["build"][1]
    # The build's steps reached on_build_logs (beside the SDK's own start and end lines).
    assert any(line.startswith(("pre-build ", "recipe ")) for line in out["logs"]), out["logs"]
    assert out["copy"] == [
        "FileUploadException",
        "400: copying local files (Template.copy) "
        "is not supported by this server; fetch them with run_cmd",
    ]
    assert out["image"][0] == "BuildException"
    assert "from_image (python:3)" in out["image"][1]
