"""Snapshot templates on the public API (sdk-request-map §2.4):

    POST   /v1/snapshots[?overwrite=true]   SnapshotCreate -> 201 TemplateView
    GET    /v1/snapshots[?type=base|snapshot]              -> [TemplateView]
    DELETE /v1/snapshots/{name}                            -> 204

A snapshot is taken of a running or paused capsule, which is left paused; capsules made from
it start where it stood, processes and all, with the template's vCPUs and memory. A base
template is a disk only: capsules boot it cold with the vCPUs and memory they ask for.
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nestbox.protocol.capsules import TemplateName  # noqa: TC001 (pydantic needs it)


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sandbox_id: str = Field(min_length=1, max_length=64, description="the capsule to snapshot")
    name: TemplateName | None = Field(default=None, description="default template-<8 hex>")


class TemplateView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    type: Literal["base", "snapshot"]
    vcpus: int | None = None
    memory_mb: int | None = None
    size_bytes: int = Field(default=0, description="size on disk, once its host made it")
    default_user: str = "root"
    default_env: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    created_by: str | None = Field(
        default=None, description="a user id, an API key id, or `platform`"
    )
    platform: bool = Field(description="the platform's, visible to every team")
    protected: bool = Field(description="cannot be deleted")
    metadata: dict[str, str] = Field(default_factory=dict)
