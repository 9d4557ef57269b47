"""The audit trail on the public API: `GET /v1/audit-logs` (a team's, for its admins) and
`GET /v1/admin/audit-logs` (every team's, platform admins), newest first, paged by `before`."""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AuditEntryView(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    team_id: str | None
    actor_type: str = Field(description="user | api_key | host | system")
    actor_id: str
    actor_name: str
    resource_type: str
    resource_id: str
    action: str
    scope: str
    status: str
    metadata: dict[str, Any]
    created_at: datetime
