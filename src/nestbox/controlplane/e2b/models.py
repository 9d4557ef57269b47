"""E2B's wire models (its OpenAPI `spec/openapi.yml`, as the `e2b` 2.x SDK parses them): field
names are E2B's camelCase, every timestamp timezone-aware. Requests ignore fields we do not
serve (network rules, MCP, volumes, ...) unless doing so would change what the caller gets;
those are refused by the service with 400 naming the field."""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nestbox.protocol.capsules import SAFE_NAME
from nestbox.protocol.metadata import Metadata  # noqa: TC001 (pydantic resolves annotations at runtime)

MAX_TIMEOUT_S = 86_400
"""E2B's longest lifetime (24 h, its Pro tier)."""
DEFAULT_TIMEOUT_S = 300
"""The SDK's default lifetime when it sends none."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


UNSUPPORTED: dict[str, Any] = {
    "maxProperties": 0,
    "description": "not supported by this server: only empty or null",
}
"""What the document says of create fields Nestbox cannot honour (anything else in them: 400)."""


class NewSandbox(_Request):
    """`POST /sandboxes` and `POST /v2/sandboxes`."""

    template_id: str = Field(alias="templateID", min_length=1, max_length=128,
                             pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(:default)?$")  # fmt: skip
    timeout: int = Field(default=DEFAULT_TIMEOUT_S, ge=1, le=MAX_TIMEOUT_S)
    auto_pause: bool = Field(default=False, alias="autoPause")
    auto_resume: bool | dict[str, object] | None = Field(default=None, alias="autoResume")
    secure: bool | None = None
    """Ignored: every sandbox's envd takes its access token."""
    allow_internet_access: bool | None = None
    metadata: Metadata | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars", max_length=100)
    network: dict[str, object] | None = Field(default=None, json_schema_extra=UNSUPPORTED)
    mcp: dict[str, object] | None = Field(default=None, json_schema_extra=UNSUPPORTED)
    volume_mounts: list[object] | None = Field(
        default=None, alias="volumeMounts", json_schema_extra={**UNSUPPORTED, "maxItems": 0}
    )

    @property
    def resumes_on_traffic(self) -> bool:
        """`autoResume`: a bool, or (SDK 2.x) `{"enabled": bool}`."""
        if isinstance(self.auto_resume, dict):
            return self.auto_resume.get("enabled") is True
        return bool(self.auto_resume)


class ConnectSandbox(_Request):
    """`POST /v2/sandboxes/{id}/connect` and `POST /sandboxes/{id}/resume`."""

    timeout: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_S)
    auto_pause: bool | None = Field(default=None, alias="autoPause")


class SandboxTimeout(_Request):
    """`POST /sandboxes/{id}/timeout`: the sandbox ends this many seconds from now."""

    timeout: int = Field(ge=0, le=MAX_TIMEOUT_S)


class SandboxRefresh(_Request):
    """`POST /sandboxes/{id}/refreshes`: live at least this many seconds from now."""

    duration: int | None = Field(default=None, ge=0, le=3600)


class SandboxCreated(_View):
    """E2B's `Sandbox`: the answer to create, connect and resume."""

    template_id: str = Field(serialization_alias="templateID")
    sandbox_id: str = Field(serialization_alias="sandboxID")
    client_id: str = Field(serialization_alias="clientID")
    envd_version: str = Field(serialization_alias="envdVersion")
    envd_access_token: str = Field(serialization_alias="envdAccessToken")


class ListedSandbox(_View):
    template_id: str = Field(serialization_alias="templateID")
    sandbox_id: str = Field(serialization_alias="sandboxID")
    client_id: str = Field(serialization_alias="clientID")
    started_at: datetime = Field(serialization_alias="startedAt")
    end_at: datetime = Field(serialization_alias="endAt")
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    disk_size_mb: int = Field(serialization_alias="diskSizeMB")
    state: Literal["running", "paused"]
    envd_version: str = Field(serialization_alias="envdVersion")
    metadata: dict[str, str] = Field(default_factory=dict)


class SandboxDetail(ListedSandbox):
    envd_access_token: str = Field(serialization_alias="envdAccessToken")


class SandboxMetric(_View):
    timestamp: datetime
    timestamp_unix: int = Field(serialization_alias="timestampUnix")
    cpu_count: int = Field(serialization_alias="cpuCount")
    cpu_used_pct: float = Field(serialization_alias="cpuUsedPct")
    mem_used: int = Field(serialization_alias="memUsed")
    mem_total: int = Field(serialization_alias="memTotal")
    mem_cache: int = Field(default=0, serialization_alias="memCache")
    disk_used: int = Field(serialization_alias="diskUsed")
    disk_total: int = Field(serialization_alias="diskTotal")


class SandboxLog(_View):
    """E2B's `SandboxLog`: one line as text."""

    timestamp: datetime
    line: str


class SandboxLogEntry(_View):
    """E2B's `SandboxLogEntry`: one line, structured."""

    timestamp: datetime
    level: Literal["debug", "info", "warn", "error"]
    message: str
    fields: dict[str, str] = Field(default_factory=dict)


class SandboxLogs(_View):
    """`GET /sandboxes/{id}/logs`: the same lines twice, as E2B answers them."""

    logs: list[SandboxLog]
    log_entries: list[SandboxLogEntry] = Field(serialization_alias="logEntries")


class SandboxLogsV2(_View):
    """`GET /v2/sandboxes/{id}/logs`."""

    logs: list[SandboxLogEntry]


class NewSnapshot(_Request):
    """`POST /sandboxes/{id}/snapshots` (E2B's `SandboxSnapshotRequest`)."""

    name: str | None = Field(default=None, pattern=SAFE_NAME)
    memory: bool | None = Field(default=None, json_schema_extra={"enum": [True, None]})
    """False asks for a filesystem-only snapshot: refused (400), every snapshot here holds
    memory too."""


class SnapshotInfo(_View):
    """E2B's `SnapshotInfo`: `snapshotID` is `<name>:default` (E2B's `name:tag`); a sandbox is
    created from it (or from the bare name) as from a template."""

    snapshot_id: str = Field(serialization_alias="snapshotID")
    names: list[str]


class E2bError(_View):
    """E2B's `Error` (`code` is the HTTP status), alongside our `{"error": {...}}`."""

    code: int
    message: str
