"""Host agent <-> control plane: registration, token refresh and heartbeats (Wrenn §1.9).

    POST /v1/hosts/register          HostRegisterRequest  -> HostRegisterResponse
    POST /v1/hosts/auth/refresh      HostRefreshRequest   -> HostRefreshResponse
    POST /v1/hosts/{id}/heartbeat    HeartbeatRequest     -> HeartbeatResponse   (X-Host-Token)

Credentials:
- agent -> control plane: the host token in `X-Host-Token` (short-lived; renewed with the
  refresh token, which rotates on every use).
- control plane -> agent, two tokens issued at registration, each good for one thing only:
  the agent token authorises RPCs (`X-Agent-Token` or `Authorization: Bearer`), the proxy
  token authorises `/proxy/...` requests (`X-Nestbox-Proxy-Token`, never `Authorization`,
  which belongs to the user's application in the capsule). So a proxied request can never
  carry an RPC's authority. The agent keeps only their SHA-256s and strips both headers
  before anything reaches a capsule; the control plane's public proxy refuses requests that
  bring either header from outside.

Host addresses are `host:port` (`split_host_address`): a DNS name, an IPv4 address or a
bracketed IPv6 address, and a port 1-65535; no scheme, path, query, fragment or userinfo.
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

import ipaddress
import re
from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

HOST_TOKEN_HEADER = "X-Host-Token"
AGENT_TOKEN_HEADER = "X-Agent-Token"
"""The control plane's RPC credential at an agent (also accepted as `Authorization: Bearer`)."""
PROXY_TOKEN_HEADER = "X-Nestbox-Proxy-Token"
"""The control plane's credential for an agent's `/proxy/...`; authorises nothing else."""
REGISTER_PATH = "/v1/hosts/register"
REFRESH_PATH = "/v1/hosts/auth/refresh"


def heartbeat_path(host_id: str) -> str:
    return f"/v1/hosts/{host_id}/heartbeat"


MAX_ADDRESS = 255
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def split_host_address(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port). The host is a DNS name, a dotted IPv4
    address or an IPv6 address in brackets; the port 1-65535. Nothing else: no scheme, path,
    query, fragment, userinfo, spaces, zone ids or numeric shorthands (`127.1`).

    :raise ValueError: says what is wrong.
    """
    if len(value) > MAX_ADDRESS or not value.isascii():
        raise ValueError(f"an address is at most {MAX_ADDRESS} ASCII characters")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep or "%" in host:
            raise ValueError("an address is host:port or [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not _HOSTNAME.fullmatch(host):
            raise ValueError("an address is host:port (a DNS name or IPv4 address, a port)")
        if host.rstrip(".").replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not a dotted IPv4 address") from None
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be 1-65535")
    return host, int(port)


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

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_address(value)
        return value


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
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["type"], "properties": {"type": {"const": "byoc"}}},
        {"properties": {"team_id": {"type": "null"}}},
    ]})  # fmt: skip

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
    agent_token: str = Field(description="what the CP presents for RPCs (X-Agent-Token)")
    proxy_token: str = Field(
        description="what the CP presents for /proxy/ requests (X-Nestbox-Proxy-Token)"
    )


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
