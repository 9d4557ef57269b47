"""envd's lifecycle endpoints against a real envd process (outside-VM mode): health, metrics,
envs, /init, the access token, and /snapshot/prepare + recovery seen from client sockets."""

from __future__ import annotations

import json
import socket
import struct
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

from nestbox.protocol.envd import ENVD_VERSION
from tests.conftest import wait_until
from tests.integration.envd_process import EnvdProcess, run_envd

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

# --- a tiny raw HTTP/1.1 client: the tests need to see exactly what happens to each socket ---


class RawConn:
    def __init__(self, envd: EnvdProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", envd.port), timeout=5)
        self.buf = b""

    def send_head(self, method: str, path: str, *, length: int | None = None) -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: envd\r\n"
        if length is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
        self.sock.sendall((head + "\r\n").encode())

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str]]:
        self.send_head(method, path, length=len(body) if body else None)
        self.sock.sendall(body)
        return self.read_response()

    def read_response(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        self.buf = self.buf[length:]
        return int(lines[0].split()[1]), headers

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by envd")
        self.buf += chunk

    def closed_by_peer(self, wait: float) -> bool:
        """True if envd closed this socket within `wait` seconds; False if it stays open."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def wait_accepted(envd: EnvdProcess, *conns: RawConn) -> None:
    """Until envd has accepted each of `conns` (holds its end of the connection): from then on
    its event loop knows them, before any request that comes later on another connection."""
    ours = {c.sock.getsockname()[1] for c in conns}  # our ports (loopback: the peers' too)

    def accepted() -> bool:
        # envd's listener is dual-stack: its ends of IPv4 connections are IPv6 sockets.
        held = {c.raddr.port for c in psutil.Process(envd.pid).net_connections("tcp")
                if c.raddr and c.raddr.ip.removeprefix("::ffff:") == "127.0.0.1"}  # fmt: skip
        return ours <= held

    wait_until(accepted, what="envd accepting the connections")


# --- plain endpoints ------------------------------------------------------------------------


def test_health_metrics_envs(envd: EnvdProcess) -> None:
    health = httpx.get(f"{envd.url}/health")
    assert health.status_code == 200
    assert health.json() == {"version": ENVD_VERSION}
    assert health.headers["cache-control"] == "no-store"

    before = int(time.time())
    m = httpx.get(f"{envd.url}/metrics").json()
    after = time.time()
    assert m["cpu_count"] >= 1
    assert 0.0 <= m["cpu_used_pct"] <= 100.0
    assert 0 < m["mem_used"] < m["mem_total"]
    assert 0 < m["disk_used"] <= m["disk_total"]
    assert before <= m["ts"] <= after  # taken while the request was served (whole seconds)

    assert httpx.get(f"{envd.url}/envs").json() == {
        "NESTBOX_CAPSULE_ID": "",
        "NESTBOX_TEMPLATE_ID": "",
    }


def test_an_idle_envd_sleeps_and_its_date_header_stays_current(envd: EnvdProcess) -> None:
    """No periodic wake-ups (uvicorn's server ticked ten times a second; each wake-up of an
    idle guest costs its host CPU), yet every response carries the current `Date`."""
    first = parsedate_to_datetime(httpx.get(f"{envd.url}/health").headers["date"])
    later = wait_until(
        lambda: (d := parsedate_to_datetime(httpx.get(f"{envd.url}/health").headers["date"]))
        > first and d, what="a later Date header",
    )  # fmt: skip
    assert later > first
    main_thread = psutil.Process(envd.pid)
    before = main_thread.num_ctx_switches().voluntary
    time.sleep(2.0)  # idle: no request, no connection (outside a VM the port scanner is off)
    woke = main_thread.num_ctx_switches().voluntary - before
    assert woke < 10, f"envd's main thread woke {woke} times in 2 s while idle"


def test_listens_on_ipv6_loopback_too(envd: EnvdProcess) -> None:
    if not socket.has_ipv6:
        pytest.skip("this kernel has no IPv6")
    r = httpx.get(f"http://[::1]:{envd.port}/health")
    assert r.status_code == 200


def test_init_sets_env_identity_and_files(envd: EnvdProcess, tmp_path: Path) -> None:
    body = {
        "defaultUser": "root",
        "defaultWorkdir": "/tmp",
        "envVars": {"FOO": "bar"},
        "capsuleId": "cl-test1",
        "templateId": "minimal",
        "timestamp": "2026-01-01T00:00:00.123456789Z",
        "entropy": "AAECAwQFBgcICQ==",
    }
    r = httpx.post(f"{envd.url}/init", json=body)
    assert r.status_code == 204, r.text
    assert r.headers["cache-control"] == "no-store"
    assert httpx.get(f"{envd.url}/envs").json() == {
        "FOO": "bar",
        "NESTBOX_CAPSULE_ID": "cl-test1",
        "NESTBOX_TEMPLATE_ID": "minimal",
    }
    run_dir = tmp_path / f"run-{envd.port}"
    assert (run_dir / "NESTBOX_CAPSULE_ID").read_text() == "cl-test1"
    assert (run_dir / "NESTBOX_TEMPLATE_ID").read_text() == "minimal"

    # A later /init (after a restore) replaces the identity: the snapshot's must not leak.
    r = httpx.post(f"{envd.url}/init", json={"capsuleId": "cl-test2", "envVars": {"X": "1"}})
    assert r.status_code == 204
    # The files follow the answer: written right after it, or before the next request.
    assert httpx.get(f"{envd.url}/envs").json()["FOO"] == "bar"  # merged, not replaced
    assert (run_dir / "NESTBOX_CAPSULE_ID").read_text() == "cl-test2"


def test_an_empty_init_is_accepted(envd: EnvdProcess) -> None:
    assert httpx.post(f"{envd.url}/init").status_code == 204


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"defaultUser": "no-such-user-here", "envVars": {"A": "1"}}, "does not exist"),
        ({"entropy": "not base64!", "envVars": {"A": "1"}}, "base64"),
        ({"timestamp": "yesterday", "envVars": {"A": "1"}}, "RFC 3339"),
        ({"envVars": ["A"]}, "envVars"),
    ],
)
def test_a_bad_init_is_rejected_and_applies_nothing(
    envd: EnvdProcess, body: dict[str, object], message: str
) -> None:
    r = httpx.post(f"{envd.url}/init", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    assert message in r.json()["error"]["message"]
    assert "A" not in httpx.get(f"{envd.url}/envs").json()


def test_a_stale_timestamp_skips_data_updates(envd: EnvdProcess) -> None:
    def init(ts: str | None, value: str) -> None:
        body: dict[str, object] = {"envVars": {"V": value}}
        if ts is not None:
            body["timestamp"] = ts
        assert httpx.post(f"{envd.url}/init", json=body).status_code == 204

    init("2026-01-01T00:00:02Z", "newer")
    init("2026-01-01T00:00:01Z", "older")  # arrives late: ignored
    assert httpx.get(f"{envd.url}/envs").json()["V"] == "newer"
    init("2026-01-01T00:00:02Z", "same")  # not newer: ignored
    assert httpx.get(f"{envd.url}/envs").json()["V"] == "newer"
    init(None, "untimed")  # no timestamp: always applies
    assert httpx.get(f"{envd.url}/envs").json()["V"] == "untimed"


def test_access_token(envd: EnvdProcess) -> None:
    assert httpx.post(f"{envd.url}/init", json={"accessToken": "s3cret"}).status_code == 204
    good = {"X-Access-Token": "s3cret"}
    assert httpx.get(f"{envd.url}/envs").status_code == 401
    assert httpx.get(f"{envd.url}/envs", headers={"X-Access-Token": "wrong"}).status_code == 401
    assert httpx.get(f"{envd.url}/envs", headers=good).status_code == 200
    assert httpx.get(f"{envd.url}/metrics", headers=good).status_code == 200
    assert httpx.get(f"{envd.url}/health").status_code == 200  # always open
    assert httpx.post(f"{envd.url}/init", json={}).status_code == 401
    assert httpx.post(f"{envd.url}/init", json={}, headers=good).status_code == 204


# --- /snapshot/prepare and post-restore recovery ---------------------------------------------


def test_prepare_closes_idle_remembers_active_and_init_recovers(envd: EnvdProcess) -> None:
    idle = RawConn(envd)
    assert idle.request("GET", "/envs")[0] == 200  # served once, now idle in keep-alive
    active = RawConn(envd)
    active.send_head("POST", "/init", length=100)  # the body never completes: active
    active.sock.sendall(b'{"envVars": ')
    silent = RawConn(envd)  # accepted, no byte sent: NEW, remembered like an active one
    wait_accepted(envd, idle, active, silent)  # known to envd before the prepare arrives

    prep = RawConn(envd)
    status, headers = prep.request("POST", "/snapshot/prepare")
    assert status == 204
    assert headers["cache-control"] == "no-store"
    assert headers["connection"] == "close"  # its own connection ends with this response
    assert prep.closed_by_peer(5)

    assert idle.closed_by_peer(5), "the idle keep-alive connection must be closed at prepare"
    assert not active.closed_by_peer(0.5), "an active connection is only remembered"
    assert not silent.closed_by_peer(0.1)

    between = RawConn(envd)  # keep-alive is off until recovery
    status, headers = between.request("GET", "/envs")
    assert (status, headers.get("connection")) == (200, "close")
    assert between.closed_by_peer(5)

    init = RawConn(envd)
    status, headers = init.request("POST", "/init", b"{}")
    assert status == 204
    assert "connection" not in headers, "the /init connection itself is kept"
    assert active.closed_by_peer(5), "recovery closes the pre-snapshot connection"
    assert silent.closed_by_peer(5)
    assert not init.closed_by_peer(0.3)
    assert init.request("GET", "/envs")[0] == 200  # and stays usable, keep-alive on again

    fresh = RawConn(envd)
    status, headers = fresh.request("GET", "/health")
    assert (status, headers.get("connection")) == (200, None)
    for c in (idle, active, silent, prep, between, init, fresh):
        c.close()


def test_health_also_runs_recovery_once(envd: EnvdProcess) -> None:
    active = RawConn(envd)
    active.send_head("POST", "/init", length=10)
    wait_accepted(envd, active)
    assert httpx.post(f"{envd.url}/snapshot/prepare").status_code == 204
    assert not active.closed_by_peer(0.3)
    with httpx.Client() as client:
        assert client.get(f"{envd.url}/health").status_code == 200
        assert active.closed_by_peer(5)
        # Recovery done: a second active connection is not closed by the next /health.
        later = RawConn(envd)
        later.send_head("POST", "/init", length=10)
        wait_accepted(envd, later)
        r = client.get(f"{envd.url}/health")
        assert r.status_code == 200
        assert r.headers.get("connection") != "close"
        assert not later.closed_by_peer(0.5)
    active.close()
    later.close()


def start_stream(
    client: httpx.Client, envd: EnvdProcess, script: str
) -> AbstractContextManager[httpx.Response]:
    """A Connect server-streaming `process.Process/Start` of `sh -c script`, response open."""
    msg = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}).encode()
    return client.stream(
        "POST",
        f"{envd.url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(msg)) + msg,
        headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
    )


def test_a_stream_in_flight_survives_prepare_and_is_cut_by_recovery(
    envd: EnvdProcess, tmp_path: Path
) -> None:
    go = tmp_path / "go"  # the short stream's process ends once this exists: after the prepare
    finish = f"while [ ! -e {go} ]; do sleep 0.02; done; echo done"
    with (
        httpx.Client(timeout=60) as finishing,
        httpx.Client(timeout=60) as stuck,  # longer than `sleep 30`: no read timeout can cut it
        start_stream(finishing, envd, finish) as short,
        start_stream(stuck, envd, "sleep 30") as long,
    ):
        short_chunks, long_chunks = short.iter_raw(), long.iter_raw()
        assert b'"start"' in next(short_chunks)  # both responses have started
        assert b'"start"' in next(long_chunks)
        assert httpx.post(f"{envd.url}/snapshot/prepare").status_code == 204
        # An active stream is remembered, not cut: it runs to its end.
        go.touch()
        rest = b"".join(short_chunks)
        assert b'"end"' in rest
        assert b"ZG9uZQo=" in rest  # base64("done\n")

        assert httpx.post(f"{envd.url}/init", json={}).status_code == 204
        started = time.monotonic()
        with pytest.raises(httpx.TransportError) as cut:
            b"".join(long_chunks)  # the zombie is closed mid-stream ...
        assert not isinstance(cut.value, httpx.TimeoutException)  # ... by envd, not timed out
        assert time.monotonic() - started < 25  # and long before `sleep 30` would end it


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    with run_envd(tmp_path) as envd:
        idle = RawConn(envd)
        assert idle.request("GET", "/health")[0] == 200
        envd.proc.terminate()
        envd.proc.wait(10)
        assert idle.closed_by_peer(1)
        idle.close()
    log = envd.log.read_text()
    assert "Traceback" not in log, log
