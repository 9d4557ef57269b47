"""Loopback port forwarding with a real envd, real socat and a real HTTP server: forwarded on
127.x.y.2 (loopback range, so nothing leaves the machine), stopped by /snapshot/prepare,
back after /init's recovery, gone with its listener and with envd."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.integration.envd_process import EnvdProcess, run_envd

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")

# Loopback addresses (127/8: nothing leaves the machine) of this session's own, so that
# another test session on the machine, whose envds forward every loopback server too, never
# answers for ours.
_NET = f"127.{secrets.randbelow(250) + 1}.{secrets.randbelow(256)}"
FORWARD = f"{_NET}.2"
CONTROL = f"{_NET}.3"  # where a second envd, the positive control, forwards to
SCAN = {"NESTBOX_ENVD_PORT_SCAN_INTERVAL_S": "0.2"}


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def loopback_server() -> Iterator[int]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def forwarded(port: int) -> bool:
    try:
        r = httpx.get(f"http://{FORWARD}:{port}/", timeout=2)
    except httpx.TransportError:
        return False
    return r.status_code == 200 and r.text == "hello from loopback"


def refused(port: int) -> bool:
    try:
        httpx.get(f"http://{FORWARD}:{port}/", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def socats(
    envd: EnvdProcess, *, forks: bool = False, port: int | None = None
) -> list[psutil.Process]:
    """envd's live socat children; with `forks`, also the per-connection forks under them; with
    `port`, only those forwarding that port (other loopback servers on a shared host are
    forwarded too, as they would be in a guest)."""
    found = []
    for c in psutil.Process(envd.pid).children(recursive=forks):
        with contextlib.suppress(psutil.NoSuchProcess):
            if c.name() != "socat" or c.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            if port is None or f"TCP4-LISTEN:{port}," in " ".join(c.cmdline()):
                found.append(c)
    return found


def in_groups(pgids: list[int]) -> list[int]:
    """Pids of live processes in any of these process groups (socat and its forks)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> float:
    """Seconds it took for `cond` to hold; fails the test after `timeout`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def forwarded_by(address: str, port: int) -> bool:
    try:
        r = httpx.get(f"http://{address}:{port}/", timeout=2)
    except httpx.TransportError:
        return False
    return r.status_code == 200


def scans_seen(control: EnvdProcess, scans: int = 2) -> None:
    """Positive control for a "nothing is forwarded" check: returns once `control` (an envd
    forwarding onto CONTROL, same scan interval) has picked up `scans` new loopback servers
    one after the other, each started after the previous one was forwarded. So at least
    `scans - 1` whole scan periods passed, on this machine at its current speed, since this
    was called: a scanner that were running would have seen a server started before that."""
    for _ in range(scans):
        with loopback_server() as port:
            wait_until(lambda: forwarded_by(CONTROL, port))
    assert control.proc.poll() is None


def test_forward_prepare_recover(tmp_path: Path) -> None:
    with (
        run_envd(tmp_path, "--forward-address", FORWARD, env=SCAN) as envd,
        loopback_server() as port,
    ):
        took = wait_until(lambda: forwarded(port))
        print(f"forwarded after {took:.2f} s")
        assert [p.cmdline()[1:] for p in socats(envd, port=port)] == [
            [f"TCP4-LISTEN:{port},bind={FORWARD},reuseaddr,fork", f"TCP4:127.0.0.1:{port}"]
        ]

        groups = [p.pid for p in socats(envd, port=port)]
        assert in_groups(groups) != []

        assert httpx.post(f"{envd.url}/snapshot/prepare").status_code == 204
        assert refused(port), "forwarding must stop before prepare answers"
        assert socats(envd, forks=True) == []
        assert in_groups(groups) == [], "no socat or fork of one survives the prepare"
        # The scanner is stopped: nothing comes back, for the old server or a new one, while
        # an envd that scans (same interval) picks up two new servers in turn.
        with (
            run_envd(tmp_path, "--forward-address", CONTROL, env=SCAN) as control,
            loopback_server() as new_port,
        ):
            scans_seen(control)
            assert forwarded_by(CONTROL, new_port)
            assert refused(port)
            assert refused(new_port)
            assert socats(envd, forks=True) == []

        assert httpx.post(f"{envd.url}/init", json={}).status_code == 204
        took = wait_until(lambda: forwarded(port))
        print(f"forwarded again {took:.2f} s after /init")
        assert len(socats(envd, port=port)) == 1


def test_listener_gone_means_socat_gone_and_envd_leaves_none(tmp_path: Path) -> None:
    with run_envd(tmp_path, "--forward-address", FORWARD, env=SCAN) as envd:
        with loopback_server() as port:
            wait_until(lambda: forwarded(port))
        wait_until(lambda: socats(envd, forks=True, port=port) == [])
        assert refused(port)

        with loopback_server() as port2:
            wait_until(lambda: forwarded(port2))
            pids = [p.pid for p in socats(envd, forks=True)]
            envd.proc.terminate()  # SIGTERM: lifespan shutdown stops forwarding
            envd.proc.wait(10)
            assert not any(psutil.pid_exists(pid) for pid in pids)
            assert refused(port2)


def test_forwarding_is_off_by_default_outside_a_vm(envd: EnvdProcess, tmp_path: Path) -> None:
    # The control scans at envd's default interval, as `envd` would if forwarding were on.
    with (
        loopback_server() as port,
        run_envd(tmp_path, "--forward-address", CONTROL) as control,
    ):
        scans_seen(control)
        assert forwarded_by(CONTROL, port)
        assert refused(port)
        assert socats(envd, forks=True) == []  # none at all: not even for other servers


def test_a_scan_request_answers_once_the_new_server_is_forwarded(tmp_path: Path) -> None:
    """`POST /ports/scan` (what the host's port proxy sends after a refused dial, since an idle
    envd does not poll) scans at once and answers when the new socat listens. The period here
    is an hour, so only the request can have found the server."""
    env = {"NESTBOX_ENVD_PORT_SCAN_INTERVAL_S": "3600"}
    with (
        run_envd(tmp_path, "--forward-address", FORWARD, env=env) as envd,
        loopback_server() as port,
    ):
        assert refused(port)
        answer = httpx.post(f"{envd.url}/ports/scan", timeout=30)
        assert answer.status_code == 200
        assert port in answer.json()["forwarded"]
        assert forwarded(port)  # already listening: no wait
