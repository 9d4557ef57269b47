"""The template builder on the public API (Wrenn's admin build API, wrenn-surface §1.7), for
platform admins and for team admins on their own team's templates:

    POST   /v1/admin/builds               BuildCreate (JSON), or multipart/form-data with a
                                          `config` part (that JSON) and an optional `archive`
                                          part (tar, tar.gz or zip, at most 100 MiB)
                                                                  -> 201 BuildView
    GET    /v1/admin/builds                                       -> [BuildView]
    GET    /v1/admin/builds/{id}                                  -> BuildView
    POST   /v1/admin/builds/{id}/cancel                           -> BuildView
    GET    /v1/admin/builds/{id}/events   Server-Sent Events: `BuildEvent`s as they happen
    GET    /v1/admin/templates                                    -> [AdminTemplateView]
    DELETE /v1/admin/templates/{name}                             -> 204 (409 + `capsule_ids`
                                                                     while capsules use it)

A recipe is one instruction per line: `RUN [--timeout=30s] cmd`, `START cmd`, `USER name`,
`COPY src... dst`, `ENV KEY=VALUE`, `WORKDIR path` (keywords in any case; blank lines and
`#` comments are skipped). A healthcheck is `[--interval=3s] [--timeout=10s]
[--start-period=0s] [--retries=0] cmd`: when it passes the template is a snapshot (memory
included, START processes running); without one it is a base template (the disk alone).
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nestbox.protocol.capsules import DEFAULT_TEMPLATE, TemplateName
from nestbox.protocol.templates import TemplateView

MAX_ARCHIVE_BYTES = 100 * 1024 * 1024
"""An uploaded archive's limit (Wrenn's)."""
MAX_RECIPE_LINES = 1000
MAX_LINE = 16 * 1024


class BuildStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (BuildStatus.SUCCESS, BuildStatus.FAILED, BuildStatus.CANCELLED)


class BuildCreate(BaseModel):
    """A build's configuration (Wrenn's field names)."""

    model_config = ConfigDict(extra="forbid")

    name: TemplateName = Field(description="the template to make (your team's; replaced if "
                               "it exists)")  # fmt: skip
    base_template: TemplateName = Field(default=DEFAULT_TEMPLATE,
                                        description="the template the build capsule starts "
                                        "from")  # fmt: skip
    recipe: list[str] = Field(default_factory=list, max_length=MAX_RECIPE_LINES,
                              description="one instruction per line")  # fmt: skip
    healthcheck: str | None = Field(default=None, max_length=MAX_LINE,
                                    description="passes -> snapshot template; none -> base "
                                    "template")  # fmt: skip
    vcpus: int | None = Field(default=None, ge=1, le=64)
    memory_mb: int | None = Field(default=None, ge=128, le=262144)
    skip_pre_post: bool = Field(default=False, description="skip the fixed pre-build (apt "
                                "update, USER user, WORKDIR /home/user) and post-build "
                                "(apt clean-up) phases")  # fmt: skip


class BuildLogEntry(BaseModel):
    """One step that ran (Wrenn's log entry)."""

    model_config = ConfigDict(frozen=True)

    step: int = Field(description="1-based, over all phases")
    phase: Literal["pre-build", "recipe", "post-build"]
    cmd: str = Field(description="the instruction, as written")
    stdout: str = ""
    stderr: str = ""
    exit: int | None = Field(default=None, description="the exit code (None: no process, or "
                             "it was killed)")  # fmt: skip
    ok: bool
    elapsed_ms: int


class BuildView(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    team_id: str
    name: str
    base_template: str
    recipe: list[str]
    healthcheck: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    skip_pre_post: bool = False
    status: BuildStatus
    current_step: int = Field(description="steps done so far")
    total_steps: int
    logs: list[BuildLogEntry] = Field(default_factory=list)
    error: str | None = None
    sandbox_id: str | None = Field(default=None, description="the build capsule")
    host_id: str | None = None
    template_id: str | None = Field(default=None, description="the template made (success)")
    template_type: Literal["base", "snapshot"] | None = None
    default_user: str = "root"
    default_env: dict[str, str] = Field(default_factory=dict)
    default_workdir: str | None = None
    has_archive: bool = False
    created_by: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None


class BuildEventType(StrEnum):
    BUILD = "build"
    """The whole build as it stands (the first event, and on every status change)."""
    STEP_START = "step_start"
    OUTPUT = "output"
    """One line of a step's output (`stream`: stdout or stderr)."""
    STEP_END = "step_end"
    HEALTHCHECK = "healthcheck"
    """One healthcheck attempt."""
    DONE = "done"
    """The build ended (the stream closes after it)."""


class BuildEvent(BaseModel):
    """One Server-Sent Event of `/v1/admin/builds/{id}/events`: `event:` is `type`, `data:`
    this object as JSON."""

    model_config = ConfigDict(frozen=True)

    type: BuildEventType
    build_id: str
    step: int | None = None
    phase: str | None = None
    cmd: str | None = None
    stream: Literal["stdout", "stderr"] | None = None
    line: str | None = None
    exit: int | None = None
    ok: bool | None = None
    elapsed_ms: int | None = None
    status: BuildStatus | None = None
    error: str | None = None
    build: dict[str, Any] | None = Field(default=None, description="a BuildView (type build)")


class AdminTemplateView(TemplateView):
    """A template as the admin routes show it: whose it is and what capsules get from it."""

    id: str
    team_id: str
    default_workdir: str | None = None
