"""The port proxy's ASGI app with the network replaced: httpx's `ASGITransport` downstream,
`MockTransport` as the capsule, a recording fake sleep for the dial backoff."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest

from nestbox.hostagent.proxy import PortProxy, ProxySettings
from tests.conftest import eventually
from tests.fakes.targets import FakeTargets

Answer = tuple[int, dict[str, str], bytes]
Handler = Callable[[httpx.Request], Answer]
Build = Callable[["Upstream"], tuple[PortProxy, httpx.AsyncClient]]


class Body(httpx.AsyncByteStream):
    """A response body that is streamed, as a real connection's is (not pre-read)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


class Upstream:
    """The capsule: records requests, answers with `handler`, refuses `refusals` connects."""

    def __init__(self, handler: Handler, refusals: int = 0) -> None:
        self.handler = handler
        self.refusals = refusals
        self.requests: list[httpx.Request] = []
        self.transports = 0

    def transport(self) -> httpx.AsyncBaseTransport:
        self.transports += 1
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        if self.refusals > 0:
            self.refusals -= 1
            raise httpx.ConnectError("connection refused", request=request)
        request.read()
        self.requests.append(request)
        status, headers, body = self.handler(request)
        return httpx.Response(status, headers=headers, stream=Body(body))


@pytest.fixture
def targets() -> FakeTargets:
    return FakeTargets({"cl-a": "10.201.0.5"})


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(proxy: PortProxy) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy, client=("192.0.2.7", 1234)),
        base_url="http://agent",
    )


@pytest.fixture
async def setup(targets: FakeTargets, sleeps: list[float]) -> AsyncIterator[Build]:
    made: list[tuple[PortProxy, httpx.AsyncClient]] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    def build(upstream: Upstream) -> tuple[PortProxy, httpx.AsyncClient]:
        proxy = PortProxy(targets, transport=upstream.transport, sleep=fake_sleep)
        pair = (proxy, make_client(proxy))
        made.append(pair)
        return pair

    yield build
    for proxy, client in made:
        await client.aclose()
        await proxy.aclose()


async def test_request_is_forwarded_with_path_query_and_headers(setup: Build) -> None:
    upstream = Upstream(lambda r: (201, {"X-Up": "1"}, b"made"))
    _, client = setup(upstream)
    response = await client.post(
        "/proxy/cl-a/8000/api/items/?page=2",
        content=b"payload",
        headers={
            "X-Agent-Token": "secret",
            "Authorization": "Bearer user",
            "X-Forwarded-For": "1.2.3.4",
        },
    )
    assert (response.status_code, response.content) == (201, b"made")
    assert response.headers["x-up"] == "1"
    sent = upstream.requests[0]
    assert str(sent.url) == "http://10.201.0.5:8000/api/items/?page=2"
    assert sent.headers["host"] == "10.201.0.5:8000"
    assert sent.content == b"payload"
    assert "x-agent-token" not in sent.headers  # the CP's credential never reaches a capsule
    assert sent.headers["authorization"] == "Bearer user"  # the user's does
    assert sent.headers["x-forwarded-for"] == "1.2.3.4, 192.0.2.7"
    # nothing else is added or dropped: the proxy sets no Accept-Encoding or User-Agent of its own
    dropped = ("x-agent-token", "host", "connection")
    downstream = {k for k in response.request.headers if k not in dropped}
    assert set(sent.headers) == downstream | {"host"}


async def test_bytes_pass_through_undecoded(setup: Build) -> None:
    import gzip

    packed = gzip.compress(b"hello " * 100)
    upstream = Upstream(lambda r: (200, {"Content-Encoding": "gzip"}, packed))
    _, client = setup(upstream)
    async with client.stream("GET", "/proxy/cl-a/8000/") as response:
        raw = b"".join([c async for c in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert raw == packed


async def test_location_is_rewritten(setup: Build) -> None:
    upstream = Upstream(lambda r: (301, {"Location": "/dir/"}, b""))
    _, client = setup(upstream)
    response = await client.get("/proxy/cl-a/8000/dir")
    assert response.headers["location"] == "/proxy/cl-a/8000/dir/"


async def test_unknown_capsule_is_404(setup: Build) -> None:
    _, client = setup(Upstream(lambda r: (200, {}, b"")))
    response = await client.get("/proxy/cl-nope/8000/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_paused_or_draining_capsule_is_503(setup: Build, targets: FakeTargets) -> None:
    _, client = setup(Upstream(lambda r: (200, {}, b"")))
    await targets.tracker("cl-a").drain(timeout_s=0)
    response = await client.get("/proxy/cl-a/8000/")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    targets.tracker("cl-a").reset()
    targets.paused.add("cl-a")
    assert (await client.get("/proxy/cl-a/8000/")).status_code == 503
    targets.paused.clear()
    assert (await client.get("/proxy/cl-a/8000/")).status_code == 200
    assert targets.tracker("cl-a").statistics().active == 0  # every lease was released


async def test_dial_retry_backs_off_linearly(setup: Build, sleeps: list[float]) -> None:
    upstream = Upstream(lambda r: (200, {}, b"late"), refusals=2)
    _, client = setup(upstream)
    response = await client.get("/proxy/cl-a/8000/")
    assert response.content == b"late"
    assert sleeps == [0.1, 0.2]


async def test_nothing_listening_is_502_after_three_attempts(
    setup: Build, sleeps: list[float]
) -> None:
    upstream = Upstream(lambda r: (200, {}, b""), refusals=99)
    _, client = setup(upstream)
    response = await client.get("/proxy/cl-a/8000/")
    assert response.status_code == 502
    assert response.json() == {
        "error": {
            "code": "unavailable",
            "message": "proxy error: nothing listens on port 8000 in capsule cl-a",
        }
    }
    assert sleeps == [0.1, 0.2]  # no sleep after the last attempt
    assert upstream.refusals == 96


async def test_a_refused_dial_asks_the_capsule_to_rescan_before_the_next(
    targets: FakeTargets,
) -> None:
    """An idle envd does not poll for new loopback listeners: after a refused dial the proxy
    has it scan (the forwarder then listens) and dials again; a capsule is rescanned at most
    once a second (refused dials meanwhile only back off); a failing rescan changes nothing
    but the log."""
    events: list[str] = []
    now = [100.0]
    upstream = Upstream(lambda r: (200, {}, b"found"), refusals=1)

    async def rescan(capsule_id: str) -> None:
        events.append(f"rescan {capsule_id}")
        if upstream.refusals == 0 and len(events) > 2:
            raise RuntimeError("envd did not answer")

    async def fake_sleep(seconds: float) -> None:
        events.append(f"sleep {seconds}")
        now[0] += seconds

    proxy = PortProxy(
        targets, transport=upstream.transport, sleep=fake_sleep, rescan=rescan,
        clock=lambda: now[0],
    )  # fmt: skip
    async with make_client(proxy) as client:
        response = await client.get("/proxy/cl-a/8000/")
        assert (response.status_code, response.content) == (200, b"found")
        assert events == ["rescan cl-a", "sleep 0.1"]
        upstream.refusals = 3
        events.clear()
        response = await client.get("/proxy/cl-a/8000/")
        assert response.status_code == 502
        assert events == ["sleep 0.1", "sleep 0.2"]  # 0.1 s after the last rescan: none
        now[0] += 1.0
        upstream.refusals = 3
        events.clear()
        response = await client.get("/proxy/cl-a/8000/")
        assert response.status_code == 502
        assert events == ["rescan cl-a", "sleep 0.1", "sleep 0.2"]
    await proxy.aclose()


async def test_concurrent_refused_dials_share_one_rescan(targets: FakeTargets) -> None:
    upstream = Upstream(lambda r: (200, {}, b"found"), refusals=2)
    calls: list[str] = []
    release = anyio.Event()

    async def rescan(capsule_id: str) -> None:
        calls.append(capsule_id)
        await release.wait()

    async def no_sleep(seconds: float) -> None:
        pass

    proxy = PortProxy(targets, transport=upstream.transport, sleep=no_sleep, rescan=rescan)
    answers: list[int] = []
    async with make_client(proxy) as client:

        async def get() -> None:
            answers.append((await client.get("/proxy/cl-a/8000/")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            tg.start_soon(get)
            await eventually(lambda: upstream.refusals == 0, what="both dials refused")
            release.set()
    assert (calls, answers) == (["cl-a"], [200, 200])
    await proxy.aclose()


async def test_targets_are_cached_per_address_and_evicted(
    setup: Build, targets: FakeTargets
) -> None:
    upstream = Upstream(lambda r: (200, {}, b""))
    proxy, client = setup(upstream)
    await client.get("/proxy/cl-a/8000/")
    await client.get("/proxy/cl-a/8000/x")
    await client.get("/proxy/cl-a/9000/")
    assert proxy.statistics().cached_targets == 2
    assert upstream.transports == 2
    targets.addresses["cl-a"] = "10.201.0.9"  # resumed elsewhere: the old one is dropped
    await client.get("/proxy/cl-a/8000/")
    assert str(upstream.requests[-1].url) == "http://10.201.0.9:8000/"
    assert proxy.statistics().cached_targets == 2
    await proxy.evict("cl-a")
    assert proxy.statistics().cached_targets == 0


async def test_bad_port_is_400(setup: Build) -> None:
    _, client = setup(Upstream(lambda r: (200, {}, b"")))
    response = await client.get("/proxy/cl-a/70000/")
    assert response.status_code == 400
    assert json.loads(response.content)["error"]["code"] == "invalid_request"


async def test_target_cache_is_bounded_lru(targets: FakeTargets) -> None:
    upstream = Upstream(lambda r: (200, {}, b""))
    closed: list[int] = []

    class Closing(httpx.MockTransport):
        def __init__(self, number: int) -> None:
            super().__init__(upstream._handle)
            self.number = number

        async def aclose(self) -> None:
            closed.append(self.number)

    def transport() -> httpx.AsyncBaseTransport:
        upstream.transports += 1
        return Closing(upstream.transports)

    proxy = PortProxy(targets, ProxySettings(max_cached_targets=2), transport=transport)
    async with make_client(proxy) as client:
        for port in (8001, 8002, 8001, 8003):  # 8002 is then the least recently used
            assert (await client.get(f"/proxy/cl-a/{port}/")).status_code == 200
        assert proxy.statistics().cached_targets == 2
        assert (upstream.transports, closed) == (3, [2])  # 8002's pool pushed out and closed
        await client.get("/proxy/cl-a/8001/")  # still cached
        assert upstream.transports == 3
        await client.get("/proxy/cl-a/8002/")  # a new pool; 8003's is now the oldest
        assert (upstream.transports, closed) == (4, [2, 3])
        assert proxy.statistics().cached_targets == 2
    await proxy.aclose()


async def test_refusals_never_reach_the_capsule_and_are_logged(
    setup: Build, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = Upstream(lambda r: (200, {}, b""))
    _, client = setup(upstream)
    with caplog.at_level(logging.WARNING, logger="nestbox.hostagent.proxy"):
        r = await client.get("/proxy/cl-a/80/%2e%2e/hostagent.v1.HostAgentService/Ping")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
        r = await client.get("/proxy/cl-a/49983/health")
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    assert upstream.requests == []
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 2
    assert "capsule cl-a: the path holds a . or .. segment (percent-encoded)" in lines[0]
    assert "capsule cl-a: port 49983 (envd) is not proxied" in lines[1]
