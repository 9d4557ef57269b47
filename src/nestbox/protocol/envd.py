"""envd's plain-HTTP contract (the Connect services live in `gen/process` and `gen/filesystem`).

Field names are camelCase on the wire, as E2B's and Wrenn's envd use them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ENVD_PORT = 49983
ENVD_VERSION = "0.5.7"
"""The E2B envd version we implement: >= 0.4.0 (no Basic-auth user), >= 0.5.7 (octet uploads)."""

ACCESS_TOKEN_HEADER = "X-Access-Token"

LOG_LINES = 1000
"""envd keeps at most this many of its log lines (`GET /logs`)..."""
LOG_BYTES = 256 * 1024
"""...and at most this much text in them (messages and fields)."""
LOG_MESSAGE_CHARS = 2048
LOG_FIELDS = 16
LOG_FIELD_CHARS = 256
LOG_ANSWER_BYTES = 4 * LOG_BYTES + 256 * LOG_LINES
"""The largest `GET /logs` answer the host reads: the ring's text with every character escaped
(at most 4 bytes each) and each entry's JSON around it."""
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (tab kept), C1 controls and lone surrogates (not encodable as UTF-8)."""


def printable(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with control characters escaped (`\\x1b`) and lone
    surrogates replaced: log text from a guest is untrusted and ends up in terminals and JSON."""
    return _UNSAFE.sub(_escape, text[:limit])[:limit]


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\ufffd" if code > 0xFF else f"\\x{code:02x}"


def _fields(fields: dict[str, str]) -> dict[str, str]:
    items = list(fields.items())[:LOG_FIELDS]
    return {printable(k, LOG_FIELD_CHARS): printable(v, LOG_FIELD_CHARS) for k, v in items}


class LogEntry(BaseModel):
    """One line of envd's log ring (`GET /logs?start=&limit=` answers `{"entries": [...]}`,
    oldest first). Validating one bounds and cleans it, so the host parses envd's answer with
    this same model."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    ts_unix_ms: int = Field(alias="timestampMs", ge=0, lt=2**53)
    level: Literal["debug", "info", "warn", "error"]
    message: Annotated[str, AfterValidator(lambda v: printable(v, LOG_MESSAGE_CHARS))]
    fields: Annotated[dict[str, str], AfterValidator(_fields)] = Field(default_factory=dict)


class LogPage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    entries: list[LogEntry] = Field(default_factory=list, max_length=LOG_LINES)


class InitRequest(BaseModel):
    """`POST /init`: everything optional; sent by the host after boot and after every restore."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    access_token: str | None = Field(default=None, alias="accessToken")
    default_user: str | None = Field(default=None, alias="defaultUser")
    default_workdir: str | None = Field(default=None, alias="defaultWorkdir")
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    timestamp: str | None = None
    """RFC 3339 time of the host when it sent the request; the guest clock is set to it."""
    capsule_id: str | None = Field(default=None, alias="capsuleId")
    template_id: str | None = Field(default=None, alias="templateId")
    entropy: str | None = None
    """Base64 random bytes from the host, mixed into the guest RNG, which is then reseeded."""


class FileEntryView(BaseModel):
    """One element of the JSON array `POST /files` answers."""

    name: str
    type: str
    path: str
