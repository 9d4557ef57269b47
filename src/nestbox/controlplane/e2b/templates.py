"""E2B's `Template` builder (`Template.build(...)` in the SDK) on our recipe builder
(`services/builds.py`, `POST /v1/admin/builds`): the same callers (a team's owners and admins,
platform admins), the same queue and logs.

The SDK's calls, in order, and what each becomes:

    POST /v3/templates {name, cpuCount, memoryMB}       -> 202 templateID, buildID
    GET  /templates/{templateID}/files/{hash}           (a `copy` step) -> 400, named
    POST /v2/templates/{templateID}/builds/{buildID}    steps -> a recipe, submitted -> 202
    GET  /templates/{templateID}/builds/{buildID}/status?logsOffset=
                                                        -> status and the recipe's output

Steps: `run_cmd` (and what the SDK turns into commands: `apt_install`, `pip_install`,
`make_dir`, `git_clone`, ...) -> `RUN` (as another user: `USER` around it), `set_envs` ->
`ENV`, `set_workdir` -> `WORKDIR`, `set_user` -> `USER`, `set_start_cmd` -> `START`,
`set_ready_cmd` -> the healthcheck (a snapshot template); `from_template` -> the base template
(`base` as for sandboxes), `from_base_image` -> `base`. Anything else (`copy`, Docker images
and registries) is a 400 that names the step.

No state is kept between the calls: `templateID` is the template's name with a signature
binding it to the caller's team (`name~sig`; another team's, or an unsigned one, is 404), and
`buildID` a signed token carrying the name, machine and when it was asked for; the status call
finds the recipe build this made by name and time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router, int_query
from nestbox.controlplane.e2b.api import answer, e2b_errors
from nestbox.controlplane.e2b.service import BASE_TEMPLATE, e2b_service, secret_key
from nestbox.controlplane.errors import InvalidRequest, NotFound
from nestbox.protocol.builds import BuildCreate, BuildStatus
from nestbox.protocol.capsules import DEFAULT_TEMPLATE, SAFE_NAME

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.requests import Request

    from nestbox.controlplane.services.principal import Principal
    from nestbox.protocol.builds import BuildView

_CONTEXT = b"nestbox/e2b/template/v1\0"
_NAME = re.compile(SAFE_NAME)
TEMPLATE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(:.*)?$"
"""A template's name, optionally with E2B's `:tag` (the tag is not kept)."""
E2B_BASE_IMAGES = frozenset({"e2bdev/base", "e2bdev/base:latest"})
MAX_LOGS = 100
"""Log entries per status answer (E2B's page)."""
Status = Literal["waiting", "building", "ready", "error"]
STATUS: dict[BuildStatus, Status] = {
    BuildStatus.PENDING: "waiting", BuildStatus.RUNNING: "building",
    BuildStatus.SUCCESS: "ready", BuildStatus.FAILED: "error", BuildStatus.CANCELLED: "error",
}  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TemplateRequest(BaseModel):
    """`POST /v3/templates` (in the caller's own team: no other field is taken)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={
        "anyOf": [{"required": [f], "properties": {f: {"type": "string"}}}
                  for f in ("name", "alias")],
    })  # fmt: skip

    name: str | None = Field(default=None, max_length=200, pattern=TEMPLATE_NAME)
    alias: str | None = Field(default=None, max_length=200, pattern=TEMPLATE_NAME)
    tags: list[str] | None = Field(default=None, max_length=20)
    cpu_count: int | None = Field(default=None, alias="cpuCount", ge=1, le=64)
    memory_mb: int | None = Field(default=None, alias="memoryMB", ge=128, le=262144)
    min_free_disk_mb: int | None = Field(default=None, alias="minFreeDiskMb", ge=0)
    """Taken and not used: disks are the base template's size."""

    @model_validator(mode="after")
    def _named(self) -> TemplateRequest:
        if not (self.name or self.alias):
            raise ValueError("name is required")
        return self


class TemplateStep(_Request):
    type: str = Field(max_length=32)
    args: list[str] = Field(default_factory=list, max_length=1000)


class TemplateBuildStart(_Request):
    """`POST /v2/templates/{templateID}/builds/{buildID}`."""

    from_image: str | None = Field(default=None, alias="fromImage")
    from_template: str | None = Field(default=None, alias="fromTemplate")
    from_image_registry: dict[str, object] | None = Field(default=None, alias="fromImageRegistry")
    steps: list[TemplateStep] = Field(default_factory=list, max_length=1000)
    start_cmd: str | None = Field(default=None, alias="startCmd", max_length=16384)
    ready_cmd: str | None = Field(default=None, alias="readyCmd", max_length=16384)


class TemplateRequested(BaseModel):
    template_id: str = Field(serialization_alias="templateID")
    build_id: str = Field(serialization_alias="buildID")
    public: bool = False
    names: list[str]
    tags: list[str]
    aliases: list[str] = Field(default_factory=list)


class BuildLogLine(BaseModel):
    timestamp: datetime
    level: Literal["debug", "info", "warn", "error"]
    message: str
    step: str | None = None


class BuildReason(BaseModel):
    message: str
    step: str | None = None


class TemplateBuildInfo(BaseModel):
    template_id: str = Field(serialization_alias="templateID")
    build_id: str = Field(serialization_alias="buildID")
    status: Status
    logs: list[str]
    log_entries: list[BuildLogLine] = Field(serialization_alias="logEntries")
    reason: BuildReason | None = None


# ── the signed ids ──


def _sign(key: bytes, data: bytes) -> str:
    digest = hmac.new(key, _CONTEXT + data, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def template_id(key: bytes, team_id: str, name: str) -> str:
    return f"{name}~{_sign(key, f'{team_id}/{name}'.encode())}"


def template_name(key: bytes, principal: Principal, tid: str) -> str:
    """The template name a `templateID` of the caller's team names. :raise NotFound:"""
    name, _, sig = tid.partition("~")
    want = _sign(key, f"{principal.team_id}/{name}".encode())
    if not sig or not hmac.compare_digest(sig.encode(), want.encode()):
        raise NotFound("template", tid[:80])
    return name


def build_token(key: bytes, claims: Mapping[str, object]) -> str:
    raw = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode()
    return f"{raw.rstrip('=')}.{_sign(key, raw.rstrip('=').encode())}"


def build_claims(key: bytes, principal: Principal, token: str, name: str) -> dict[str, object]:
    """What a `buildID` of this caller and template carries. :raise NotFound:"""
    raw, _, sig = token.partition(".")
    if not sig or not hmac.compare_digest(sig.encode(), _sign(key, raw.encode()).encode()):
        raise NotFound("build", token[:80])
    claims = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    if not isinstance(claims, dict) or claims.get("t") != principal.team_id or \
            claims.get("n") != name:  # fmt: skip
        raise NotFound("build", token[:80])
    return claims


# ── steps -> recipe ──


def recipe(body: TemplateBuildStart) -> list[str]:
    """The recipe lines of E2B's steps. :raise InvalidRequest: a step that cannot map."""
    lines: list[str] = []
    user = "root"
    for number, step in enumerate(body.steps, 1):
        kind, args = step.type.upper(), step.args
        where = f"step {number} ({step.type.lower()})"
        if kind == "RUN" and args:
            as_user = args[1] if len(args) > 1 and args[1] else user
            if as_user != user:
                lines += [f"USER {as_user}", f"RUN {args[0]}", f"USER {user}"]
            else:
                lines.append(f"RUN {args[0]}")
        elif kind == "ENV" and len(args) % 2 == 0:
            lines += [f"ENV {k}={v}" for k, v in zip(args[::2], args[1::2], strict=True)]
        elif kind == "WORKDIR" and len(args) == 1:
            lines.append(f"WORKDIR {args[0]}")
        elif kind == "USER" and len(args) == 1:
            user = args[0]
            lines.append(f"USER {user}")
        elif kind == "COPY":
            raise InvalidRequest(f"{where}: copying local files (Template.copy) is not "
                                 "supported by this server; fetch them with run_cmd")  # fmt: skip
        else:
            raise InvalidRequest(f"{where} is not supported by this server")
        if any("\n" in line for line in lines):
            raise InvalidRequest(f"{where}: one line per command (join them with &&)")
    if body.start_cmd:
        lines.append(f"START {body.start_cmd}")
    return lines


def base_of(body: TemplateBuildStart) -> str:
    """:raise InvalidRequest: a Docker image or registry (we build on templates)."""
    if body.from_image_registry is not None:
        raise InvalidRequest("from_*_registry (a private image registry) is not supported by "
                             "this server; use from_template")  # fmt: skip
    if body.from_image is not None:
        if body.from_image in E2B_BASE_IMAGES:
            return BASE_TEMPLATE
        raise InvalidRequest(f"from_image ({body.from_image[:80]}): Docker images are not "
                             "supported by this server; use from_template")  # fmt: skip
    return body.from_template or BASE_TEMPLATE


# ── handlers ──


def _name(body: TemplateRequest) -> str:
    full = body.name or body.alias
    if not full:
        raise InvalidRequest("name is required")
    name = full.split(":", 1)[0]
    if _NAME.fullmatch(name) is None:
        raise InvalidRequest("name: letters, digits, '.', '_' and '-', at most 64")
    return name


@e2b_errors
async def request_template(request: Request) -> Response:
    services, principal = deps.services(request), deps.principal(request)
    services.builds.authorise(principal)
    body = await deps.body(request, TemplateRequest)
    name, key = _name(body), await secret_key(services.settings.data_dir)
    claims = {"t": principal.team_id, "n": name, "c": body.cpu_count, "m": body.memory_mb,
              "at": time.time()}  # fmt: skip
    made = TemplateRequested(template_id=template_id(key, principal.team_id, name),
                             build_id=build_token(key, claims), names=[name],
                             tags=body.tags or [])  # fmt: skip
    return answer(made, 202)


@e2b_errors
async def template_file(request: Request) -> Response:
    services, principal = deps.services(request), deps.principal(request)
    template_name(await secret_key(services.settings.data_dir), principal,
                  str(request.path_params["template_id"]))  # fmt: skip
    raise InvalidRequest("copying local files (Template.copy) is not supported by this "
                         "server; fetch them with run_cmd")  # fmt: skip


@e2b_errors
async def start_template_build(request: Request) -> Response:
    services, principal = deps.services(request), deps.principal(request)
    key = await secret_key(services.settings.data_dir)
    name = template_name(key, principal, str(request.path_params["template_id"]))
    claims = build_claims(key, principal, str(request.path_params["build_id"]), name)
    body = await deps.body(request, TemplateBuildStart)
    base = base_of(body)
    if base == BASE_TEMPLATE:
        async with services.db.transaction() as tx:
            if await tx.templates.find(principal.team_id, BASE_TEMPLATE) is None:
                base = DEFAULT_TEMPLATE
    config = BuildCreate(
        name=name, base_template=base, recipe=recipe(body), healthcheck=body.ready_cmd,
        vcpus=claims.get("c"), memory_mb=claims.get("m"),  # type: ignore[arg-type]
    )  # fmt: skip
    await services.builds.submit(principal, config)
    return Response(status_code=202)


async def _build(request: Request, principal: Principal, name: str, at: float) -> BuildView:
    """The recipe build a `buildID` made: the first of that name since it was asked for."""
    since = datetime.fromtimestamp(at, UTC)
    builds = await deps.services(request).builds.list_for(principal)
    made = sorted((b for b in builds if b.name == name and b.created_at >= since),
                  key=lambda b: b.created_at)  # fmt: skip
    if not made:
        raise NotFound("build", name)
    return made[0]


@e2b_errors
async def template_build_status(request: Request) -> Response:
    services, principal = deps.services(request), deps.principal(request)
    key = await secret_key(services.settings.data_dir)
    tid, bid = str(request.path_params["template_id"]), str(request.path_params["build_id"])
    name = template_name(key, principal, tid)
    claims = build_claims(key, principal, bid, name)
    build = await _build(request, principal, name, float(claims.get("at") or 0))  # type: ignore[arg-type]
    offset = deps.query_int(request, "logsOffset", 0, lo=0, hi=10**6)
    lines: list[BuildLogLine] = []
    for entry in build.logs:
        at = datetime.now(UTC)
        lines.append(BuildLogLine(timestamp=at, level="info", step=str(entry.step),
                                  message=f"{entry.phase} {entry.step}: {entry.cmd}"))  # fmt: skip
        lines += [BuildLogLine(timestamp=at, level="info", step=str(entry.step), message=text)
                  for text in (entry.stdout + entry.stderr).splitlines()]  # fmt: skip
        if not entry.ok:
            lines.append(BuildLogLine(timestamp=at, level="error", step=str(entry.step),
                                      message=f"exit {entry.exit}"))  # fmt: skip
    page = lines[offset : offset + MAX_LOGS]
    status = STATUS[build.status]
    reason = BuildReason(message=build.error or "the build failed") if status == "error" else None
    info = TemplateBuildInfo(template_id=tid, build_id=bid, status=status,
                             logs=[line.message for line in page], log_entries=page,
                             reason=reason)  # fmt: skip
    return answer(info)


@e2b_errors
async def delete_e2b_template(request: Request) -> Response:
    """The SDK's `Sandbox.delete_snapshot` (and a template's delete): a snapshot's id, a
    template's name or a `templateID` this module made."""
    principal, tid = deps.principal(request), str(request.path_params["template_id"])
    service = await e2b_service(deps.services(request))
    name = template_name(service.key, principal, tid) if "~" in tid else tid
    await service.delete_template(principal, name)
    return deps.no_content()


TEMPLATE = "/templates/{template_id}"
router = Router(
    tag="e2b-templates",
    endpoints=[
        Endpoint("POST", "/v3/templates", request_template,
                 "E2B: ask for a template build (owners and admins)", body=TemplateRequest,
                 response=TemplateRequested, status=202),
        Endpoint("GET", TEMPLATE + "/files/{files_hash}", template_file,
                 "E2B: upload link for a copy step: 400, copies are not supported",
                 status=400),
        Endpoint("POST", "/v2" + TEMPLATE + "/builds/{build_id}", start_template_build,
                 "E2B: start a template build: its steps as a recipe",
                 body=TemplateBuildStart, status=202,
                 description="400 names a step that cannot map: only RUN (a command, and "
                 "optionally a user), ENV (name, value pairs), WORKDIR (one path) and USER (one "
                 "name) do, one line each; COPY, a Docker image other than e2bdev/base and a "
                 "private registry (fromImageRegistry) do not."),
        Endpoint("GET", TEMPLATE + "/builds/{build_id}/status", template_build_status,
                 "E2B: a template build's status and logs", response=TemplateBuildInfo,
                 query=(int_query("logsOffset", "log entries already read", 0, 10**6),)),
        Endpoint("DELETE", TEMPLATE, delete_e2b_template,
                 "E2B: delete a snapshot or template of your team", status=204,
                 description="404 when the team has none of that id (the SDK's "
                             "`delete_snapshot` answers False); 403 for a platform one."),
    ],
)  # fmt: skip
