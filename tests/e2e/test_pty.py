"""A terminal through the control plane's PTY WebSocket (`/v1/capsules/{id}/pty`, the frames of
sdk-request-map §2.7) to a real shell in a real guest: open, type, read the output, resize,
disconnect, reconnect to the same terminal by its tag and find the same shell alive, kill it.

On both databases: the socket re-checks its caller's credentials against the database while
it is open (`wsconn.watch_credentials`).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.e2e.stack import wait_for

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

WITHIN_S = 60.0
"""A bound for a hang: a TCG guest on a busy machine answers in well under a second."""


def open_pty(stack: Stack, capsule: str) -> ClientConnection:
    return connect(f"{stack.cp.ws_url}/v1/capsules/{capsule}/pty",
                   additional_headers=stack.cp.admin, open_timeout=WITHIN_S,
                   max_size=None)  # fmt: skip


def control(ws: ClientConnection) -> dict[str, Any]:
    """The next control (text) frame that is not a ping; output frames before it are dropped."""
    deadline = time.monotonic() + WITHIN_S
    while True:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, str):
            doc: dict[str, Any] = json.loads(message)
            if doc.get("type") != "ping":
                return doc


def output_until(ws: ClientConnection, needle: bytes) -> bytes:
    """Terminal output (binary frames) up to and including `needle`."""
    seen = b""
    deadline = time.monotonic() + WITHIN_S
    while needle not in seen:
        try:
            message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"no {needle!r} in {WITHIN_S} s; the output: {seen!r}") from None
        if isinstance(message, bytes):
            seen += message
        else:
            doc = json.loads(message)
            assert doc.get("type") == "ping", (doc, seen)
    return seen


def processes(stack: Stack, capsule: str) -> dict[str, int]:
    """The capsule's processes, tag -> pid."""
    r = stack.api.get(f"/v1/capsules/{capsule}/processes")
    assert r.status_code == 200, r.text
    return {p["tag"]: p["pid"] for p in r.json()["processes"] if p["tag"]}


def test_pty_open_resize_reconnect_kill(stack: Stack, capsule: str) -> None:
    with open_pty(stack, capsule) as ws:
        ws.send(json.dumps({"type": "start", "cmd": "/bin/bash", "cols": 80, "rows": 24}))
        started = control(ws)
        assert started["type"] == "started", started
        tag, pid = started["tag"], started["pid"]
        assert tag.startswith("pty-")
        assert pid > 0
        ws.send(b"echo pty-$((6*7))\n")  # binary frames are input
        output_until(ws, b"pty-42")
        ws.send(b"stty size\n")
        output_until(ws, b"24 80")
        ws.send(json.dumps({"type": "resize", "cols": 100, "rows": 40}))
        ws.send(b"stty size\n")
        output_until(ws, b"40 100")
        ws.send(b"MARK=alive-$((1000+234))\n")
        ws.send(b"echo marked-$((1+1))\n")
        output_until(ws, b"marked-2")
    # The socket is gone; the terminal is not.
    assert processes(stack, capsule).get(tag) == pid

    with open_pty(stack, capsule) as ws:
        ws.send(json.dumps({"type": "connect", "tag": tag}))
        again = control(ws)
        assert (again["type"], again["tag"], again["pid"]) == ("started", tag, pid), again
        ws.send(b"echo $MARK-$$\n")  # the shell's own variable and pid: the same shell
        output_until(ws, f"alive-1234-{pid}".encode())
        ws.send(b"stty size\n")
        output_until(ws, b"40 100")  # and the size it was given before
        ws.send(json.dumps({"type": "kill"}))
        ended = control(ws)
        assert ended["type"] == "exit", ended
        assert ended["exit_code"] != 0  # killed, not a clean exit
    wait_for(f"{tag} gone from the process list", lambda: tag not in processes(stack, capsule))
