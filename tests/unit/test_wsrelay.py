"""`common.wsrelay`'s pure parts (headers, URL, close codes, handshake refusals), and that envd
never loads it: the guest has no `websockets`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from nestbox.common.wsrelay import (
    GOING_AWAY,
    NORMAL,
    POLICY,
    UPSTREAM_ERROR,
    _client_code,
    reject_websocket,
    sendable,
    upstream_headers,
    upstream_url,
)
from nestbox.protocol.errors import ErrorCode


def test_upstream_headers_drop_handshake_hop_and_credential_headers() -> None:
    client = [
        ("Host", "proxy.example"),
        ("Connection", "Upgrade, X-Secret-Hop"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
        ("X-Secret-Hop", "named by Connection"),
        ("Keep-Alive", "5"),
        ("X-Agent-Token", "forged"),
        ("x-nestbox-proxy-token", "forged"),
        ("Authorization", "Basic dTpw"),
        ("Cookie", "a=1"),
        ("User-Agent", "client/1"),
    ]
    sent = upstream_headers(client, [("X-Nestbox-Proxy-Token", "real")])
    assert sent == [
        ("authorization", "Basic dTpw"),
        ("cookie", "a=1"),
        ("user-agent", "client/1"),
        ("X-Nestbox-Proxy-Token", "real"),  # only the caller's credential, added last
    ]


def test_upstream_url_keeps_the_target_bytes() -> None:
    target = b'/w{s}/%7e/a;b/"q"//?a={b}&c=%2e%2e'
    assert upstream_url("10.0.0.1:80", target) == "ws://10.0.0.1:80" + target.decode()
    assert upstream_url("[::1]:8000", b"/") == "ws://[::1]:8000/"


@pytest.mark.parametrize("bad", [b"", b"x", b"/a#b", b"/a b", b"/a\x00", b"/\xc3\xa9", b"/a\x7f"])
def test_upstream_url_refuses_what_it_could_not_send_unchanged(bad: bytes) -> None:
    with pytest.raises(ValueError, match="raw request target"):
        upstream_url("h:1", bad)


@pytest.mark.parametrize(
    ("code", "lost", "expected"),
    [
        (1000, GOING_AWAY, 1000),
        (1001, UPSTREAM_ERROR, 1001),
        (1008, GOING_AWAY, 1008),
        (1012, GOING_AWAY, 1012),  # uvicorn shutting down: "service restart" passes on
        (4001, GOING_AWAY, 4001),
        (3000, GOING_AWAY, 3000),
        (1005, GOING_AWAY, NORMAL),  # "no status" may not be sent: a normal close
        (1006, GOING_AWAY, GOING_AWAY),  # abnormal: the side that is left is told why
        (1006, UPSTREAM_ERROR, UPSTREAM_ERROR),
        (1015, UPSTREAM_ERROR, UPSTREAM_ERROR),
        (1004, GOING_AWAY, GOING_AWAY),
        (2000, GOING_AWAY, GOING_AWAY),
        (5000, UPSTREAM_ERROR, UPSTREAM_ERROR),
    ],
)
def test_sendable(code: int, lost: int, expected: int) -> None:
    assert sendable(code, lost=lost) == expected


def test_client_code_after_the_upstream_ended() -> None:
    # the upstream closed: its code and reason
    closed = ConnectionClosedError(Close(4001, "bye"), Close(4001, "bye"), True)
    assert _client_code(closed) == (4001, "bye")
    assert _client_code(ConnectionClosedOK(Close(1005, ""), None)) == (NORMAL, "")
    # our side failed the upstream connection (a message over the limit): upstream error
    too_big = ConnectionClosedError(Close(1009, ""), Close(1009, "over size limit"), False)
    assert _client_code(too_big) == (UPSTREAM_ERROR, "upstream error: over size limit")
    assert _client_code(ConnectionClosedError(None, Close(1002, ""), None))[0] == UPSTREAM_ERROR
    # no close frame at all
    assert _client_code(ConnectionClosedError(None, None)) == (
        UPSTREAM_ERROR,
        "upstream connection lost",
    )


async def refusal(status: int, *, extension: bool) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    extensions: dict[str, Any] = {"websocket.http.response": {}} if extension else {}
    scope = {"type": "websocket", "extensions": extensions}
    await reject_websocket(scope, send, status, ErrorCode.NOT_FOUND, "no such capsule")
    return sent


async def test_refusal_is_an_http_answer_where_the_server_can_send_one() -> None:
    start, body = await refusal(404, extension=True)
    assert start == {
        "type": "websocket.http.response.start",
        "status": 404,
        "headers": [(b"content-type", b"application/json")],
    }
    assert body["body"] == b'{"error":{"code":"not_found","message":"no such capsule"}}'


@pytest.mark.parametrize(("status", "code"), [(400, POLICY), (403, POLICY), (502, UPSTREAM_ERROR)])
async def test_refusal_is_a_close_elsewhere(status: int, code: int) -> None:
    assert await refusal(status, extension=False) == [{"type": "websocket.close", "code": code}]


GUEST = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class HostOnly:  # the guest image has no `websockets` and no `httpx`
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("websockets", "httpx"):
                raise ImportError(f"no {name} in the guest")

    sys.meta_path.insert(0, HostOnly())
    RELAYS = ("nestbox.common.wsrelay", "nestbox.common.httprelay")
    import nestbox.common, nestbox.envd
    loaded = []
    for package in (nestbox.envd, nestbox.common):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name not in RELAYS:
                importlib.import_module(info.name)
                loaded.append(info.name)
    assert "nestbox.envd.__main__" in loaded and "nestbox.envd.server" in loaded, loaded
    leaked = sorted(m for m in sys.modules
                    if m.split(".")[0] in ("websockets", "httpx") or m in RELAYS)
    assert not leaked, leaked
    for relay in RELAYS:
        try:
            importlib.import_module(relay)
        except ImportError:
            print(relay, "needs a host dependency")
    """
)


def test_envd_and_common_load_without_websockets_and_never_load_the_relay() -> None:
    """What the guest image holds (`nestbox/{protocol,common,envd}`, no `websockets`, no
    `httpx`): every envd module and every other `common` module imports; the relays are never
    among them (and do need those, so the blocker is real)."""
    done = subprocess.run(
        [sys.executable, "-c", GUEST], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [
        "nestbox.common.wsrelay needs a host dependency",
        "nestbox.common.httprelay needs a host dependency",
    ]
