"""Soak: pause/resume cycles of one capsule through the public API while it has a background
process, a web server answering a client's keep-alive connection through the port proxy, and
an attached terminal. Every cycle must leave all three working: the background process is the
same one and still counting, the client's one connection to the control plane answers again
(never a new connection), and the same shell answers on the terminal (reattached by its tag
when the socket closed with the pause).

`make test` runs `SOAK_CYCLES` (10) on SQLite; `make soak` runs 100 (`NESTBOX_SOAK_CYCLES`)
and prints resume p50/p99 (never asserted: timings here are TCG's on a shared machine).
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.e2e.stack import wait_for

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(3600),
    # One database: what the soak checks is the agent's and the guest's, not the database's.
    pytest.mark.parametrize("stack", ["sqlite"], indirect=True),
]

SOAK_CYCLES = int(os.environ.get("NESTBOX_SOAK_CYCLES", "10"))
PORT = 8083
SERVER = Path(__file__).with_name("guest_server.py")
WITHIN_S = 60.0
# The count is renamed into place: a reader never sees the file between its truncation and
# its write (a slow guest can be stopped there for seconds).
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /tmp/soak-count.new; "
    "mv /tmp/soak-count.new /tmp/soak-count; sleep 0.1; done"
)


class Terminal:
    """A shell on the capsule's PTY WebSocket, reattached by its tag when the socket closed."""

    def __init__(self, stack: Stack, capsule: str) -> None:
        self.stack, self.capsule = stack, capsule
        self.ws = self._open()
        self.ws.send(json.dumps({"type": "start", "cmd": "/bin/bash", "cols": 80, "rows": 24}))
        started = self._control()
        assert started["type"] == "started", started
        self.tag, self.pid = started["tag"], started["pid"]
        self.reattached = 0

    def _open(self) -> ClientConnection:
        return connect(f"{self.stack.cp.ws_url}/v1/capsules/{self.capsule}/pty",
                       additional_headers=self.stack.cp.admin, open_timeout=WITHIN_S,
                       max_size=None, legacy=True)  # fmt: skip  # held across cycles

    def _control(self) -> dict[str, Any]:
        deadline = time.monotonic() + WITHIN_S
        while True:
            message = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(message, str):
                doc: dict[str, Any] = json.loads(message)
                if doc.get("type") != "ping":
                    return doc

    def _reattach(self) -> None:
        self.ws.close()
        self.ws = self._open()
        self.ws.send(json.dumps({"type": "connect", "tag": self.tag}))
        again = self._control()
        assert (again["type"], again["pid"]) == ("started", self.pid), again
        self.reattached += 1

    def echo(self, n: int) -> None:
        """`echo` through the shell and see it: the same shell (its `$$`) answers."""
        needle = f"soak-{n}-{self.pid}".encode()
        for attempt in (0, 1):
            try:
                self.ws.send(f"echo soak-$(({n}))-$$\n".encode())
                seen = b""
                deadline = time.monotonic() + WITHIN_S
                while needle not in seen:
                    message = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                    if isinstance(message, bytes):
                        seen += message
                return
            except ConnectionClosed:
                if attempt:
                    raise
                self._reattach()

    def close(self) -> None:
        self.ws.send(json.dumps({"type": "kill"}))
        self.ws.close()


def counter(stack: Stack, capsule: str) -> int:
    return int(stack.out(capsule, "cat /tmp/soak-count").strip())


def test_pause_resume_soak(stack: Stack) -> None:
    capsule = stack.create(template="minimal", timeout_sec=0)["id"]
    try:
        stack.write_file(capsule, "/root/guest_server.py", SERVER.read_bytes())
        stack.exec(capsule, f"exec python3 /root/guest_server.py {PORT}", background=True,
                   tag="soak-web")  # fmt: skip
        background = stack.exec(capsule, COUNTER, background=True, tag="soak-count")["pid"]
        host, port = stack.cp.url.removeprefix("http://").split(":")
        client = http.client.HTTPConnection(host, int(port), timeout=WITHIN_S)
        key = stack.cp.admin

        def ask(n: int) -> None:
            client.request("GET", f"/proxy/{capsule}/{PORT}/soak/{n}", headers=key)
            answer = client.getresponse()
            body = answer.read()
            assert answer.status == 200, (answer.status, body[:300])
            assert json.loads(body)["target"] == f"/soak/{n}"  # the proxy strips its prefix

        wait_for("the web server in the capsule", lambda: _answers(stack, capsule), within=60)
        ask(0)
        sock = client.sock
        terminal = Terminal(stack, capsule)
        terminal.echo(0)
        last = counter(stack, capsule)
        resumes: list[float] = []
        for n in range(1, SOAK_CYCLES + 1):
            r = stack.api.post(f"/v1/capsules/{capsule}/pause")
            assert r.status_code == 200, (n, r.text)
            start = time.monotonic()
            r = stack.api.post(f"/v1/capsules/{capsule}/resume")
            resumes.append(time.monotonic() - start)
            assert r.status_code == 200, (n, r.text)
            assert r.json()["status"] == "running", (n, r.json())
            wait_for(f"cycle {n}: the counter moves on",
                     lambda before=last: counter(stack, capsule) > before,
                     within=WITHIN_S)  # fmt: skip
            last = counter(stack, capsule)
            listed = stack.api.get(f"/v1/capsules/{capsule}/processes").json()["processes"]
            assert background in [p["pid"] for p in listed], (n, listed)  # the same process
            ask(n)
            assert client.sock is sock, f"cycle {n}: the keep-alive connection was replaced"
            terminal.echo(n)
        terminal.close()
        client.close()
        resumes.sort()
        p99 = resumes[min(len(resumes) - 1, int(len(resumes) * 0.99))]
        print(f"soak: {SOAK_CYCLES} pause/resume cycles, 0 failures; resume through the API "
              f"p50 {statistics.median(resumes) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
              f"terminal reattached {terminal.reattached} times")  # fmt: skip
    finally:
        stack.destroy(capsule)


def _answers(stack: Stack, capsule: str) -> bool:
    r = stack.api.get(f"/proxy/{capsule}/{PORT}/ready")
    return r.status_code == 200
