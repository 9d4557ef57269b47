"""The public port proxy (fake agents; SQLite): both URL forms reach the owning agent's
`/proxy/{id}/{port}/...` with its token and without the caller's API key; paths are
concatenated; `Location` is put back in the subdomain form's terms; WebSockets pass."""

from __future__ import annotations

import json
from pathlib import Path

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
        assert seen["headers"]["x-agent-token"] == c.hosts[0].agent.token

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
