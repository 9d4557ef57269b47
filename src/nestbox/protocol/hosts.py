"""Host agent <-> control plane: registration, token refresh and heartbeats (Wrenn §1.9).

    POST /v1/hosts/register          HostRegisterRequest  -> HostRegisterResponse
    POST /v1/hosts/auth/refresh      HostRefreshRequest   -> HostRefreshResponse
    POST /v1/hosts/{id}/heartbeat    HeartbeatRequest     -> HeartbeatResponse   (X-Host-Token)

Credentials, one per direction:
- agent -> control plane: the host token in `X-Host-Token` (short-lived; renewed with the
  refresh token, which rotates on every use).
- control plane -> agent: the agent token, issued once at registration, in `X-Agent-Token` on
  every RPC and port-proxy request. Not `Authorization`: proxied requests must carry the
  user's own `Authorization` to the capsule untouched. The agent keeps only its SHA-256 and
  strips the header before anything reaches a capsule.
Errors are `ErrorBody` (`protocol.errors`): a bad or used registration token is 401
`unauthorized`; an unknown host 404 `not_found`.

Managing hosts (public API, platform admins; a BYOC host also its team's admins):

    POST   /v1/hosts                 HostCreate -> 201 HostCreatedView (one-time token)
    GET    /v1/hosts                            -> [HostView]
    GET    /v1/hosts/{id}                       -> HostView
    DELETE /v1/hosts/{id}[?force=true]          -> 204 (409 host_has_capsules unless force)
    POST   /v1/hosts/{id}/token                 -> 201 HostTokenView (a new one-time token)
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HOST_TOKEN_HEADER = "X-Host-Token"
AGENT_TOKEN_HEADER = "X-Agent-Token"
REGISTER_PATH = "/v1/hosts/register"
REFRESH_PATH = "/v1/hosts/auth/refresh"


def heartbeat_path(host_id: str) -> str:
    return f"/v1/hosts/{host_id}/heartbeat"


class HostStatus(StrEnum):
    PENDING = "pending"
    """Created by an admin; no agent has registered yet."""
    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"
    """Takes no new capsules; running ones stay."""
    UNREACHABLE = "unreachable"
    """No heartbeat for the monitor's grace period (Wrenn: 90 s)."""


class HostType(StrEnum):
    REGULAR = "regular"
    """Takes any team's capsules."""
    BYOC = "byoc"
    """A team's own machine: takes only that team's capsules."""


class HostRegisterRequest(BaseModel):
    """The agent's first call: trade the one-time registration token for credentials."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, description="one-time registration token from an admin")
    address: str = Field(min_length=1, description="`host:port` where the CP reaches the agent")
    arch: str = Field(description="machine architecture, e.g. x86_64, aarch64")
    cpu_cores: int = Field(ge=1)
    memory_mb: int = Field(ge=1)
    disk_gb: int = Field(ge=0, description="size of the file system holding the data directory")


class HostView(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: HostStatus
    address: str
    arch: str = ""
    cpu_cores: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    last_heartbeat_at: datetime | None = None
    type: HostType = HostType.REGULAR
    team_id: str | None = None
    provider: str = ""
    availability_zone: str = ""
    created_at: datetime | None = None
    load: dict[str, Any] | None = Field(default=None, description="the last heartbeat's figures")
    capsules: int = Field(default=0, description="capsules placed on it and not destroyed")


class HostCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: HostType = HostType.REGULAR
    team_id: str | None = Field(default=None, description="byoc: the team (default: yours)")
    provider: str = Field(default="", max_length=64)
    availability_zone: str = Field(default="", max_length=64)


class HostTokenView(BaseModel):
    model_config = ConfigDict(frozen=True)

    registration_token: str = Field(description="for `nestbox-agent --register`; shown once")
    expires_at: datetime


class HostCreatedView(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: HostView
    registration_token: str = Field(description="for `nestbox-agent --register`; shown once")
    expires_at: datetime


class HostRegisterResponse(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: HostView
    token: str = Field(description="host token for `X-Host-Token` (short-lived)")
    refresh_token: str = Field(description="trades for a new host token; rotates on use")
    agent_token: str = Field(description="what the CP presents to the agent in X-Agent-Token")


class HostRefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str = Field(min_length=1)


class HostRefreshResponse(BaseModel):
    model_config = ConfigDict(frozen=True)

    token: str
    refresh_token: str


class HeartbeatRequest(BaseModel):
    """The agent's load, every heartbeat interval; what the scheduler places capsules by."""

    model_config = ConfigDict(extra="forbid")

    capsules_running: int = Field(ge=0)
    capsules_paused: int = Field(default=0, ge=0)
    vcpus_allocated: int = Field(default=0, ge=0, description="sum over running capsules")
    memory_allocated_mb: int = Field(default=0, ge=0, description="sum over running capsules")
    cpu_cores: int = Field(ge=1)
    cpu_used_pct: float = Field(ge=0, le=100, description="all cores, since the last beat")
    load_1m: float = Field(ge=0)
    memory_total_mb: int = Field(ge=0)
    memory_available_mb: int = Field(ge=0)
    disk_total_gb: float = Field(ge=0, description="the file system of the data directory")
    disk_free_gb: float = Field(ge=0)
    agent_version: str = ""


class HeartbeatResponse(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: HostStatus
    """What the control plane thinks of this host now (e.g. `draining` set by an admin)."""
