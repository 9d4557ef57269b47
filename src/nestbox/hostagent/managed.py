"""`CapsuleView`: one capsule as the RPC service shows it (`views.capsule` turns it into the
wire message). Built by `CapsuleManager.view` from the capsule's one registry entry and record;
nothing here is kept between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nestbox.hostagent.capsule import CapsuleState


@dataclass(frozen=True, slots=True)
class CapsuleView:
    """One capsule as ListCapsules shows it; `state` is the record's (ERROR included)."""

    capsule_id: str
    state: CapsuleState
    template_id: str
    team_id: str = ""
    idle_timeout_s: int = 0
    egress: bool = False
    egress_allow: list[str] = field(default_factory=list)
    template_kind: str = "snapshot"
    created_at_unix_ms: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    host_address: str | None = None
    last_active_unix_ms: int = 0
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
