"""Notification channels against a real webhook receiver on 127.0.0.1 (fake agents): signed
deliveries whose signature verifies with the secret shown once; rotation; Slack and Discord
bodies; the test route; URLs refused by address; and the outbox's retries: a receiver that
fails twice then succeeds gets each event once, in order, across a control-plane restart."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nestbox.controlplane.app import create_app
from nestbox.controlplane.services.channels import UrlPolicy
from nestbox.controlplane.settings import CPSettings
from tests.conftest import eventually, free_port
from tests.integration.asgi_server import serve
from tests.integration.cp.cluster import cluster
from tests.integration.cp.harness import running


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    answers: list[int] = field(default_factory=list)
    """Statuses to answer, in order; 200 once they run out."""
    got: list[Received] = field(default_factory=list)

    def ok(self) -> list[Received]:
        return [r for r in self.got if r.answered == 200]


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}/hook")

    async def hook(request: Request) -> Response:
        status = rec.answers.pop(0) if rec.answers else 200
        rec.got.append(Received(dict(request.headers), await request.body(), status))
        return Response(status_code=status)

    async with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), port):
        yield rec


def verifies(secret: str, r: Received) -> bool:
    stamp = r.headers["x-wrenn-timestamp"]
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + r.body, hashlib.sha256)
    return hmac.compare_digest(r.headers["x-wrenn-signature"], "sha256=" + expected.hexdigest())


def allow(settings: CPSettings, **more: object) -> CPSettings:
    return settings.model_copy(update={"channels_allow_private": True,
                                       "reconcile_interval_s": 3600, **more})  # fmt: skip


async def test_signed_webhook_deliveries(settings: CPSettings) -> None:
    async with cluster(allow(settings)) as c, receiver() as rec:
        ann, key = await c.user("ann@example.com")
        r = await c.client.post("/v1/channels", headers=key, json={
            "name": "My Hook", "provider": "webhook", "config": {"url": rec.url},
            "events": ["capsule.create", "capsule.destroy"]})  # fmt: skip
        assert r.status_code == 201, r.text
        channel = r.json()
        secret, cid_ = channel["secret"], channel["id"]
        assert len(secret) == 64
        assert channel["name"] == "my-hook"
        assert channel["events"] == ["capsule.create", "capsule.destroy"]
        shown = (await c.client.get(f"/v1/channels/{cid_}", headers=key)).json()
        assert shown.get("secret") is None  # shown once
        listed = (await c.client.get("/v1/channels", headers=key)).json()
        assert [x["id"] for x in listed] == [cid_]
        assert secret not in str(listed)
        async with c.services.db.transaction() as tx:  # sealed at rest
            row = await tx.channels.get(ann.team_id, cid_)
        assert row is not None
        assert secret not in row.config_enc
        assert rec.url not in row.config_enc

        capsule = (await c.create(key))["id"]
        await c.client.post(f"/v1/capsules/{capsule}/pause", headers=key)  # not subscribed
        [got] = await eventually(lambda: rec.ok())
        assert verifies(secret, got)
        assert got.json["event"] == "capsule.create"
        assert got.json["resource"]["id"] == capsule
        assert got.json["team_id"] == ann.team_id
        assert got.headers["content-type"] == "application/json"

        async def settled() -> list[dict[str, Any]] | None:
            # The receiver has the request before the sender has recorded its answer.
            r = await c.client.get(f"/v1/channels/{cid_}/deliveries", headers=key)
            found: list[dict[str, Any]] = r.json()
            return found if found and all(d["status"] != "pending" for d in found) else None

        deliveries = await eventually(settled, what="the delivery's answer recorded")
        assert [(d["event"], d["status"], d["attempts"], d["response_status"])
                for d in deliveries] == [("capsule.create", "delivered", 1, 200)]  # fmt: skip
        assert deliveries[0]["id"] == got.headers["x-wrenn-delivery"]

        r = await c.client.put(f"/v1/channels/{cid_}/config", headers=key,
                               json={"config": {"url": rec.url}})  # fmt: skip
        assert r.status_code == 200, r.text
        new_secret = r.json()["secret"]
        assert new_secret
        assert new_secret != secret
        assert (await c.client.delete(f"/v1/capsules/{capsule}", headers=key)).status_code == 204
        await eventually(lambda: len(rec.ok()) == 2)
        last = rec.ok()[-1]
        assert last.json["event"] == "capsule.destroy"
        assert verifies(new_secret, last)
        assert not verifies(secret, last)

        r = await c.client.patch(f"/v1/channels/{cid_}", headers=key,
                                 json={"events": ["host.down"]})  # fmt: skip
        assert r.json()["events"] == ["host.down"]
        assert (await c.client.delete(f"/v1/channels/{cid_}", headers=key)).status_code == 204
        assert (await c.client.get(f"/v1/channels/{cid_}", headers=key)).status_code == 404


async def test_slack_discord_and_the_test_route(settings: CPSettings) -> None:
    async with cluster(allow(settings)) as c, receiver() as rec:
        _, key = await c.user("ann@example.com")
        for provider in ("slack", "discord"):
            r = await c.client.post("/v1/channels", headers=key, json={
                "name": provider, "provider": provider, "config": {"webhook_url": rec.url},
                "events": ["capsule.create"]})  # fmt: skip
            assert r.status_code == 201, r.text
            assert r.json().get("secret") is None
        capsule = (await c.create(key))["id"]
        await eventually(lambda: len(rec.ok()) == 2)
        bodies = sorted((r.json for r in rec.ok()), key=lambda b: sorted(b))
        assert sorted(bodies[0]) == ["content"]
        assert sorted(bodies[1]) == ["text"]
        assert all(capsule in next(iter(b.values())) for b in bodies)

        r = await c.client.post("/v1/channels/test", headers=key, json={
            "provider": "webhook", "config": {"url": rec.url, "secret": "s3cret"}})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ok"}
        assert rec.got[-1].json["event"] == "channel.test"
        assert verifies("s3cret", rec.got[-1])
        rec.answers.append(503)
        r = await c.client.post("/v1/channels/test", headers=key, json={
            "provider": "webhook", "config": {"url": rec.url}})  # fmt: skip
        assert r.status_code == 400
        assert "503" in r.json()["error"]["message"]


async def test_refused_urls(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")

        async def make(url: str, provider: str = "webhook") -> int:
            field_ = "url" if provider == "webhook" else "webhook_url"
            r = await c.client.post("/v1/channels", headers=key, json={
                "name": "x", "provider": provider, "config": {field_: url},
                "events": ["capsule.create"]})  # fmt: skip
            if r.status_code != 201:
                assert r.json()["error"]["code"] == "invalid_request", r.text
            return r.status_code

        for url in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://[::1]/x",
                    "http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]/x",
                    "http://localhost:9/x", "ftp://192.0.2.1/x", "http://user:pw@8.8.8.8/",
                    "http://0.0.0.0/"):  # fmt: skip
            assert await make(url) == 400, url
        assert await make("http://127.0.0.1:9/x", "slack") == 400
        r = await c.client.post("/v1/channels", headers=key, json={
            "name": "x", "provider": "webhook", "config": {"url": "http://8.8.8.8/", "x": "1"},
            "events": ["capsule.create"]})  # fmt: skip
        assert r.status_code == 400  # unknown config field
        r = await c.client.post("/v1/channels", headers=key, json={
            "name": "x", "provider": "webhook", "config": {"url": "http://8.8.8.8/"},
            "events": ["capsule.state.changed"]})  # fmt: skip
        assert r.status_code == 400  # not subscribable
        # With private addresses allowed, link-local, multicast and unspecified still are not.
        c.services.channels.policy = UrlPolicy(allow_private=True)
        for url in ("http://169.254.169.254/latest", "http://224.0.0.1/", "http://0.0.0.0/"):
            r = await c.client.post("/v1/channels", headers=key, json={
                "name": "x", "provider": "webhook", "config": {"url": url},
                "events": ["capsule.create"]})  # fmt: skip
            assert r.status_code == 400, url


async def test_retries_in_order_across_a_restart(settings: CPSettings) -> None:
    fast = allow(settings, channel_retry_base_s=0.3)
    async with receiver() as rec:
        rec.answers = [500, 500]
        async with cluster(fast) as c:
            _, key = await c.user("ann@example.com")
            r = await c.client.post("/v1/channels", headers=key, json={
                "name": "hook", "provider": "webhook", "config": {"url": rec.url},
                "events": ["capsule.create", "capsule.destroy"]})  # fmt: skip
            secret = r.json()["secret"]
            capsule = (await c.create(key))["id"]
            assert (await c.client.delete(f"/v1/capsules/{capsule}", headers=key)).is_success
            await eventually(lambda: rec.got, what="a first (failed) attempt")
        # The control plane stopped with the first event not yet delivered; another starts.
        async with running(create_app(fast)):
            await eventually(lambda: len(rec.ok()) == 2, what="both events delivered")
        events = [(r.json["event"], r.answered) for r in rec.got]
        assert events == [("capsule.create", 500), ("capsule.create", 500),
                          ("capsule.create", 200), ("capsule.destroy", 200)]  # fmt: skip
        assert len({r.headers["x-wrenn-delivery"] for r in rec.got[:3]}) == 1
        assert all(verifies(secret, r) for r in rec.got)
