"""envd's plain-HTTP contract (the Connect services live in `gen/process` and `gen/filesystem`).

Field names are camelCase on the wire, as E2B's and Wrenn's envd use them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ENVD_PORT = 49983
ENVD_VERSION = "0.5.7"
"""The E2B envd version we implement: >= 0.4.0 (no Basic-auth user), >= 0.5.7 (octet uploads)."""

ACCESS_TOKEN_HEADER = "X-Access-Token"


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
