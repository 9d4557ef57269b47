"""Capsules, commands and processes on the public API (Wrenn's surface, as the official `wrenn`
0.3.0 SDK sends and reads it; sdk-request-map §2.3 and §2.5). Paths:

    POST   /v1/capsules                         CapsuleCreate   -> 201 CapsuleView
    GET    /v1/capsules                                         -> [CapsuleView]
    GET    /v1/capsules/{id}                                    -> CapsuleView
    DELETE /v1/capsules/{id}                                    -> 204
    POST   /v1/capsules/{id}/pause | /resume                    -> CapsuleView
    POST   /v1/capsules/{id}/ping                               -> 204
    POST   /v1/capsules/{id}/exec               ExecCreate      -> ExecResultView
                                                   (background: 202 BackgroundView)
    GET    /v1/capsules/{id}/processes                          -> ProcessListView
    DELETE /v1/capsules/{id}/processes/{pid or tag}[?signal=]   -> 204
    WS     /v1/capsules/{id}/exec/stream, /processes/{sel}/stream, /pty

`status` only ever takes the SDK's twelve values, and every timestamp is timezone-aware: the
SDK's pydantic models reject anything else. Wire names others fixed keep their spelling
(`sandbox_id`, `timeout_sec`).
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from nestbox.protocol.metadata import Metadata  # noqa: TC001 (pydantic needs it at runtime)

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Template and snapshot names (Wrenn's `validate.SafeName`): no slashes, no leading dot."""
DEFAULT_TEMPLATE = "minimal"
MAX_TAG = 64

TemplateName = Annotated[str, Field(pattern=SAFE_NAME)]
EgressTarget = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        # An IPv4 address or CIDR, or a host name (the agent checks each strictly again).
        pattern=r"^([0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$",
    ),
]


class CapsuleStatus(StrEnum):
    """The SDK's `Status` enum, all of it (any other value crashes the SDK)."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    SNAPSHOTTING = "snapshotting"
    RESUMING = "resuming"
    STOPPING = "stopping"
    HIBERNATED = "hibernated"
    STOPPED = "stopped"
    """Gone without being destroyed (its VM vanished from its host)."""
    MISSING = "missing"
    """Its host stopped sending heartbeats; back to what the host says when they return."""
    ERROR = "error"
    """Its VM died; destroy it to forget it."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


# ── lifecycle ──


class CapsuleCreate(_Request):
    """`POST /v1/capsules`. A snapshot template fixes the machine: the capsule then gets the
    template's vCPUs and memory whatever is asked (as in Wrenn); the answer says what it got."""

    # The document states the service's rule: an allow-list with internet access turned off.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": {
        "required": ["allow_internet_access", "egress_allow"],
        "properties": {"allow_internet_access": {"const": False},
                       "egress_allow": {"type": "array", "minItems": 1}},
    }})  # fmt: skip

    template: TemplateName = DEFAULT_TEMPLATE
    vcpus: int | None = Field(default=None, ge=1, le=64)
    memory_mb: int | None = Field(default=None, ge=128, le=262144)
    timeout_sec: int = Field(
        default=0, ge=0, le=30 * 86400, description="idle auto-pause after this; 0 = never"
    )
    metadata: Metadata | None = Field(
        default=None, description="at most 20 string pairs; `GET /v1/capsules` filters on them"
    )
    auto_resume: bool | None = Field(
        default=None, description="a guest call to it while paused resumes it first "
        "(default: the server's setting)",
    )  # fmt: skip
    ttl_sec: int = Field(
        default=0, ge=0, le=30 * 86400, description="lifetime of each run; 0 = none"
    )
    on_timeout: Literal["pause", "destroy"] = Field(
        default="pause", description="what ends a run at `ttl_sec`"
    )
    envs: dict[str, str] | None = Field(
        default=None,
        max_length=100,
        description="added to the default environment of the "
        "capsule's processes (over the template's)",
    )
    allow_internet_access: bool | None = Field(
        default=None, description="egress: NAT out and DNS, never to private, link-local, "
        "metadata or the host's addresses (default: the server's setting)",
    )  # fmt: skip
    egress_allow: list[EgressTarget] | None = Field(
        default=None, max_length=64, description="with internet access: the only IPv4 CIDRs "
        "or host names it may reach (names resolved when the capsule starts); none = any",
    )  # fmt: skip


class CapsuleView(_View):
    id: str
    status: CapsuleStatus
    template: str
    vcpus: int
    memory_mb: int
    timeout_sec: int
    disk_size_mb: int
    host_id: str | None = None
    guest_ip: str = ""
    host_ip: str = ""
    created_at: datetime
    started_at: datetime | None = None
    last_active_at: datetime | None = None
    last_updated: datetime
    metadata: dict[str, str] = Field(default_factory=dict)
    auto_resume: bool = False
    ttl_sec: int = 0
    on_timeout: Literal["pause", "destroy"] = "pause"
    expires_at: datetime | None = Field(default=None, description="when this run's lifetime ends")
    template_type: Literal["base", "snapshot"] = Field(
        default="snapshot", description="snapshot: the template's vCPUs and memory, whatever "
        "was asked; base: booted with the ones asked for",
    )  # fmt: skip
    allow_internet_access: bool = False
    egress_allow: list[str] = Field(default_factory=list)


# ── commands and processes ──


class ExecCreate(_Request):
    """`POST /v1/capsules/{id}/exec`. The SDK sends `{"cmd": "/bin/sh", "args": ["-c", …]}`;
    `envs` and `cwd` apply in the foreground too (the SDK's git helpers rely on it)."""

    cmd: str = Field(min_length=1, max_length=4096)
    args: list[str] = Field(default_factory=list, max_length=4096)
    background: bool = False
    timeout_sec: int | None = Field(
        default=None, ge=1, le=86400, description="foreground only; default 30"
    )
    envs: dict[str, str] | None = None
    cwd: str | None = Field(default=None, max_length=4096)
    tag: str | None = Field(default=None, min_length=1, max_length=MAX_TAG)
    user: str | None = Field(
        default=None, min_length=1, max_length=64, description="guest user; default: the capsule's"
    )
    stdin: bool = Field(
        default=False, description="background only: a stdin pipe that "
        "`POST .../processes/{pid}/stdin` writes to",
    )  # fmt: skip


class ExecResultView(_View):
    sandbox_id: str
    cmd: str
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: int
    encoding: Literal["utf-8", "base64"] = Field(
        description="base64 when the output is not valid UTF-8 (both streams are then encoded)"
    )


class BackgroundView(_View):
    sandbox_id: str
    cmd: str
    pid: int
    tag: str


class ProcessView(_View):
    pid: int
    tag: str | None
    cmd: str
    args: list[str]


class ProcessListView(_View):
    processes: list[ProcessView]
