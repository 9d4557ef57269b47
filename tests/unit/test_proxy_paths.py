"""Path, header and `Location` handling of the port proxy (pure functions)."""

from __future__ import annotations

import pytest

from nestbox.hostagent.proxy import (
    ProxyError,
    Route,
    host_port,
    parse_route,
    rewrite_location,
    upstream_target,
)


@pytest.mark.parametrize(
    ("raw", "rest"),
    [
        (b"/proxy/cl-a/8000", "/"),
        (b"/proxy/cl-a/8000/", "/"),
        (b"/proxy/cl-a/8000/dir", "/dir"),
        (b"/proxy/cl-a/8000/dir/", "/dir/"),  # the trailing slash survives
        (b"/proxy/cl-a/8000/a%20b//c", "/a%20b//c"),  # bytes as sent, no normalising
    ],
)
def test_upstream_path_is_concatenated(raw: bytes, rest: str) -> None:
    route = parse_route(raw, b"x=1")
    assert (route.capsule_id, route.port, route.rest, route.query) == ("cl-a", 8000, rest, "x=1")
    assert route.prefix == "/proxy/cl-a/8000"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"/proxy/cl-a/0/", 400),
        (b"/proxy/cl-a/65536/", 400),
        (b"/proxy/cl-a/8000x/", 404),
        (b"/proxy/cl-a/", 404),
        (b"/other/cl-a/80/", 404),
        (b"/proxy/../80/", 404),
        (b"/proxy/cl-a/80/x\n", 400),  # no "$ matches before a newline" trick
        (b"/proxy/cl-a\n/80/", 404),
        (b"/proxy/cl-a/49983/health", 403),  # envd is never proxied
        (b"/proxy/cl-a/49983", 403),
        (b"/proxy/cl-a/80/../../hostagent.v1.HostAgentService/ListCapsules", 400),
        (b"/proxy/cl-a/80/%2e%2e/%2e%2e/x", 400),
        (b"/proxy/cl-a/80/%252e%252e/x", 400),
        (b"/proxy/cl-a/80/a\\..\\x", 400),
        (b"/proxy/cl-a/80/..%2f..%2fx", 400),
        (b"/proxy/cl-a/80/a%00", 400),
        (b"/proxy/cl-a/80/.", 400),
    ],
)
def test_bad_paths_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_route(raw, b"")
    assert caught.value.status == status
    if status != 404:  # refused for what it names: logged with the capsule id
        assert caught.value.capsule_id == "cl-a"
        assert caught.value.refused_path == raw


def test_upstream_target_is_the_raw_path_and_query() -> None:
    route = parse_route(b"/proxy/cl-a/80/x{y}/%7e/a;b", b"q=%2e%2e&r={}")
    assert upstream_target(route) == b"/x{y}/%7e/a;b?q=%2e%2e&r={}"
    assert upstream_target(parse_route(b"/proxy/cl-a/80", b"")) == b"/"


ROUTE = Route("cl-a", 8000, "/", "")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/dir/", "/proxy/cl-a/8000/dir/"),
        ("/", "/proxy/cl-a/8000/"),
        ("http://10.201.0.5:8000/login?next=/x", "/proxy/cl-a/8000/login?next=/x"),
        ("http://10.201.0.5:8000", "/proxy/cl-a/8000/"),
        ("https://example.com/x", "https://example.com/x"),  # elsewhere: untouched
        ("//example.com/x", "//example.com/x"),
        ("relative/path", "relative/path"),
        ("http://10.201.0.5:9000/x", "http://10.201.0.5:9000/x"),  # another port
    ],
)
def test_location_rewrite(location: str, expected: str) -> None:
    assert rewrite_location(location, ROUTE, "10.201.0.5:8000") == expected


def test_location_rewrite_default_port() -> None:
    route = Route("cl-a", 80, "/", "")
    assert rewrite_location("http://10.0.0.1/x", route, "10.0.0.1:80") == "/proxy/cl-a/80/x"


def test_host_port_brackets_ipv6() -> None:
    assert host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert host_port("fd00::1", 80) == "[fd00::1]:80"
