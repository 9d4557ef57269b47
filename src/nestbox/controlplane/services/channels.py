"""Notification channels: where a team's events go besides the stream (`/v1/channels`).

Providers: `webhook` (config `url`, `secret`): the event's JSON POSTed as is, signed with
HMAC-SHA256 over `<X-Wrenn-Timestamp>.<body>` under the channel's secret, sent as
`X-Wrenn-Signature: sha256=<hex>` with `X-Wrenn-Delivery` (one id per event and channel, the
same on every attempt, so a receiver can drop repeats); the secret is generated when not
given and shown once, in the answer that set it. `slack` and `discord` (config
`webhook_url`): their incoming webhooks, a one-line text. Redirects are never followed.

The config is sealed at rest (`secretbox`, associated data `channels/<id>/config`). Every URL
is resolved (off the loop) and refused when an address it resolves to is unspecified,
link-local (cloud metadata), multicast or reserved, and, unless `channels_allow_private`, when
it is loopback, private or otherwise not global: checked when the channel is made, rotated or
tested, and again before each delivery (a name that resolves elsewhere later is caught then).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nestbox.controlplane.db.channels import Channel
from nestbox.controlplane.errors import InvalidRequest, NotFound
from nestbox.controlplane.services.addresses import IP, resolve, resolve_ips
from nestbox.protocol.events import ChannelView, DeliveryView, EventType
from nestbox.protocol.ids import IdPrefix, new_id

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import httpx

    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.channels import Delivery
    from nestbox.controlplane.secretbox import SecretBox
    from nestbox.controlplane.services.principal import Principal
    from nestbox.protocol.events import ChannelConfig, ChannelCreate, ChannelTest, ChannelUpdate

REQUIRED = {"webhook": ("url",), "slack": ("webhook_url",), "discord": ("webhook_url",)}
ALLOWED = {"webhook": {"url", "secret"}, "slack": {"webhook_url"}, "discord": {"webhook_url"}}
MAX_URL = 2048
MAX_SECRET = 256
SIGNATURE_HEADER = "X-Wrenn-Signature"
DELIVERY_HEADER = "X-Wrenn-Delivery"
TIMESTAMP_HEADER = "X-Wrenn-Timestamp"


class DeliveryFailed(Exception):
    """One attempt failed; `status` is the receiver's answer, if there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Wrenn-Signature` value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def config_context(channel_id: str) -> str:
    return f"channels/{channel_id}/config"


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """Which addresses a channel may send to (see the module's text)."""

    allow_private: bool = False
    resolver: Callable[[str, int], Sequence[str]] = resolve

    async def check(self, url: str) -> None:
        """:raise InvalidRequest: not an http(s) URL, does not resolve, or a refused address."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL:
            raise InvalidRequest("a channel URL must be an http:// or https:// URL")
        if parts.username or parts.password:
            raise InvalidRequest("a channel URL may not carry credentials before the host")
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InvalidRequest("the channel URL's port is not valid") from None
        try:
            ips = await resolve_ips(host, port, self.resolver)
        except InvalidRequest:
            raise InvalidRequest(f"the channel URL's host {host} does not resolve") from None
        for ip in ips:
            problem = self._problem(ip)
            if problem is not None:
                raise InvalidRequest(f"the channel URL's host {host} resolves to {ip}, {problem}")

    def _problem(self, ip: IP) -> str | None:
        if ip.is_unspecified or ip.is_link_local or ip.is_multicast:
            return "an unspecified, link-local or multicast address"
        if ip.version == 4 and (ip.is_reserved or ip == ipaddress.IPv4Address("255.255.255.255")):
            return "a reserved address"
        if not self.allow_private and (ip.is_loopback or ip.is_private or not ip.is_global):
            return "a loopback or private address (refused unless channels_allow_private)"
        return None


def _url_of(provider: str, config: Mapping[str, str]) -> str:
    return config["url"] if provider == "webhook" else config["webhook_url"]


def message(payload: Mapping[str, Any]) -> str:
    """A one-line text of an event for chat providers."""
    resource = payload.get("resource") or {}
    actor = payload.get("actor") or {}
    parts = [f"[nestbox] {payload.get('event', '?')}"]
    if payload.get("outcome"):
        parts.append(str(payload["outcome"]))
    if resource:
        parts.append(f"{resource.get('type', '')} {resource.get('id', '')}".strip())
    meta = payload.get("metadata") or {}
    if meta:
        parts.append(", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    if actor.get("type") and actor.get("type") != "system":
        parts.append(f"by {actor.get('name') or actor.get('id')}")
    if payload.get("error"):
        parts.append(f"error: {payload['error']}")
    return " · ".join(parts)


async def send(
    client: httpx.AsyncClient,
    policy: UrlPolicy,
    provider: str,
    config: Mapping[str, str],
    payload: Mapping[str, Any],
    *,
    delivery_id: str,
    now: datetime,
) -> int:
    """One attempt; the receiver's status. :raise DeliveryFailed:"""
    url = _url_of(provider, config)
    try:
        await policy.check(url)
    except InvalidRequest as err:
        raise DeliveryFailed(err.message) from None
    headers = {"Content-Type": "application/json", "User-Agent": "nestbox-channels/1"}
    if provider == "webhook":
        body = json.dumps(payload, separators=(",", ":")).encode()
        stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        headers.update({DELIVERY_HEADER: delivery_id, TIMESTAMP_HEADER: stamp,
                        SIGNATURE_HEADER: sign(config.get("secret", ""), stamp, body)})  # fmt: skip
    else:
        key = "text" if provider == "slack" else "content"
        body = json.dumps({key: message(payload)}).encode()
    import httpx

    try:
        answer = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as err:
        raise DeliveryFailed(f"{type(err).__name__}: {err}"[:400]) from None
    if not 200 <= answer.status_code < 300:
        raise DeliveryFailed(f"the receiver answered {answer.status_code}", answer.status_code)
    return answer.status_code


class ChannelService:
    def __init__(
        self,
        db: Database,
        box: SecretBox,
        policy: UrlPolicy,
        *,
        client: Callable[[], httpx.AsyncClient],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._box = box
        self.policy = policy
        self._client = client
        self._clock = clock

    def open_config(self, channel: Channel) -> dict[str, str]:
        """:raise SecretError: the sealed config does not open (another secret key)."""
        opened: dict[str, str] = json.loads(
            self._box.open(channel.config_enc, config_context(channel.id))
        )
        return opened

    async def _checked(self, provider: str, config: Mapping[str, str]) -> dict[str, str]:
        """The config, validated, with a webhook's secret generated when missing."""
        clean = {k: v.strip() for k, v in config.items()}
        unknown = set(clean) - ALLOWED[provider]
        if unknown:
            raise InvalidRequest(f"unknown config field(s) for {provider}: {sorted(unknown)}")
        for name in REQUIRED[provider]:
            if not clean.get(name):
                raise InvalidRequest(f"config.{name} is required for {provider}")
        if provider == "webhook":
            if len(clean.get("secret", "")) > MAX_SECRET:
                raise InvalidRequest(f"config.secret is longer than {MAX_SECRET} characters")
            clean["secret"] = clean.get("secret") or secrets.token_hex(32)
        await self.policy.check(_url_of(provider, clean))
        return clean

    @staticmethod
    def _name(name: str) -> str:
        return name.strip().lower().replace(" ", "-")

    def _view(self, channel: Channel, secret: str | None = None) -> ChannelView:
        return ChannelView(
            id=channel.id, team_id=channel.team_id, name=channel.name,
            provider=channel.provider, events=[EventType(e) for e in channel.event_types],  # type: ignore[arg-type]  # stored from a Provider
            created_at=channel.created_at, updated_at=channel.updated_at, secret=secret,
        )  # fmt: skip

    async def create(self, principal: Principal, req: ChannelCreate) -> ChannelView:
        """:raise InvalidRequest: :raise Conflict: the team has a channel of that name."""
        config = await self._checked(req.provider, req.config)
        channel_id, now = new_id(IdPrefix.CHANNEL), self._clock()
        channel = Channel(
            id=channel_id, team_id=principal.team_id, name=self._name(req.name),
            provider=req.provider, config_enc=self._box.seal(json.dumps(config),
                                                            config_context(channel_id)),
            event_types=sorted({e.value for e in req.events}), created_at=now, updated_at=now,
        )  # fmt: skip
        async with self._db.transaction() as tx:
            made = await tx.channels.create(channel)
            event = principal.audit("channel.create", "channel", channel_id, name=made.name,
                                    provider=made.provider)  # fmt: skip
            await tx.audit.record(event)
        return self._view(made, config.get("secret"))

    async def list_for(self, principal: Principal) -> list[ChannelView]:
        async with self._db.transaction() as tx:
            return [self._view(c) for c in await tx.channels.list_team(principal.team_id)]

    async def _own(self, principal: Principal, channel_id: str) -> Channel:
        async with self._db.transaction() as tx:
            channel = await tx.channels.get(principal.team_id, channel_id)
        if channel is None:
            raise NotFound("channel", channel_id)
        return channel

    async def get(self, principal: Principal, channel_id: str) -> ChannelView:
        return self._view(await self._own(principal, channel_id))

    async def update(
        self, principal: Principal, channel_id: str, req: ChannelUpdate
    ) -> ChannelView:
        values: dict[str, Any] = {"updated_at": self._clock()}
        if req.name is not None:
            values["name"] = self._name(req.name)
        if req.events is not None:
            values["event_types"] = sorted({e.value for e in req.events})
        async with self._db.transaction() as tx:
            channel = await tx.channels.update(principal.team_id, channel_id, **values)
            if channel is None:
                raise NotFound("channel", channel_id)
            await tx.audit.record(principal.audit("channel.update", "channel", channel_id))
        return self._view(channel)

    async def rotate(
        self, principal: Principal, channel_id: str, req: ChannelConfig
    ) -> ChannelView:
        """Replace the config (a webhook gets a new secret unless one is given)."""
        channel = await self._own(principal, channel_id)
        config = await self._checked(channel.provider, req.config)
        sealed = self._box.seal(json.dumps(config), config_context(channel_id))
        async with self._db.transaction() as tx:
            updated = await tx.channels.update(principal.team_id, channel_id, config_enc=sealed,
                                               updated_at=self._clock())  # fmt: skip
            if updated is None:
                raise NotFound("channel", channel_id)
            await tx.audit.record(principal.audit("channel.rotate", "channel", channel_id))
        return self._view(updated, config.get("secret"))

    async def delete(self, principal: Principal, channel_id: str) -> None:
        async with self._db.transaction() as tx:
            if not await tx.channels.delete(principal.team_id, channel_id):
                raise NotFound("channel", channel_id)
            await tx.audit.record(principal.audit("channel.delete", "channel", channel_id))

    async def deliveries(
        self, principal: Principal, channel_id: str, limit: int
    ) -> list[DeliveryView]:
        await self._own(principal, channel_id)
        async with self._db.transaction() as tx:
            found = await tx.channels.deliveries(channel_id, limit)
        return [delivery_view(d) for d in found]

    async def test(self, principal: Principal, req: ChannelTest) -> None:
        """Send a `channel.test` event to a config, keeping nothing.
        :raise InvalidRequest: the config is invalid or the receiver refused."""
        config = await self._checked(req.provider, req.config)
        now = self._clock()
        payload = {"event": "channel.test", "timestamp": now.isoformat(),
                   "team_id": principal.team_id, "actor": {"type": "system"},
                   "resource": {"id": "test", "type": "channel"}, "metadata": {}}  # fmt: skip
        try:
            await send(self._client(), self.policy, req.provider, config, payload,
                       delivery_id=str(uuid.uuid4()), now=now)  # fmt: skip
        except DeliveryFailed as err:
            raise InvalidRequest(f"the test delivery failed: {err}") from None


def delivery_view(d: Delivery) -> DeliveryView:
    return DeliveryView(
        id=d.delivery_id, event=EventType(d.event_type), status=d.status,  # type: ignore[arg-type]  # pending | delivered | failed
        attempts=d.attempts, response_status=d.response_status, last_error=d.last_error,
        created_at=d.created_at, finished_at=d.finished_at,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
    )  # fmt: skip
