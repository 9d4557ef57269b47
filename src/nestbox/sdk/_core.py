"""What the sync and async clients share, none of it I/O: retry policy, request bodies,
the multipart framing of streamed uploads, the server-sent-events parser, recipe files and
result decoding. The clients themselves are `_async/client.py` and its generated twin
`_sync/client.py` (`_codegen.py`)."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import shlex
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from nestbox import __version__
from nestbox.sdk.errors import InvalidRequest, NestboxError, from_answer
from nestbox.sdk.models import CommandResult

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from nestbox.protocol.capsules import ExecResultView

USER_AGENT = f"nestbox-python/{__version__}"
CHUNK = 1 << 20
"""Streamed file transfers move 1 MiB at a time: memory stays flat at any file size."""
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
RETRIES = 3
BACKOFF_S = 0.25
BACKOFF_MAX_S = 4.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({502, 503, 504})
COMMAND_GRACE_S = 10.0
"""A foreground command's HTTP call waits this much longer than the command may run."""


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""`request_timeout=DEFAULT`: the client's own timeout (None means no timeout at all)."""


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): exponential with jitter,
    or what the server's `Retry-After` asked (capped)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), 30.0)
    base = min(BACKOFF_S * (1 << min(attempt - 1, 16)), BACKOFF_MAX_S)
    return base * (0.5 + secrets.randbelow(1000) / 2000)


def timeout_of(value: float | None) -> httpx.Timeout:
    if value is None:
        return httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
    return httpx.Timeout(value, connect=min(CONNECT_TIMEOUT_S, value))


def retry_after(response: httpx.Response) -> float | None:
    try:
        value: str = response.headers["retry-after"]
        return float(value)
    except (KeyError, ValueError):
        return None


def error_of(response: httpx.Response, body: bytes) -> NestboxError:
    return from_answer(response.status_code, body, response.headers.get("retry-after"))


def ws_url(api_url: str, path: str) -> str:
    if api_url.startswith("https://"):
        return "wss://" + api_url.removeprefix("https://") + path
    return "ws://" + api_url.removeprefix("http://") + path


def ws_refusal(status: int, body: bytes) -> NestboxError:
    """A refused WebSocket upgrade (404 unknown capsule, 409 not running, ...)."""
    return from_answer(status, body)


def ws_close_error(code: int | None, reason: str) -> NestboxError | None:
    """A close code 4000 + HTTP status (the API's refusals after accepting) as an error."""
    if code is None or not 4000 <= code < 5000:
        return None
    return from_answer(code - 4000, json.dumps({"error": {"code": "", "message": reason}}).encode())


# ── capsules ──


def create_body(
    template: str | None,
    vcpus: int | None,
    memory_mb: int | None,
    idle_timeout: int | None,
    metadata: Mapping[str, str] | None,
    internet: bool | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """`POST /v1/capsules`: only what the caller set (the server's defaults for the rest;
    fields other releases add go in `extra`)."""
    body: dict[str, Any] = {
        "template": template,
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "timeout_sec": idle_timeout,
        "metadata": dict(metadata) if metadata is not None else None,
        "allow_internet_access": internet,
    }
    body = {k: v for k, v in body.items() if v is not None}
    body.update(extra or {})
    return body


def list_params(
    status: str | Sequence[str] | None,
    metadata: Mapping[str, str] | None,
    limit: int | None,
    cursor: str | None,
) -> dict[str, str]:
    params: dict[str, str] = {}
    if status:
        params["status"] = status if isinstance(status, str) else ",".join(status)
    for key, value in (metadata or {}).items():
        params[f"metadata.{key}"] = value
    if limit is not None:
        params["limit"] = str(limit)
    if cursor:
        params["cursor"] = cursor
    return params


def page_of(response: httpx.Response) -> tuple[list[Any], str | None]:
    """One page of a listing: its items and the cursor of the next page (None: the last).
    A plain JSON array is a whole listing unless a next-cursor header says otherwise."""
    doc = response.json()
    cursor = response.headers.get("x-next-cursor") or None
    if isinstance(doc, dict):
        items: list[Any] = next((doc[k] for k in ("items", "capsules", "data") if k in doc), [])
        cursor = doc.get("next_cursor") or doc.get("cursor") or cursor
        return list(items), cursor
    return list(doc), cursor


# ── commands ──


def command_argv(cmd: str | Sequence[str]) -> tuple[str, list[str]]:
    """A string runs through `/bin/sh -c`; a sequence is the program and its arguments."""
    if isinstance(cmd, str):
        return "/bin/sh", ["-c", cmd]
    if not cmd:
        raise InvalidRequest("invalid_request", "an empty command")
    return cmd[0], list(cmd[1:])


def exec_body(
    cmd: str | Sequence[str],
    *,
    envs: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: int | None,
    background: bool = False,
    tag: str | None = None,
    stdin: bool = False,
) -> dict[str, Any]:
    program, args = command_argv(cmd)
    body: dict[str, Any] = {"cmd": program, "args": args, "background": background}
    if stdin:
        body["stdin"] = True
    if timeout is not None and not background:
        body["timeout_sec"] = timeout
    optional = {"envs": dict(envs) if envs else None, "cwd": cwd, "user": user, "tag": tag}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def stream_start(
    cmd: str | Sequence[str], envs: Mapping[str, str] | None, cwd: str | None, user: str | None
) -> str:
    program, args = command_argv(cmd)
    frame: dict[str, Any] = {"type": "start", "cmd": program, "args": args}
    optional = {"envs": dict(envs) if envs else None, "cwd": cwd, "user": user}
    frame.update({k: v for k, v in optional.items() if v is not None})
    return json.dumps(frame)


def result_of(view: ExecResultView) -> CommandResult:
    stdout, stderr = view.stdout, view.stderr
    if view.encoding == "base64":
        try:
            stdout = base64.b64decode(stdout).decode(errors="replace")
            stderr = base64.b64decode(stderr).decode(errors="replace")
        except binascii.Error:
            pass
    return CommandResult(
        stdout=stdout, stderr=stderr, exit_code=view.exit_code, duration_ms=view.duration_ms
    )


@dataclass
class Collected:
    """A process's output as a stream delivers it, joined into a result at the end."""

    pid: int | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    exit_code: int | None = None
    error: str | None = None

    def result(self, duration_ms: int | None = None) -> CommandResult:
        return CommandResult(
            stdout="".join(self.stdout), stderr="".join(self.stderr),
            exit_code=self.exit_code if self.exit_code is not None else -1,
            duration_ms=duration_ms, pid=self.pid,
        )  # fmt: skip


def pty_start(
    cmd: str,
    args: Sequence[str] | None,
    cols: int,
    rows: int,
    envs: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
) -> str:
    frame: dict[str, Any] = {"type": "start", "cmd": cmd, "cols": cols, "rows": rows}
    optional = {"args": list(args) if args else None, "envs": dict(envs) if envs else None,
                "cwd": cwd, "user": user}  # fmt: skip
    frame.update({k: v for k, v in optional.items() if v is not None})
    return json.dumps(frame)


# ── files ──


def multipart_head(boundary: str, path: str) -> bytes:
    """The streamed write's form up to the file's bytes: `path` first (the API's order)."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n{path}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def multipart_tail(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


def new_boundary() -> str:
    return secrets.token_hex(16)


# ── server-sent events ──


@dataclass
class SseMessage:
    event: str
    data: str
    id: str | None = None


@dataclass
class SseParser:
    """Server-sent events, one line at a time (`feed` returns a message at each blank line
    that ends one; comments and unknown fields are skipped)."""

    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, line: str) -> SseMessage | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            message = SseMessage(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return message
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


def sse_json(message: SseMessage) -> dict[str, Any]:
    try:
        doc = json.loads(message.data)
    except ValueError:
        return {"data": message.data}
    return doc if isinstance(doc, dict) else {"data": doc}


# ── template builds ──


@dataclass
class Recipe:
    """A recipe file: one instruction a line (RUN, COPY, ENV, WORKDIR, USER, START), `#`
    comments and blank lines skipped; `FROM <template>` names the base and `HEALTHCHECK
    [flags] <cmd>` the healthcheck (both are the build's settings, not steps)."""

    steps: list[str]
    base_template: str | None = None
    healthcheck: str | None = None


def parse_recipe(text: str) -> Recipe:
    recipe = Recipe(steps=[])
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            recipe.base_template = rest.strip()
        elif word.upper() == "HEALTHCHECK":
            recipe.healthcheck = rest.strip()
        else:
            recipe.steps.append(line)
    return recipe


def build_config(
    name: str, recipe: Recipe, base_template: str | None, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    config: dict[str, Any] = {"name": name, "recipe": recipe.steps}
    base = base_template or recipe.base_template
    if base:
        config["base_template"] = base
    if recipe.healthcheck:
        config["healthcheck"] = recipe.healthcheck
    config.update(extra or {})
    return config


def archive_directory(directory: Path) -> Path:
    """`directory` as a gzipped tar in a temporary file (the caller removes it); members are
    relative to the directory, links kept as links (the server refuses escaping ones)."""
    if not directory.is_dir():
        raise InvalidRequest("invalid_request", f"{directory} is not a directory")
    fd, name = tempfile.mkstemp(prefix="nestbox-build-", suffix=".tar.gz")
    try:
        with open(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            for path in sorted(directory.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def quote(argv: Sequence[str]) -> str:
    return shlex.join(argv)
