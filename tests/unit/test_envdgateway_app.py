"""The agent's envd gateway (`hostagent/envdgateway.py`) with the network replaced: httpx's
`ASGITransport` downstream, a recording transport as envd. What the shared relay must keep for
it: the agent token only, the allow-list before any upstream call, the caller's envd token
swapped for the capsule's, our credentials and E2B's headers never reaching envd, its answers
streamed back, 502 when envd does not answer, the lease released."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from nestbox.hostagent.auth import AgentAuth
from nestbox.hostagent.envdgateway import EnvdGateway
from tests.fakes.targets import FakeTargets

AGENT, PROXY = "nba_agent-secret", "nbp_proxy-secret"
STAT = "/envd/cl-a/filesystem.Filesystem/Stat"


class Envd(httpx.AsyncBaseTransport):
    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.requests: list[tuple[httpx.Request, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.requests.append((request, await request.aread()))
        answer = httpx.ByteStream(b"{}")  # streamed, as a connection's is (not pre-read)
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=answer)


class Manager(FakeTargets):
    """What the gateway needs of `CapsuleManager`: `acquire` and each capsule's record."""

    def __init__(self) -> None:
        super().__init__({"cl-a": "10.201.0.5"})
        record = SimpleNamespace(access_token="capsule-envd-token")
        self.runtime = SimpleNamespace(get=lambda capsule_id: SimpleNamespace(record=record))


@pytest.fixture
def manager() -> Manager:
    return Manager()


async def gateway(manager: Manager, envd: Envd) -> AsyncIterator[httpx.AsyncClient]:
    auth = AgentAuth(
        sha256_hex=hashlib.sha256(AGENT.encode()).hexdigest(),
        source="test",
        proxy_sha256_hex=hashlib.sha256(PROXY.encode()).hexdigest(),
    )
    app = EnvdGateway(auth, lambda: manager, transport=lambda: envd)  # type: ignore[arg-type,return-value]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
        yield client
    await app.aclose()


async def call(manager: Manager, envd: Envd, path: str, **kw: Any) -> httpx.Response:
    async for client in gateway(manager, envd):
        return await client.post(path, **kw)
    raise AssertionError("no client")


async def test_the_capsules_envd_token_replaces_the_callers(manager: Manager) -> None:
    envd = Envd()
    headers = {
        "X-Agent-Token": AGENT,
        "X-Access-Token": "callers-token",
        "X-Nestbox-Proxy-Token": PROXY,
        "X-API-Key": "wrn_key",
        "E2b-Sandbox-Id": "cl-a",
        "E2b-Sandbox-Port": "49983",
        "Content-Type": "application/json",
        "Connect-Protocol-Version": "1",
    }
    r = await call(manager, envd, STAT, content=b'{"path": "/"}', headers=headers)
    assert (r.status_code, r.content) == (200, b"{}")
    sent, body = envd.requests[0]
    assert sent.extensions["target"] == b"/filesystem.Filesystem/Stat"
    assert sent.url.host == "10.201.0.5"
    assert sent.url.port == 49983
    assert body == b'{"path": "/"}'
    assert sent.headers.get_list("x-access-token") == ["capsule-envd-token"]
    for name in ("x-agent-token", "x-nestbox-proxy-token", "x-api-key", "e2b-sandbox-id",
                 "e2b-sandbox-port"):  # fmt: skip
        assert name not in sent.headers, name
    assert sent.headers["connect-protocol-version"] == "1"
    assert manager.tracker("cl-a").statistics().active == 0  # the lease was released


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Agent-Token": PROXY}, {"Authorization": f"Bearer {AGENT}"}, {"X-Agent-Token": "x"}],
)
async def test_only_the_agent_token_opens_it(manager: Manager, headers: dict[str, str]) -> None:
    envd = Envd()
    r = await call(manager, envd, STAT, content=b"{}", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
    assert envd.requests == []


@pytest.mark.parametrize(
    "path",
    ["/envd/cl-a/init", "/envd/cl-a/snapshot/prepare", "/envd/cl-a/filesystem.Filesystem/Stat/"],
)
async def test_routes_off_the_allow_list_never_reach_envd(manager: Manager, path: str) -> None:
    envd = Envd()
    r = await call(manager, envd, path, content=b"{}", headers={"X-Agent-Token": AGENT})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    assert envd.requests == []


async def test_envd_not_answering_is_502(manager: Manager) -> None:
    r = await call(manager, Envd(down=True), STAT, content=b"{}", headers={"X-Agent-Token": AGENT})
    assert r.status_code == 502
    assert r.json() == {
        "error": {"code": "unavailable", "message": "envd of capsule cl-a is not reachable"}
    }
    assert manager.tracker("cl-a").statistics().active == 0
