"""Issue 9 against the whole stack (a control plane process, a registered agent process, a real
QEMU capsule), with raw bytes only (`http.client`: nothing between the test and the server
normalises a path): a capsule id is a key to that capsule's ports and to nothing else.

Refused, with the status and code asserted and a log line in the control plane's log each:
path traversal to the agent's RPC API in both proxy forms, raw, percent-encoded once and
twice, with backslashes and encoded slashes; envd's port through both forms (health, Stat,
Process/Start, /init); the control plane's own agent credentials brought from outside. The
agent refuses an RPC made with the proxy token. Positive control: a web server in the capsule
is served through both forms (a file, a directory with its trailing slash, a redirect).
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.integration.vm.conftest import SLOT_FIRST
from tests.integration.vm.stack import running_stack

if TYPE_CHECKING:
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.conftest import BootInfo

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

SLOTS = SLOT_FIRST + 170
"""Slots 171-173 past the session's first: clear of the runtime tests, the `agent` fixture
(41-70) and the SDK tests (101-160)."""
RPC = "/hostagent.v1.HostAgentService/ListCapsules"
WEB_PORT = 8080


def request(
    base: str,
    target: bytes,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """`target` sent exactly as given; (status, headers, body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = dict(headers or {})
        conn.putrequest(method, target.decode("latin-1"), skip_host="Host" in headers,
                        skip_accept_encoding=True)  # fmt: skip
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
            headers["Content-Length"] = str(len(body))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error_code(body: bytes) -> str:
    doc: dict[str, Any] = json.loads(body)
    return str(doc["error"]["code"])


def test_a_capsule_id_is_no_key_to_the_host(
    vm_settings: AgentSettings, minimal_template: tuple[Template, BootInfo], tmp_path: Path
) -> None:
    with running_stack(tmp_path / "stack") as cp:
        agent = cp.add_agent(vm_settings, slot_first=SLOTS, slot_count=3)
        with httpx.Client(base_url=cp.url, trust_env=False, timeout=300) as api:
            r = api.post("/v1/capsules", json={}, headers=cp.admin)
            assert r.status_code == 201, r.text
            cid = r.json()["id"]
            web = "mkdir -p /srv/d && echo hello > /srv/d/f.txt && cd /srv && " \
                  f"exec python3 -m http.server {WEB_PORT}"  # fmt: skip
            start = {"cmd": "/bin/sh", "args": ["-c", web], "background": True}
            r = api.post(f"/v1/capsules/{cid}/exec", headers=cp.admin, json=start)
            assert r.status_code == 202, r.text
            ((agent_token, proxy_token),) = cp.host_tokens().values()
            assert agent_token != proxy_token

            # ── positive control: the capsule's web server, both forms ──
            sub = {"Host": f"{WEB_PORT}-{cid}.localhost:{cp.port}"}
            file_path = b"/proxy/%s/%d/d/f.txt" % (cid.encode(), WEB_PORT)
            deadline = time.monotonic() + 60
            while True:
                status, _, body = request(cp.url, file_path)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert (status, body) == (200, b"hello\n")
            assert request(cp.url, b"/d/f.txt", headers=sub)[::2] == (200, b"hello\n")
            status, _, listing = request(cp.url, b"/proxy/%s/%d/d/" % (cid.encode(), WEB_PORT))
            assert status == 200
            assert b"f.txt" in listing  # the trailing slash reached the server
            status, _, listing = request(cp.url, b"/d/", headers=sub)
            assert status == 200
            assert b"f.txt" in listing
            status, headers, _ = request(cp.url, b"/proxy/%s/%d/d" % (cid.encode(), WEB_PORT))
            assert (status, headers["location"]) == (301, f"/proxy/{cid}/{WEB_PORT}/d/")
            status, headers, _ = request(cp.url, b"/d", headers=sub)
            assert (status, headers["location"]) == (301, "/d/")

            # ── refused at the control plane ──
            prefix = b"/proxy/%s/80" % cid.encode()
            host80 = {"Host": f"80-{cid}.localhost:{cp.port}"}
            traversals = [
                (b"/../../..", ". or .. segment"),
                (b"/%2e%2e/%2e%2e/%2e%2e", ". or .. segment (percent-encoded)"),
                (b"/%2E%2E/%2E%2E/%2E%2E", ". or .. segment (percent-encoded)"),
                (b"/%252e%252e/%252e%252e/%252e%252e", ". or .. segment (percent-encoded)"),
                (b"/..\\..\\..\\", "backslash"),
                (b"/..%5c..%5c..%5c", "backslash (percent-encoded)"),
                (b"/..%2f..%2f..%2f", "encoded slash"),
                (b"/..%252f..%252f..%252f", "encoded slash"),
            ]
            cases: list[tuple[str, bytes, dict[str, str], int, str, str]] = []
            for rest, why in traversals:
                cases.append(("POST", prefix + rest + RPC.encode(), {}, 400, "invalid_request",
                              why))  # fmt: skip
            cases += [
                ("POST", b"/a/../../../../hostagent.v1.HostAgentService/ListCapsules", host80,
                 400, "invalid_request", ". or .. segment"),
                ("POST", b"/a/%2e%2e/%2e%2e/%2e%2e/%2e%2e/hostagent.v1.HostAgentService/Exec",
                 host80, 400, "invalid_request", ". or .. segment (percent-encoded)"),
                ("POST", b"/a/%252e%252e/%252e%252e/hostagent.v1.HostAgentService/Terminate",
                 host80, 400, "invalid_request", ". or .. segment (percent-encoded)"),
                ("POST", b"/a\\..\\..\\hostagent.v1.HostAgentService/ReadFile", host80, 400,
                 "invalid_request", "backslash"),
                ("POST", b"/a%2f..%2f..%2fhostagent.v1.HostAgentService/ReadFile", host80, 400,
                 "invalid_request", "encoded slash"),
            ]  # fmt: skip
            envd = [("GET", b"/health"), ("POST", b"/filesystem.Filesystem/Stat"),
                    ("POST", b"/process.Process/Start"), ("POST", b"/init")]  # fmt: skip
            for method, path in envd:
                cases.append((method, b"/proxy/%s/49983%s" % (cid.encode(), path), {}, 403,
                              "forbidden", "port 49983 (envd) is not proxied"))  # fmt: skip
                cases.append((method, path, {"Host": f"49983-{cid}.localhost:{cp.port}"}, 403,
                              "forbidden", "port 49983 (envd) is not proxied"))  # fmt: skip
            for name, value in (("X-Agent-Token", agent_token),
                                ("X-Nestbox-Proxy-Token", proxy_token)):  # fmt: skip
                why = f"the {name.lower()} header is not accepted"
                cases.append(("GET", b"/proxy/%s/%d/d/f.txt" % (cid.encode(), WEB_PORT),
                              {name: value}, 400, "invalid_request", why))  # fmt: skip
                cases.append(("GET", b"/d/f.txt", {**sub, name: value}, 400, "invalid_request",
                              why))  # fmt: skip

            for method, target, headers, want, code, _ in cases:
                status, _, body = request(cp.url, target, method=method, headers=headers,
                                          body=b"{}" if method == "POST" else None)  # fmt: skip
                assert (status, error_code(body)) == (want, code), (target, headers, body)

            # ── refused at the agent: the proxy token is no RPC credential ──
            for headers in ({"X-Agent-Token": proxy_token},
                            {"Authorization": f"Bearer {proxy_token}"},
                            {"X-Nestbox-Proxy-Token": proxy_token}):  # fmt: skip
                status, _, body = request(agent.url, RPC.encode(), method="POST",
                                          headers=headers, body=b"{}")  # fmt: skip
                assert (status, error_code(body)) == (401, "unauthorized"), headers
            status, _, body = request(agent.url, RPC.encode(), method="POST", body=b"{}",
                                      headers={"X-Agent-Token": agent_token})  # fmt: skip
            assert status == 200  # the agent token is: the tokens above were the real ones
            assert cid in json.loads(body)["capsules"][0]["capsuleId"]
            # ... and the agent's own proxy refuses traversal and envd with the right token too
            proxy_header = {"X-Nestbox-Proxy-Token": proxy_token}
            for target, want in ((prefix + b"/%2e%2e/%2e%2e" + RPC.encode(), 400),
                                 (b"/proxy/%s/49983/health" % cid.encode(), 403)):  # fmt: skip
                status, _, _ = request(agent.url, target, headers=proxy_header)
                assert status == want, target
            assert request(agent.url, file_path, headers=proxy_header)[::2] == (200, b"hello\n")

            assert api.delete(f"/v1/capsules/{cid}", headers=cp.admin).status_code == 204

        # every refusal at the control plane was logged, once, with the capsule and the reason
        lines = [line for line in cp.log_path.read_text().splitlines()
                 if "proxy refused" in line]  # fmt: skip
        assert len(lines) == len(cases), "\n".join(lines)
        for (_, _, _, _, _, why), line in zip(cases, lines, strict=True):
            assert f"capsule {cid}:" in line
            assert why in line, (why, line)
        agent_lines = [line for line in agent.log_path.read_text().splitlines()
                       if "proxy refused" in line]  # fmt: skip
        assert len(agent_lines) == 2
