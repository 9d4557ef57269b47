"""The Server-Sent Events routes under raw bytes (a socket, no HTTP client that would normalise
the target or the headers): `GET /v1/events/stream`, `GET /v1/admin/builds/{id}/events` and
`GET /v1/capsules/{id}/files/watch`. Each refuses a missing, empty or bad credential and another
team's key with an ordinary JSON error (never a stream), matches ids whole, validates the watch
path before the agent is asked, and lets go of its subscription when the client hangs up at any
point (before the answer, after the headers, mid-stream)."""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio.to_thread

from tests.conftest import eventually
from tests.integration.cp.cluster import cluster
from tests.integration.cp.test_cp_builds import finished, guest, quick, submit

if TYPE_CHECKING:
    from nestbox.controlplane.settings import CPSettings
    from tests.integration.cp.cluster import Cluster


def _exchange(base: str, request: bytes, *, want_body: bytes = b"", hang_up: bool = False,
              ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """Send `request` as is; read the status line and headers, then the body until it holds
    `want_body` (a stream) or ends (an ordinary answer). `hang_up`: close right after sending."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as s:
        s.sendall(request)
        if hang_up:
            return 0, {}, b""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (
            line.partition(":") for line in lines[1:])}  # fmt: skip
        streaming = headers.get("content-type", "").startswith("text/event-stream")
        while (want_body not in body) if streaming else _short(headers, body):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def _short(headers: dict[str, str], body: bytes) -> bool:
    if "content-length" in headers:
        return len(body) < int(headers["content-length"])
    return not body.endswith(b"0\r\n\r\n")  # chunked: until the last chunk


async def exchange(base: str, request: bytes, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await anyio.to_thread.run_sync(lambda: _exchange(base, request, **kw))


def get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_code(headers: dict[str, str], body: bytes) -> str:
    """The stable code of an ordinary JSON error answer (chunked or not)."""
    assert headers["content-type"].startswith("application/json"), headers
    if headers.get("transfer-encoding") == "chunked":
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    code: str = json.loads(body)["error"]["code"]
    return code


async def targets(c: Cluster, key: dict[str, str]) -> tuple[str, str, str]:
    """A capsule of `key`'s team and a finished build of that team: the three SSE targets."""
    guest(c.hosts[0].agent)
    capsule = (await c.create(key))["id"]
    build = await submit(c, key, name="sse-raw", recipe=["ENV A=1"])
    await finished(c, build["id"], key)
    return ("/v1/events/stream", f"/v1/admin/builds/{build['id']}/events",
            f"/v1/capsules/{capsule}/files/watch?path=/tmp")  # fmt: skip


async def test_credentials_are_checked_before_any_stream(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        _, key = await c.user("ann@example.com")
        _, other = await c.user("bob@example.com")
        own = f"X-API-Key: {key['X-API-Key']}"
        for target in await targets(c, key):
            # The caller itself gets a stream (the watch's and the build's first event, the
            # event stream's `connected`).
            status, headers, body = await exchange(c.url, get(target, own), want_body=b"\n\n")
            assert status == 200, (target, body)
            assert headers["content-type"].startswith("text/event-stream"), target
            assert b"data:" in body, (target, body)
            for bad in ((), ("X-API-Key: ",), ("X-API-Key: nb_" + "0" * 40,),
                        ("Authorization: Bearer x.y.z",), ("Authorization: Basic YTpi",),
                        ("X-API-Key: \t",)):  # fmt: skip
                status, headers, body = await exchange(c.url, get(target, *bad))
                assert status == 401, (target, bad, status)
                assert error_code(headers, body) == "unauthorized", (target, bad)
        # Another team's key: the build and the capsule do not exist for it.
        stranger = f"X-API-Key: {other['X-API-Key']}"
        for target in (await targets(c, key))[1:]:
            status, headers, body = await exchange(c.url, get(target, stranger))
            assert status == 404, (target, status)
            assert error_code(headers, body) == "not_found", target


async def test_ids_and_the_watch_path_are_checked_whole(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        _, key = await c.user("ann@example.com")
        _, build_events, watch = await targets(c, key)
        own = f"X-API-Key: {key['X-API-Key']}"
        build_id = build_events.split("/")[4]
        capsule_id = watch.split("/")[3]
        for target in (f"/v1/admin/builds/{build_id}%0A/events",
                       f"/v1/admin/builds/{build_id}%00/events",
                       f"/v1/admin/builds/%2E%2E%2F{build_id}/events",
                       f"/v1/admin/builds/{build_id.upper()}/events",
                       f"/v1/capsules/{capsule_id}%0A/files/watch?path=/tmp",
                       f"/v1/capsules/{capsule_id}%20/files/watch?path=/tmp",
                       f"/v1/capsules/..%2F{capsule_id}/files/watch?path=/tmp"):  # fmt: skip
            status, headers, body = await exchange(c.url, get(target, own))
            assert status == 404, (target, status, body)
            assert error_code(headers, body) == "not_found", target
        agent = c.hosts[0].agent
        watchers_before = sum(len(cap.watchers) for cap in agent.capsules.values())
        base = f"/v1/capsules/{capsule_id}/files/watch"
        # (A relative path is envd's to resolve, under the workdir or home, as E2B's.)
        for query in ("", "?path=", "?path=/tmp%00x", "?path=" + "a" * 5000,
                      "?path=/" + "a" * 5000, "?path=/tmp&recursive=maybe"):  # fmt: skip
            status, headers, body = await exchange(c.url, get(base + query, own))
            assert status == 400, (query, status, body)
            assert error_code(headers, body) == "invalid_request", query
        assert sum(len(cap.watchers) for cap in agent.capsules.values()) == watchers_before


async def test_a_client_hanging_up_releases_its_subscription(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        _, key = await c.user("ann@example.com")
        events, build_events, watch = await targets(c, key)
        own = f"X-API-Key: {key['X-API-Key']}"
        hub = c.services.events
        agent = c.hosts[0].agent

        def open_watches() -> int:
            return sum(len(cap.watchers) for cap in agent.capsules.values())

        # Hang up right after sending, and after the first event, a few times each.
        for _ in range(5):
            for target in (events, watch):
                await exchange(c.url, get(target, own), hang_up=True)
                await exchange(c.url, get(target, own), want_body=b"\n\n")
            await exchange(c.url, get(build_events, own), hang_up=True)
        await eventually(lambda: not hub._subs, what="event subscriptions released")
        await eventually(lambda: open_watches() == 0, what="watches closed at the agent")
        # A new stream still works and sees a new event.
        status, _, body = await exchange(c.url, get(events, own), want_body=b"\n\n")
        assert status == 200
        assert b'"connected"' in body
        await eventually(lambda: not hub._subs, what="the last subscription released")
