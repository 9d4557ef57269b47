"""The public port proxy to a real guest, in both forms (`/proxy/{id}/{port}/…` and the
`{port}-{id}.{domain}` Host), over raw HTTP/1.1 and raw WebSocket frames: a web server in the
capsule (`guest_server.py`, stdlib only, written through the files API and run in the
background through the exec API) says what reached it, and echoes WebSocket messages.

On both databases: the control plane resolves the capsule to its host from its database on
every proxied request (a cached target expires), which is what differs between them here.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.stack import wait_for
from tests.e2e.wire import BINARY, CLOSE, PING, PONG, TEXT, RawWebSocket, request

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

PORT = 8081
SERVER = Path(__file__).with_name("guest_server.py")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[Stack, str]]]:
    """The web servers this module started (database -> stack, capsule); killed at its end."""
    started: dict[str, tuple[Stack, str]] = {}
    yield started
    for stack, capsule in started.values():
        r = stack.api.delete(f"/v1/capsules/{capsule}/processes/e2e-web")
        assert r.status_code == 204, r.text


@pytest.fixture
def web(stack: Stack, capsule: str, servers: dict[str, tuple[Stack, str]]) -> int:
    """`guest_server.py` running in the shared capsule on `PORT`, answering through the proxy."""
    if stack.db not in servers:
        stack.write_file(capsule, "/root/guest_server.py", SERVER.read_bytes())
        started = stack.exec(capsule, f"exec python3 /root/guest_server.py {PORT}",
                             background=True, tag="e2e-web")  # fmt: skip
        assert started["pid"] > 0, started
        servers[stack.db] = (stack, capsule)
        probe = f"/proxy/{capsule}/{PORT}/ready".encode()
        wait_for("the guest's web server through the proxy",
                 lambda: request(stack.cp.url, probe)[0] == 200, within=60, every=0.2)  # fmt: skip
    return PORT


def test_http_through_both_forms(stack: Stack, capsule: str, web: int) -> None:
    body = os.urandom(200_000)
    sent = {"Authorization": "Bearer the-app-s-own", "X-API-Key": stack.cp.admin_key}
    status, headers, answer = request(
        stack.cp.url, f"/proxy/{capsule}/{web}/echo/x/?q=1".encode(), method="POST",
        headers={**sent, "Content-Type": "application/octet-stream"}, body=body,
    )  # fmt: skip
    assert status == 200, answer
    assert headers["content-type"] == "application/json"
    seen = json.loads(answer)
    assert seen["method"] == "POST"
    assert seen["target"] == "/echo/x/?q=1"  # the prefix gone, the trailing slash kept
    assert (seen["body_len"], seen["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert seen["headers"]["authorization"] == "Bearer the-app-s-own"  # the app's own
    assert "x-api-key" not in seen["headers"]  # the caller's key never reaches a capsule

    host = f"{web}-{capsule}.localhost:{stack.cp.port}"
    status, _, answer = request(stack.cp.url, b"/echo/y?z=2", headers={"Host": host})
    assert status == 200, answer
    seen = json.loads(answer)
    assert (seen["method"], seen["target"], seen["body_len"]) == ("GET", "/echo/y?z=2", 0)

    # a port nothing listens on is the agent's 502, through both forms
    status, _, _ = request(stack.cp.url, f"/proxy/{capsule}/{web + 1}/x".encode())
    assert status == 502
    status, _, _ = request(stack.cp.url, b"/x", headers={"Host": f"{web + 1}-{capsule}.localhost"})
    assert status == 502


@pytest.mark.parametrize("form", ["path", "host"])
def test_websocket_through_both_forms(stack: Stack, capsule: str, web: int, form: str) -> None:
    if form == "path":
        target = f"/proxy/{capsule}/{web}/ws/echo?x=1".encode()
        headers = {"Host": f"127.0.0.1:{stack.cp.port}"}
    else:
        target = b"/ws/echo?x=1"
        headers = {"Host": f"{web}-{capsule}.localhost:{stack.cp.port}"}
    ws = RawWebSocket.connect(stack.cp.port, target, headers)
    try:
        assert ws.receive() == (TEXT, b'{"target": "/ws/echo?x=1"}')
        ws.send(TEXT, "héllo".encode())
        assert ws.receive() == (TEXT, "héllo".encode())
        blob = os.urandom(70_000)  # past 65535: a 64-bit length both ways
        ws.send(BINARY, blob)
        assert ws.receive() == (BINARY, blob)
        ws.send(PING, b"are you there")
        assert ws.receive() == (PONG, b"are you there")
        assert ws.close() == (CLOSE, struct.pack("!H", 1000))
    finally:
        ws.sock.close()
