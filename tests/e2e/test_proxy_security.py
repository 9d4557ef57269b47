"""Issue 9 against the whole stack (a control plane process, a registered agent process, a real
QEMU capsule), with raw bytes only (`http.client`: nothing between the test and the server
normalises a path): a capsule id is a key to that capsule's ports and to nothing else.

Refused, with the status and code asserted and a log line in the control plane's log each:
path traversal to the agent's RPC API in both proxy forms, raw, percent-encoded once and
twice, with backslashes and encoded slashes; envd's port through both forms (health, Stat,
Process/Start, /init); the control plane's own agent credentials brought from outside. The
agent refuses an RPC made with the proxy token. Positive control: a web server in the capsule
is served through both forms (a file, a directory with its trailing slash, a redirect).

On both databases: the control plane opens the host's sealed tokens from its database.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.e2e.stack import wait_for
from tests.e2e.wire import error_code, request

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

RPC = "/hostagent.v1.HostAgentService/ListCapsules"
WEB_PORT = 8080


def test_a_capsule_id_is_no_key_to_the_host(stack: Stack, capsule: str) -> None:
    cp, agent, cid = stack.cp, stack.agent, capsule
    api = stack.api
    cp_log, agent_log = cp.log_size(), agent.log_path.stat().st_size
    web = "mkdir -p /srv/d && echo hello > /srv/d/f.txt && cd /srv && " \
          f"exec python3 -m http.server {WEB_PORT}"  # fmt: skip
    start = {"cmd": "/bin/sh", "args": ["-c", web], "background": True, "tag": "e2e-http-server"}
    r = api.post(f"/v1/capsules/{cid}/exec", json=start)
    assert r.status_code == 202, r.text
    try:
        agent_token, proxy_token = cp.host_tokens()[stack.host_id(agent)]
        assert agent_token != proxy_token
        refused = check_refusals(stack, cid, agent_token, proxy_token)
    finally:
        r = api.delete(f"/v1/capsules/{cid}/processes/e2e-http-server")
        assert r.status_code == 204, r.text

    # every refusal at the control plane was logged, once, with the capsule and the reason
    lines = [line for line in cp.log_since(cp_log).splitlines() if "proxy refused" in line]
    assert len(lines) == len(refused), "\n".join(lines)
    for why, line in zip(refused, lines, strict=True):
        assert f"capsule {cid}:" in line
        assert why in line, (why, line)
    with agent.log_path.open("rb") as f:
        f.seek(agent_log)
        agent_lines = [line for line in f.read().decode(errors="replace").splitlines()
                       if "proxy refused" in line]  # fmt: skip
    assert len(agent_lines) == 2


def check_refusals(stack: Stack, cid: str, agent_token: str, proxy_token: str) -> list[str]:
    """Every check against the capsule's web server; the reasons the control plane refused,
    in order."""
    cp, agent = stack.cp, stack.agent
    # ── positive control: the capsule's web server, both forms ──
    sub = {"Host": f"{WEB_PORT}-{cid}.localhost:{cp.port}"}
    file_path = b"/proxy/%s/%d/d/f.txt" % (cid.encode(), WEB_PORT)
    wait_for("the capsule's web server through the proxy",
             lambda: request(cp.url, file_path)[0] == 200, within=60, every=0.2)  # fmt: skip
    assert request(cp.url, file_path)[::2] == (200, b"hello\n")
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
    assert cid in {c["capsuleId"] for c in json.loads(body)["capsules"]}
    # ... and the agent's own proxy refuses traversal and envd with the right token too
    proxy_header = {"X-Nestbox-Proxy-Token": proxy_token}
    for target, want in ((prefix + b"/%2e%2e/%2e%2e" + RPC.encode(), 400),
                         (b"/proxy/%s/49983/health" % cid.encode(), 403)):  # fmt: skip
        status, _, _ = request(agent.url, target, headers=proxy_header)
        assert status == want, target
    assert request(agent.url, file_path, headers=proxy_header)[::2] == (200, b"hello\n")
    return [why for *_, why in cases]
