"""The public port proxy (fake agents; SQLite): both URL forms reach the owning agent's
`/proxy/{id}/{port}/...` with its token and without the caller's API key; paths are
concatenated; `Location` is put back in the subdomain form's terms; WebSockets pass."""

from __future__ import annotations

import http.client
import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import update
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nestbox.controlplane.db.models import HostRow
from nestbox.controlplane.portproxy import ProxyRoute, strip_location
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import Cluster, cluster


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> CPSettings:
    return CPSettings(data_dir=tmp_path / "nb", database_url=f"sqlite:///{tmp_path / 'cp.db'}")


async def test_both_forms(sqlite_settings: CPSettings) -> None:
    async with cluster(sqlite_settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        app = c.hosts[0].app

        host = {"Host": f"8000-{cid}.localhost:9725", **key, "Authorization": "Basic dTpw"}
        r = await c.client.get("/dir/?a=1", headers=host)
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["path"] == f"/proxy/{cid}/8000/dir/"  # the trailing slash survives
        assert seen["query"] == "a=1"
        assert "x-api-key" not in seen["headers"]  # the caller's key never reaches a capsule
        assert seen["headers"]["authorization"] == "Basic dTpw"  # the app's own auth does
        assert seen["headers"]["x-nestbox-proxy-token"] == c.hosts[0].agent.proxy_token
        assert "x-agent-token" not in seen["headers"]  # the RPC credential is never used here

        r = await c.client.post(f"/proxy/{cid}/8000", content=b"body!")
        assert r.json()["path"] == f"/proxy/{cid}/8000/"
        assert r.json()["body"] == "body!"

        r = await c.client.get("/redirect", headers={"Host": f"8000-{cid}.localhost:9725"})
        assert r.status_code == 302
        assert r.headers["location"] == "/landed/"
        r = await c.client.get(f"/proxy/{cid}/8000/redirect")
        assert r.headers["location"] == f"/proxy/{cid}/8000/landed/"
        assert len(app.proxied) == 4

        r = await c.client.get("/", headers={"Host": "8000-cl-nothere.localhost"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        r = await c.client.get(f"/proxy/{cid}/70000/")
        assert r.status_code == 400
        await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)
        other = (await c.create(key))["id"]
        await c.client.post(f"/v1/capsules/{other}/pause", headers=key)
        r = await c.client.get(f"/proxy/{other}/80/")
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "invalid_state"


async def test_websocket_passes_through(sqlite_settings: CPSettings) -> None:
    async with cluster(sqlite_settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        async with connect(f"{c.ws_url}/proxy/{cid}/8888/api/ws") as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo:hi"
        port = int(c.url.rsplit(":", 1)[1])
        # the subdomain form: the Host header names the capsule (no DNS needed)
        async with connect(f"ws://8888-{cid}.example.test:{port}/ws", host="127.0.0.1",
                           port=port) as ws:  # fmt: skip
            await ws.send(json.dumps({"a": 1}))
            assert await ws.recv() == 'echo:{"a": 1}'
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{c.ws_url}/proxy/cl-nope/80/"):
                pass
        assert refused.value.response.status_code == 404


async def test_unreachable_agent_is_502_and_evicted(sqlite_settings: CPSettings) -> None:
    async with cluster(sqlite_settings) as c:
        _, key = await c.user("ann@example.com")
        cached, fresh = (await c.create(key))["id"], (await c.create(key))["id"]
        assert (await c.client.get(f"/proxy/{cached}/80/")).status_code == 200
        real = c.hosts[0].agent.address
        await _set_address(c, "127.0.0.1:9")  # nothing listens on the discard port
        # a cached target keeps its address for a while ...
        assert (await c.client.get(f"/proxy/{cached}/80/")).status_code == 200
        # ... a fresh lookup gets the new one, fails, and is forgotten
        r = await c.client.get(f"/proxy/{fresh}/80/")
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "agent_error"
        await _set_address(c, real)
        assert (await c.client.get(f"/proxy/{fresh}/80/")).status_code == 200


async def _set_address(c: Cluster, address: str) -> None:
    async with c.services.db.transaction() as tx:
        await tx.session.execute(update(HostRow).values(address=address))


def test_strip_location() -> None:
    route = ProxyRoute("cl-a", 8000, "/", subdomain=True)
    assert strip_location("/proxy/cl-a/8000/x/", route) == "/x/"
    assert strip_location("/proxy/cl-a/8000", route) == "/"
    assert strip_location("/proxy/cl-a/8000?q=1", route) == "/?q=1"
    assert strip_location("/proxy/cl-a/80001/x", route) == "/proxy/cl-a/80001/x"
    assert strip_location("https://elsewhere/", route) == "https://elsewhere/"


def raw_request(
    url: str, target: bytes, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, Any]]:
    """Send `target` exactly as given (http.client: no normalising); (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, target.decode("latin-1"), skip_host="Host" in (headers or {}),
                        skip_accept_encoding=True)  # fmt: skip
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


TRAVERSALS = [
    b"/../../../hostagent.v1.HostAgentService/ListCapsules",
    b"/%2e%2e/%2e%2e/%2e%2e/hostagent.v1.HostAgentService/ListCapsules",
    b"/%2E%2E/%2E%2E/hostagent.v1.HostAgentService/ListCapsules",
    b"/%252e%252e/%252e%252e/hostagent.v1.HostAgentService/ListCapsules",
    b"/..\\..\\..\\hostagent.v1.HostAgentService/ListCapsules",
    b"/%5c..%5c..%5chostagent.v1.HostAgentService/ListCapsules",
    b"/..%2f..%2f..%2fhostagent.v1.HostAgentService/ListCapsules",
    b"/..%252f..%252fhostagent.v1.HostAgentService/ListCapsules",
    b"/a/./b",
    b"/a%00",
]


async def test_traversal_envd_and_forged_headers_are_refused(
    sqlite_settings: CPSettings, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(sqlite_settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        app = c.hosts[0].app
        host = {"Host": f"80-{cid}.localhost:9725"}
        refused: list[tuple[bytes, dict[str, str], int, str]] = []
        for rest in TRAVERSALS:
            refused.append((b"/proxy/%s/80%s" % (cid.encode(), rest), {}, 400, "invalid_request"))
            refused.append((b"/a" + rest, host, 400, "invalid_request"))
        for envd in (b"/health", b"/filesystem.Filesystem/Stat", b"/process.Process/Start",
                     b"/init"):  # fmt: skip
            refused.append((b"/proxy/%s/49983%s" % (cid.encode(), envd), {}, 403, "forbidden"))
            refused.append((envd, {"Host": f"49983-{cid}.localhost:9725"}, 403, "forbidden"))
        for forged in ({"X-Agent-Token": c.hosts[0].agent.token},
                       {"X-Nestbox-Proxy-Token": c.hosts[0].agent.proxy_token}):  # fmt: skip
            refused.append((b"/proxy/%s/80/" % cid.encode(), forged, 400, "invalid_request"))
            refused.append((b"/", {**host, **forged}, 400, "invalid_request"))
        refused.append((b"/proxy/%s/0/" % cid.encode(), {}, 400, "invalid_request"))
        refused.append((b"/proxy/%s/65536/" % cid.encode(), {}, 400, "invalid_request"))

        with caplog.at_level(logging.WARNING, logger="nestbox.controlplane.portproxy"):
            for target, headers, status, code in refused:
                got = await anyio.to_thread.run_sync(raw_request, c.url, target, headers)
                assert got[0] == status, (target, headers, got)
                assert got[1]["error"]["code"] == code, (target, got)
        assert app.proxied == []  # nothing reached the agent
        lines = [r.getMessage() for r in caplog.records if "proxy refused" in r.getMessage()]
        assert len(lines) == len(refused)  # one line each
        assert all(f"capsule {cid}:" in line for line in lines)

        # malformed ids are nobody's capsule: 404, and not sent anywhere either
        for target in (b"/proxy/cl-short/80/", b"/proxy/%s%%0a/80/" % cid.encode(),
                       b"/proxy/%s/8o/" % cid.encode()):  # fmt: skip
            status, doc = await anyio.to_thread.run_sync(raw_request, c.url, target)
            assert (status, doc["error"]["code"]) == (404, "not_found"), target
        assert app.proxied == []


async def test_the_agent_gets_the_exact_bytes(sqlite_settings: CPSettings) -> None:
    async with cluster(sqlite_settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        app = c.hosts[0].app
        rest = b'/x{y}/%7e/a;b/"q"//'
        status, seen = await anyio.to_thread.run_sync(
            raw_request, c.url, b"/proxy/%s/8080%s?q=%%2e%%2e/../&r={}" % (cid.encode(), rest)
        )
        assert status == 200
        assert seen["path"] == f"/proxy/{cid}/8080" + rest.decode()
        assert seen["query"] == "q=%2e%2e/../&r={}"
        status, seen = await anyio.to_thread.run_sync(
            raw_request, c.url, rest + b"?z=1", {"Host": f"8080-{cid}.localhost:9725"}
        )
        assert status == 200
        assert seen["path"] == f"/proxy/{cid}/8080" + rest.decode()
        assert len(app.proxied) == 2
        async with connect(f"{c.ws_url}/proxy/{cid}/8080/w{{s}}/?a={{b}}") as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo:hi"
        assert app.ws_targets == [f"/proxy/{cid}/8080/w{{s}}/?a={{b}}".encode()]
