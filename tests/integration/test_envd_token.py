"""envd's access token against a real envd process (outside-VM mode), in raw HTTP (`http.client`
sends the path and headers as given: nothing normalised, nothing added).

Once `/init` has set a token, every RPC and route answers 401 without it or with a wrong one,
and does nothing; `GET /health` answers with the version only; a CORS preflight gets CORS
headers only and reaches no handler; `/init` changes the token only when it carries the
current one.
"""

from __future__ import annotations

import http.client
import json
import secrets
import struct
import time
from typing import TYPE_CHECKING

import pytest

from nestbox.protocol.envd import ENVD_VERSION
from tests.integration.envd_process import EnvdProcess, run_envd

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TOKEN = "tok-" + secrets.token_urlsafe(24)
WRONG = [None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()]
"""What a request may carry instead of the token (None: no header at all)."""

Answer = tuple[int, dict[str, str], bytes]


def call(
    envd: EnvdProcess,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    read: bool = True,
) -> Answer:
    """One request on a fresh connection: (status, lower-cased headers, body; not read unless
    `read`: a watch streams forever)."""
    conn = http.client.HTTPConnection("127.0.0.1", envd.port, timeout=10)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["X-Access-Token"] = token
        conn.request(method, path, body=body if body or method == "POST" else None, headers=sent)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read() if read else b""
    finally:
        conn.close()


def envelope(message: dict[str, object]) -> bytes:
    """One Connect streaming message (flags 0, big-endian length, JSON)."""
    data = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(data)) + data


JSON = {"Content-Type": "application/json"}
STREAM = {"Content-Type": "application/connect+json"}


def routes(tmp: Path) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """Every RPC and route envd serves, each with a body that would change something or
    reveal something if it reached its handler (`tmp` holds the files they would touch)."""
    p = str(tmp)
    process = {"process": {"pid": 1}}
    start = {"process": {"cmd": "/bin/sh", "args": ["-c", f"touch {p}/started"]}}

    def unary(service: str, method: str, msg: dict[str, object]) -> tuple[str, str, bytes, dict]:
        return ("POST", f"/{service}/{method}", json.dumps(msg).encode(), JSON)

    def stream(service: str, method: str, msg: dict[str, object]) -> tuple[str, str, bytes, dict]:
        return ("POST", f"/{service}/{method}", envelope(msg), STREAM)

    return [
        stream("process.Process", "Start", start),
        stream("process.Process", "Connect", process),
        stream("process.Process", "StreamInput", {"start": process}),
        unary("process.Process", "List", {}),
        unary("process.Process", "SendInput", {**process, "input": {"stdin": "aGkK"}}),
        unary("process.Process", "SendSignal", {**process, "signal": "SIGNAL_SIGKILL"}),
        unary("process.Process", "Update", {**process, "pty": {"size": {"cols": 1, "rows": 1}}}),
        unary("process.Process", "CloseStdin", process),
        unary("filesystem.Filesystem", "Stat", {"path": "/etc/shadow"}),
        unary("filesystem.Filesystem", "ListDir", {"path": "/root"}),
        unary("filesystem.Filesystem", "MakeDir", {"path": f"{p}/made"}),
        unary("filesystem.Filesystem", "Move", {"source": f"{p}/keep", "destination": f"{p}/x"}),
        unary("filesystem.Filesystem", "Remove", {"path": f"{p}/keep"}),
        unary("filesystem.Filesystem", "CreateWatcher", {"path": p}),
        unary("filesystem.Filesystem", "GetWatcherEvents", {"watcherId": "w"}),
        unary("filesystem.Filesystem", "RemoveWatcher", {"watcherId": "w"}),
        stream("filesystem.Filesystem", "WatchDir", {"path": p}),
        ("GET", f"/files?path={p}/keep", b"", {}),
        (
            "POST",
            f"/files?path={p}/uploaded",
            b"pwned",
            {"Content-Type": "application/octet-stream"},
        ),
        ("GET", "/envs", b"", {}),
        ("HEAD", "/envs", b"", {}),
        ("GET", "/metrics", b"", {}),
        ("GET", "/logs", b"", {}),
        ("POST", "/ports/scan", b"", {}),
        ("POST", "/snapshot/prepare", b"", {}),
        ("POST", "/init", b'{"accessToken": "evil", "envVars": {"LD_PRELOAD": "/x.so"}}', JSON),
        # Not /health, however close: no normalising, no second open path.
        ("GET", "/health/../envs", b"", {}),
        ("GET", "//health", b"", {}),
        ("GET", "/Health", b"", {}),
        ("POST", "/health", b"", {}),
        ("GET", "/no-such-route", b"", {}),
        ("OPTIONS", "/envs", b"", {}),  # not a preflight (no Origin, no requested method)
        ("OPTIONS", "/process.Process/Start", b"", {}),
    ]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnvdProcess, Path]]:
    """An envd that `/init` gave TOKEN, and a directory of files the refused calls must not
    touch."""
    tmp = tmp_path_factory.mktemp("token")
    with run_envd(tmp) as envd:
        status, _, _ = call(envd, "POST", "/init", json.dumps({"accessToken": TOKEN}).encode(),
                            headers=JSON)  # fmt: skip
        assert status == 204
        files = tmp / "files"
        files.mkdir()
        (files / "keep").write_text("secret")
        yield envd, files


def test_routes_are_refused_without_the_right_token(
    guarded: tuple[EnvdProcess, Path],
) -> None:
    envd, files = guarded
    for method, path, body, headers in routes(files):
        for token in WRONG:
            status, answer_headers, answer = call(
                envd, method, path, body, token=token, headers=headers
            )
            assert status == 401, (method, path, token, status, answer)
            if method != "HEAD":
                assert json.loads(answer)["error"]["code"] == "unauthorized"
            assert not any(h.startswith("access-control-") for h in answer_headers)
    # Nothing happened: no process, no directory, no upload, no move, no removal ...
    assert sorted(p.name for p in files.iterdir()) == ["keep"]
    assert (files / "keep").read_text() == "secret"
    status, headers, answer = call(envd, "GET", "/envs", token=TOKEN)
    assert status == 200
    assert "LD_PRELOAD" not in json.loads(answer)  # ... no /init data ...
    assert headers.get("connection") != "close"  # ... and no snapshot prepare (keep-alive off)
    status, _, answer = call(envd, "POST", "/process.Process/List", b"{}", token=TOKEN,
                             headers=JSON)  # fmt: skip
    assert (status, json.loads(answer)) == (200, {})  # no process was started


def test_routes_answer_with_the_token(tmp_path: Path) -> None:
    """The positive control: the same requests reach their handlers with the token."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "keep").write_text("secret")
    with run_envd(tmp_path) as envd:
        init = json.dumps({"accessToken": TOKEN}).encode()
        assert call(envd, "POST", "/init", init, headers=JSON)[0] == 204
        answers = {}
        for method, path, body, headers in routes(files):
            if path == "/init":
                body = b"{}"  # keep the token
            streams = headers is STREAM
            status, _, answer = call(
                envd, method, path, body, token=TOKEN, headers=headers, read=not streams
            )
            answers[method, path] = status
            assert status != 401, (method, path, answer)
        assert answers["GET", "/envs"] == 200
        assert answers["POST", "/filesystem.Filesystem/Stat"] == 200
        assert answers["POST", "/process.Process/Start"] == 200
        assert answers["POST", "/init"] == 204
        assert (files / "made").is_dir()
        assert (files / "uploaded").read_bytes() == b"pwned"
        deadline = time.monotonic() + 10
        while not (files / "started").exists():  # Start answered; the process runs after
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (files / "keep").exists()  # moved to x, then removal found nothing


def test_health_is_open_and_says_only_the_version(guarded: tuple[EnvdProcess, Path]) -> None:
    envd, _ = guarded
    for token in WRONG:
        status, headers, body = call(envd, "GET", "/health", token=token)
        assert (status, json.loads(body)) == (200, {"version": ENVD_VERSION})
        assert set(headers) <= {"content-type", "content-length", "cache-control", "date", "vary"}
    assert call(envd, "HEAD", "/health")[0] == 200


@pytest.mark.parametrize(
    "path", ["/process.Process/Start", "/filesystem.Filesystem/Stat", "/envs", "/files", "/init"]
)
def test_a_cors_preflight_gets_cors_headers_only(
    guarded: tuple[EnvdProcess, Path], path: str
) -> None:
    envd, files = guarded
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, body = call(envd, "OPTIONS", path, headers=preflight)
    assert status == 200
    assert body == b"OK"
    generic = {"content-type", "content-length", "date", "vary"}
    assert {h for h in headers if not h.startswith("access-control-")} <= generic
    assert headers["access-control-allow-methods"]
    status, _, answer = call(envd, "POST", "/process.Process/List", b"{}", token=TOKEN,
                             headers=JSON)  # fmt: skip
    assert (status, json.loads(answer)) == (200, {})  # nothing started
    assert sorted(p.name for p in files.iterdir()) == ["keep"]


def test_init_changes_the_token_only_with_the_current_one(envd: EnvdProcess) -> None:
    def init(body: dict[str, object], token: str | None) -> int:
        return call(envd, "POST", "/init", json.dumps(body).encode(), token=token,
                    headers=JSON)[0]  # fmt: skip

    def works(token: str | None) -> bool:
        return call(envd, "GET", "/envs", token=token)[0] == 200

    assert init({"accessToken": "first"}, None) == 204  # no token yet: envd is open
    assert not works(None)
    for wrong in WRONG:
        assert init({"accessToken": "second", "envVars": {"A": "1"}}, wrong) == 401
    assert works("first")
    assert not works("second")
    assert init({"accessToken": "second"}, "first") == 204
    assert works("second")
    assert not works("first")
    assert init({"accessToken": ""}, "second") == 204  # an empty token never clears it
    assert not works(None)
    assert works("second")


def test_a_stale_init_still_sets_the_token(envd: EnvdProcess) -> None:
    """A clone whose host clock went back: its /init is older than the template's last one,
    its data updates are skipped, but it must not keep the template's token."""

    def init(body: dict[str, object], token: str | None) -> int:
        return call(envd, "POST", "/init", json.dumps(body).encode(), token=token,
                    headers=JSON)[0]  # fmt: skip

    assert init({"accessToken": "template", "timestamp": "2030-01-01T00:00:00Z"}, None) == 204
    stale = {"accessToken": "clone", "timestamp": "2029-01-01T00:00:00Z", "envVars": {"S": "1"}}
    assert init(stale, "template") == 204
    assert call(envd, "GET", "/envs", token="template")[0] == 401
    status, _, body = call(envd, "GET", "/envs", token="clone")
    assert status == 200
    assert "S" not in json.loads(body)  # the data update was skipped, as before


def test_open_until_the_first_init(tmp_path: Path) -> None:
    """What the docs say: before any /init (a cold boot, reachable only from the agent) envd
    has no token to ask for."""
    with run_envd(tmp_path) as envd:
        assert call(envd, "GET", "/envs")[0] == 200
        assert call(envd, "POST", "/init", b'{"accessToken": "t"}', headers=JSON)[0] == 204
        assert call(envd, "GET", "/envs")[0] == 401
