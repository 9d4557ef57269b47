"""The port proxies' shared rule (`common.proxypath`) on raw bytes: what a proxied request may
name, and the rate-limited refusal log."""

from __future__ import annotations

import logging

import pytest

from nestbox.common.proxypath import (
    MAX_PATH_BYTES,
    RefusalLog,
    path_problem,
    port_refusal,
    query_problem,
    refusal,
    shown,
)
from nestbox.protocol.errors import ErrorCode

ACCEPTED = [
    b"/",
    b"/dir/",
    b"//",
    b"/a%20b//c",
    b"/file.txt",
    b"/.well-known/acme",  # a name that starts with a dot is no dot segment
    b"/a/b..c/",
    b"/..a/a..",
    b"/...",
    b"/%25",  # a literal percent sign
    b"/%2541",  # a file named "%41": decodes to "%41", then "A"
    b"/caf%C3%A9",
    b"/a;b=c/d,e",
    b"/~user/x{y}|z",
    b"/" + b"a" * (MAX_PATH_BYTES - 1),
]

REFUSED = {
    # (raw path, the words the reason must hold)
    b"": "start with /",
    b"a/b": "start with /",
    b"*": "start with /",
    b"http://evil/": "start with /",
    b"/..": ". or .. segment",
    b"/../x": ". or .. segment",
    b"/a/../../../hostagent.v1.HostAgentService/ListCapsules": ". or .. segment",
    b"/a/..": ". or .. segment",
    b"/.": ". or .. segment",
    b"/./a": ". or .. segment",
    b"/a/./b": ". or .. segment",
    b"/%2e%2e/x": ". or .. segment (percent-encoded)",
    b"/%2E%2E/x": ". or .. segment (percent-encoded)",
    b"/.%2e/x": ". or .. segment (percent-encoded)",
    b"/%2e./x": ". or .. segment (percent-encoded)",
    b"/%2e": ". or .. segment (percent-encoded)",
    b"/a/%2e/b": ". or .. segment (percent-encoded)",
    b"/%252e%252e/x": ". or .. segment (percent-encoded)",
    b"/%252E%252E/x": ". or .. segment (percent-encoded)",
    b"/%25252e%25252e/x": ". or .. segment (percent-encoded)",
    b"/%%32%65%%32%65/x": ". or .. segment (percent-encoded)",  # "%%32%65" -> "%2e" -> "."
    b"/a\\b": "backslash",
    b"/..\\..\\x": "backslash",
    b"/%5c": "backslash (percent-encoded)",
    b"/%5C..%5C": "backslash (percent-encoded)",
    b"/%255c": "backslash (percent-encoded)",
    b"/a%2fb": "encoded slash",
    b"/a%2Fb": "encoded slash",
    b"/..%2f..%2fx": "encoded slash",
    b"/%252f": "encoded slash",
    b"/%25252F": "encoded slash",
    b"/a\x00": "outside printable ASCII",
    b"/a\tb": "outside printable ASCII",
    b"/a b": "outside printable ASCII",
    b"/a\r\nX-Injected: 1": "outside printable ASCII",
    b"/a\x7f": "outside printable ASCII",
    b"/caf\xc3\xa9": "outside printable ASCII",
    b"/a%00": "control byte (percent-encoded)",
    b"/a%0a": "control byte (percent-encoded)",
    b"/a%0d%0aX-Injected:%201": "control byte (percent-encoded)",
    b"/a%7f": "control byte (percent-encoded)",
    b"/%2500": "control byte (percent-encoded)",
    b"/a#b": "#",
    b"/%2525252525252e": "too many times",
    b"/" + b"a" * MAX_PATH_BYTES: "longer than",
}


@pytest.mark.parametrize("raw", ACCEPTED)
def test_accepted_paths(raw: bytes) -> None:
    assert path_problem(raw) is None


@pytest.mark.parametrize(("raw", "reason"), REFUSED.items())
def test_refused_paths(raw: bytes, reason: str) -> None:
    problem = path_problem(raw)
    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize(
    ("query", "ok"),
    [
        (b"", True),
        (b"a=1&b=%20&c=../..&d=%2e%2e%2f", True),  # the query is the capsule app's business
        (b"a=1#frag", False),
        (b"a=\x00", False),
        (b"a=\xff", False),
        (b"a= b", False),
    ],
)
def test_queries(query: bytes, ok: bool) -> None:
    assert (query_problem(query) is None) is ok


@pytest.mark.parametrize(
    ("port", "status", "code"),
    [
        (0, 400, ErrorCode.INVALID_REQUEST),
        (65536, 400, ErrorCode.INVALID_REQUEST),
        (99999, 400, ErrorCode.INVALID_REQUEST),
        (49983, 403, ErrorCode.FORBIDDEN),  # envd: never through a proxy
    ],
)
def test_refused_ports(port: int, status: int, code: ErrorCode) -> None:
    found = port_refusal(port)
    assert found is not None
    assert (found.status, found.code) == (status, code)


@pytest.mark.parametrize("port", [1, 80, 8080, 49982, 49984, 65535])
def test_accepted_ports(port: int) -> None:
    assert port_refusal(port) is None


def test_refusal_puts_it_together() -> None:
    assert refusal(8080, b"/x/", b"a=1") is None
    assert refusal(49983, b"/health", b"") == port_refusal(49983)
    found = refusal(80, b"/%2e%2e/", b"")
    assert found is not None
    assert (found.status, found.code) == (400, ErrorCode.INVALID_REQUEST)
    found = refusal(80, b"/", b"#")
    assert found is not None
    assert found.reason == "the query holds a #"


def test_shown_escapes_and_truncates() -> None:
    assert shown(b"/a\r\n\x00\xff") == "/a\\r\\n\\x00\\\\xff"
    long = shown(b"/" + b"x" * 1000, limit=20)
    assert long.startswith("/" + "x" * 19)
    assert long.endswith("…(+981)")


def test_refusal_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = RefusalLog(logging.getLogger("t.proxy"), burst=2, window_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.proxy"):
        for i in range(5):
            refusals.refused(f"cl-{i}", "the path holds a backslash", b"/a\\b", where="path form")
        assert len(caplog.records) == 2
        assert caplog.records[0].getMessage() == (
            "proxy refused (path form): capsule cl-0: the path holds a backslash; path /a\\\\b"
        )
        assert caplog.records[0].capsule_id == "cl-0"  # type: ignore[attr-defined]
        now[0] += 10
        refusals.refused("cl-9", "reason", b"/" + b"y" * 500)
    assert len(caplog.records) == 3
    last = caplog.records[2].getMessage()
    assert "(3 earlier refusals not logged)" in last
    assert len(last) < 300  # the path is shortened
