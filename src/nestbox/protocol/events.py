"""Events and notification channels on the public API (Wrenn's surface; sdk-request-map §2.3,
wrenn-surface §1.10):

    GET    /v1/events/stream                     Server-Sent Events of EventView, team-scoped
    POST   /v1/channels                          ChannelCreate      -> 201 ChannelView (+ secret)
    GET    /v1/channels                                             -> [ChannelView]
    GET    /v1/channels/{id}                                        -> ChannelView
    PATCH  /v1/channels/{id}                     ChannelUpdate      -> ChannelView
    DELETE /v1/channels/{id}                                        -> 204
    PUT    /v1/channels/{id}/config              ChannelConfig      -> ChannelView (+ secret)
    POST   /v1/channels/test                     ChannelTest        -> {"status": "ok"}
    GET    /v1/channels/{id}/deliveries                             -> [DeliveryView]

An event's `metadata` holds strings only (the SDK's model is `dict[str, str]`), `actor.type` is
user, api_key or system, `resource.type` sandbox, snapshot or host (Wrenn's names).
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nestbox.protocol.capsules import CapsuleView  # noqa: TC001 (a field's type)


class EventType(StrEnum):
    """The SDK's `Event` enum, all of it."""

    CONNECTED = "connected"
    CAPSULE_CREATE = "capsule.create"
    CAPSULE_PAUSE = "capsule.pause"
    CAPSULE_RESUME = "capsule.resume"
    CAPSULE_DESTROY = "capsule.destroy"
    CAPSULE_STATE_CHANGED = "capsule.state.changed"
    SNAPSHOT_CREATE = "template.snapshot.create"
    SNAPSHOT_DELETE = "template.snapshot.delete"
    HOST_UP = "host.up"
    HOST_DOWN = "host.down"


SUBSCRIBABLE = (
    EventType.CAPSULE_CREATE, EventType.CAPSULE_PAUSE, EventType.CAPSULE_RESUME,
    EventType.CAPSULE_DESTROY, EventType.SNAPSHOT_CREATE, EventType.SNAPSHOT_DELETE,
    EventType.HOST_UP, EventType.HOST_DOWN,
)  # fmt: skip
"""What a channel may subscribe to (`capsule.state.changed` is for the stream only)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventActor(_Frozen):
    type: Literal["user", "api_key", "system"]
    id: str = ""
    name: str = ""


class EventResource(_Frozen):
    id: str
    type: str = Field(description="sandbox | snapshot | host")


class EventView(_Frozen):
    """One event: the `data:` of an SSE message and the body of a webhook delivery."""

    event: EventType
    outcome: Literal["success", "error"] | None = Field(
        default=None, description="for capsule.* (but state.changed) and template.snapshot.*"
    )
    timestamp: datetime
    team_id: str | None = None
    actor: EventActor | None = None
    resource: EventResource | None = None
    metadata: dict[str, str] = Field(
        default_factory=dict, description="reason, from/to (state.changed), host_id, …"
    )
    error: str | None = Field(default=None, description="only when outcome is error")
    sandbox: CapsuleView | None = Field(default=None, description="the capsule, for capsule.*")


# ── channels ──

Provider = Literal["webhook", "slack", "discord"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$"
ChannelName = Field(pattern=NAME_PATTERN)
Events = Field(min_length=1, max_length=len(SUBSCRIBABLE))
Config = Field(max_length=8, description="webhook: url (+ secret, generated if missing); "
               "slack, discord: webhook_url")  # fmt: skip


def _subscribable(events: list[EventType] | None) -> list[EventType] | None:
    for event in events or ():
        if event not in SUBSCRIBABLE:
            raise ValueError(f"{event.value} cannot be subscribed to (the stream only)")
    return events


class ChannelCreate(_Request):
    name: str = ChannelName
    provider: Provider
    config: dict[str, str] = Config
    events: list[EventType] = Events

    _events = field_validator("events")(_subscribable)


class ChannelUpdate(_Request):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    events: list[EventType] | None = Field(default=None, min_length=1,
                                           max_length=len(SUBSCRIBABLE))  # fmt: skip

    _events = field_validator("events")(_subscribable)


class ChannelConfig(_Request):
    config: dict[str, str] = Config


class ChannelTest(_Request):
    provider: Provider
    config: dict[str, str] = Config


class ChannelView(_Frozen):
    id: str
    team_id: str
    name: str
    provider: Provider
    events: list[EventType]
    created_at: datetime
    updated_at: datetime
    secret: str | None = Field(
        default=None, description="a webhook's signing secret: only in the answer that made it"
    )


class ChannelTestView(_Frozen):
    status: Literal["ok"] = "ok"


class DeliveryView(_Frozen):
    id: str = Field(description="X-Wrenn-Delivery (the same on every attempt)")
    event: EventType
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    response_status: int | None = None
    last_error: str = ""
    created_at: datetime
    next_attempt_at: datetime | None = None
    finished_at: datetime | None = None
