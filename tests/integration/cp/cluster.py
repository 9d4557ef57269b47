"""A control plane with fake host agents, for the capsule, host and scheduling tests.

The control plane runs in-process (its lifespan in a task of its own, `harness.running`) and
is served by uvicorn on a loopback port, so WebSockets and the port proxy work over real
HTTP; each host is a `FakeAgent` on its own loopback port that registered through the real
`/v1/hosts` flow. Heartbeats are sent by the test (`Cluster.heartbeat`), never by a timer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from nestbox.controlplane.app import create_app
from nestbox.controlplane.portproxy import PortProxy
from nestbox.controlplane.services.bootstrap import bootstrap_admin
from nestbox.controlplane.services.container import Services
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.hosts import HOST_TOKEN_HEADER
from tests.conftest import free_port
from tests.fakes.agent import FakeAgent, FakeAgentApp, serve_fake_agent
from tests.integration.asgi_server import serve
from tests.integration.cp.harness import Account, new_key, running, signup

LOAD = {
    "capsules_running": 0, "cpu_cores": 8, "cpu_used_pct": 5.0, "load_1m": 0.1,
    "memory_total_mb": 32768, "memory_available_mb": 30000, "disk_total_gb": 500.0,
    "disk_free_gb": 400.0,
}  # fmt: skip


@dataclass
class Host:
    agent: FakeAgent
    app: FakeAgentApp
    host_id: str
    host_token: str
    refresh_token: str


@dataclass
class Cluster:
    services: Services
    client: httpx.AsyncClient
    url: str
    admin: dict[str, str]
    hosts: list[Host] = field(default_factory=list)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    async def add_host(self, name: str, *, beat: bool = True, **load: Any) -> Host:
        agent, app = await self.stack.enter_async_context(serve_fake_agent(name))
        r = await self.client.post("/v1/hosts", json={}, headers=self.admin)
        assert r.status_code == 201, r.text
        token = r.json()["registration_token"]
        r = await self.client.post("/v1/hosts/register", json={
            "token": token, "address": agent.address, "arch": "x86_64", "cpu_cores": 8,
            "memory_mb": 32768, "disk_gb": 500})  # fmt: skip
        assert r.status_code == 200, r.text
        doc = r.json()
        agent.token = doc["agent_token"]
        agent.proxy_token = doc["proxy_token"]
        host = Host(agent, app, doc["host"]["id"], doc["token"], doc["refresh_token"])
        self.hosts.append(host)
        if beat:
            await self.heartbeat(host, **load)
        return host

    async def heartbeat(self, host: Host, **load: Any) -> httpx.Response:
        """A heartbeat with `LOAD`'s figures and the fake agent's true capsule counts."""
        states = [c.state for c in host.agent.capsules.values()]
        counts = {"capsules_running": states.count(pb.CapsuleState.RUNNING),
                  "capsules_paused": states.count(pb.CapsuleState.PAUSED)}  # fmt: skip
        r = await self.client.post(f"/v1/hosts/{host.host_id}/heartbeat",
                                   json={**LOAD, **counts, **load},
                                   headers={HOST_TOKEN_HEADER: host.host_token})  # fmt: skip
        assert r.status_code == 200, r.text
        return r

    async def user(self, email: str) -> tuple[Account, dict[str, str]]:
        """A new user (own team) and an API key of theirs."""
        account = await signup(self.client, email)
        return account, await new_key(self.client, account)

    async def create(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        r = await self.client.post("/v1/capsules", json=body, headers=headers)
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def host_of(self, capsule_id: str) -> Host:
        return next(h for h in self.hosts if capsule_id in h.agent.capsules)


@contextlib.asynccontextmanager
async def cluster(settings: CPSettings, hosts: int = 1) -> AsyncIterator[Cluster]:
    app = create_app(settings)
    async with running(app) as cp:
        port = free_port()
        async with serve(app, port):
            boot = await bootstrap_admin(cp.services.db, settings.data_dir, "admin@test.io")
            assert boot is not None
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as client:
                c = Cluster(cp.services, client, url, {"X-API-Key": boot.api_key})
                async with c.stack:
                    for i in range(hosts):
                        await c.add_host(f"h{i}")
                    try:
                        yield c
                    finally:
                        await _close_proxy(app)


async def _close_proxy(app: object) -> None:
    """Close the port proxy's pool (the app's lifespan, which would, is not served here)."""
    layer = getattr(app, "middleware_stack", None)
    while layer is not None and not isinstance(layer, PortProxy):
        layer = getattr(layer, "app", None)
    if isinstance(layer, PortProxy):
        await layer.aclose()
