"""A capsule's lifetime on the public API: its idle timeout and absolute lifetime, and forks.

    POST /v1/capsules/{id}/timeout   CapsuleTimeout -> CapsuleView
    POST /v1/capsules/{id}/fork      ForkCreate     -> 201 ForkView

`timeout_sec` is the idle auto-pause (as at create; 0 = never); `ttl_sec` is the lifetime of
the current run, counted from the create, resume or timeout change that set it; at its end the
capsule is paused or destroyed (`on_timeout`). A resume starts a new run with the same
`ttl_sec`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nestbox.protocol.capsules import CapsuleView  # noqa: TC001 (pydantic needs it at runtime)

OnTimeout = Literal["pause", "destroy"]
MAX_TTL_S = 30 * 86400
MAX_FORKS = 10


class CapsuleTimeout(BaseModel):
    """Fields left out (or null) keep their value; at least one must be given."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"type": kind}}}
        for name, kind in (("timeout_sec", "integer"), ("ttl_sec", "integer"),
                           ("on_timeout", "string"))
    ]})  # fmt: skip

    timeout_sec: int | None = Field(
        default=None, ge=0, le=30 * 86400, description="idle auto-pause after this; 0 = never"
    )
    ttl_sec: int | None = Field(
        default=None, ge=0, le=MAX_TTL_S,
        description="the capsule's run ends this long from now; 0 = no lifetime",
    )  # fmt: skip
    on_timeout: OnTimeout | None = Field(
        default=None, description="what ends a run at its lifetime: pause (default) or destroy"
    )

    @model_validator(mode="after")
    def _something(self) -> CapsuleTimeout:
        if self.timeout_sec is None and self.ttl_sec is None and self.on_timeout is None:
            raise ValueError("give timeout_sec, ttl_sec or on_timeout")
        return self


class ForkCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, ge=1, le=MAX_FORKS)


class ForkView(BaseModel):
    model_config = ConfigDict(frozen=True)

    source_id: str
    capsules: list[CapsuleView]
    paused_ms: int = Field(description="how long the source's vCPUs were stopped")
