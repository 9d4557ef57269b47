"""Notification channels (protocol/events.py; `services/channels.py`): `/v1/channels` CRUD,
`POST /v1/channels/test`, `PUT /v1/channels/{channel_id}/config` (rotate) and
`GET /v1/channels/{channel_id}/deliveries`. Managing channels needs the team admin role."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router, int_query
from nestbox.protocol.accounts import Role
from nestbox.protocol.events import (
    ChannelConfig,
    ChannelCreate,
    ChannelTest,
    ChannelTestView,
    ChannelUpdate,
    ChannelView,
    DeliveryView,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

CHANNEL = "/v1/channels/{channel_id}"


def _admin(request: Request) -> None:
    deps.principal(request).require(Role.ADMIN)


async def create_channel(request: Request) -> Response:
    _admin(request)
    req = await deps.body(request, ChannelCreate)
    channels = deps.services(request).channels
    return deps.json(await channels.create(deps.principal(request), req), 201)


async def list_channels(request: Request) -> Response:
    return deps.json(await deps.services(request).channels.list_for(deps.principal(request)))


async def get_channel(request: Request) -> Response:
    channel_id = deps.path_param(request, "channel_id")
    channels = deps.services(request).channels
    return deps.json(await channels.get(deps.principal(request), channel_id))


async def update_channel(request: Request) -> Response:
    channel_id = deps.path_param(request, "channel_id")
    _admin(request)
    req = await deps.body(request, ChannelUpdate)
    channels = deps.services(request).channels
    return deps.json(await channels.update(deps.principal(request), channel_id, req))


async def rotate_channel(request: Request) -> Response:
    channel_id = deps.path_param(request, "channel_id")
    _admin(request)
    req = await deps.body(request, ChannelConfig)
    channels = deps.services(request).channels
    return deps.json(await channels.rotate(deps.principal(request), channel_id, req))


async def delete_channel(request: Request) -> Response:
    channel_id = deps.path_param(request, "channel_id")
    _admin(request)
    await deps.services(request).channels.delete(deps.principal(request), channel_id)
    return deps.no_content()


async def test_channel(request: Request) -> Response:
    _admin(request)
    req = await deps.body(request, ChannelTest)
    await deps.services(request).channels.test(deps.principal(request), req)
    return deps.json(ChannelTestView())


async def channel_deliveries(request: Request) -> Response:
    channel_id = deps.path_param(request, "channel_id")
    limit = deps.query_int(request, "limit", 50, lo=1, hi=500)
    channels = deps.services(request).channels
    return deps.json(await channels.deliveries(deps.principal(request), channel_id, limit))


router = Router(
    tag="channels",
    endpoints=[
        Endpoint("POST", "/v1/channels", create_channel, "Make a notification channel (admin)",
                 body=ChannelCreate, response=ChannelView, status=201,
                 description="webhook: config.url (+ secret, generated when missing: the "
                 "answer shows it, once); slack, discord: config.webhook_url. URLs resolving "
                 "to loopback, private or link-local addresses are refused."),
        Endpoint("GET", "/v1/channels", list_channels, "Your team's channels",
                 response=list[ChannelView]),
        Endpoint("POST", "/v1/channels/test", test_channel,
                 "Send a test event to a config, keeping nothing (admin)", body=ChannelTest,
                 response=ChannelTestView,
                 description="400 invalid_request when the receiver does not answer 2xx."),
        Endpoint("GET", CHANNEL, get_channel, "One channel", response=ChannelView),
        Endpoint("PATCH", CHANNEL, update_channel, "Rename a channel or change its events "
                 "(admin)", body=ChannelUpdate, response=ChannelView),
        Endpoint("PUT", CHANNEL + "/config", rotate_channel,
                 "Replace a channel's config, e.g. a new webhook secret (admin)",
                 body=ChannelConfig, response=ChannelView,
                 description="A webhook without config.secret gets a new one, shown once."),
        Endpoint("DELETE", CHANNEL, delete_channel, "Delete a channel (admin)", status=204),
        Endpoint("GET", CHANNEL + "/deliveries", channel_deliveries,
                 "A channel's latest deliveries, newest first", response=list[DeliveryView],
                 query=[int_query("limit", "default 50", 1, 500)],
                 description="pending (with its next attempt), delivered or failed (given up "
                 "after channel_max_attempts), with the receiver's last status or error."),
    ],
)  # fmt: skip
