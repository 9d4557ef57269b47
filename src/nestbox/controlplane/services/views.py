"""Records and agent messages -> public views (`protocol/`). Services return these; nothing
else builds them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nestbox.protocol.capsules import CapsuleStatus, CapsuleView
from nestbox.protocol.files import FileEntryView
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.hosts import HostStatus, HostType, HostView
from nestbox.protocol.templates import TemplateView

if TYPE_CHECKING:
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.db.hosts import Host
    from nestbox.controlplane.db.templates import Template

DEFAULT_DISK_MB = 5120
"""A capsule's disk (Wrenn's default; the overlay grows on demand up to the template's size)."""

AGENT_STATES: dict[pb.CapsuleState, CapsuleStatus] = {
    pb.CapsuleState.STARTING: CapsuleStatus.STARTING,
    pb.CapsuleState.RUNNING: CapsuleStatus.RUNNING,
    pb.CapsuleState.PAUSING: CapsuleStatus.PAUSING,
    pb.CapsuleState.PAUSED: CapsuleStatus.PAUSED,
    pb.CapsuleState.RESUMING: CapsuleStatus.RESUMING,
    pb.CapsuleState.SNAPSHOTTING: CapsuleStatus.SNAPSHOTTING,
    pb.CapsuleState.STOPPING: CapsuleStatus.STOPPING,
    pb.CapsuleState.STOPPED: CapsuleStatus.STOPPED,
    pb.CapsuleState.ERROR: CapsuleStatus.ERROR,
}
FILE_TYPES = {"file", "directory", "symlink"}


def status_of(state: pb.CapsuleState) -> CapsuleStatus:
    """The public status for an agent's capsule state (unknown ones count as `error`)."""
    return AGENT_STATES.get(state, CapsuleStatus.ERROR)


def from_unix_ms(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms > 0 else None


def capsule_view(c: Capsule) -> CapsuleView:
    return CapsuleView(
        id=c.id, status=CapsuleStatus(c.status), template=c.template, vcpus=c.vcpus,
        memory_mb=c.memory_mb, timeout_sec=c.timeout_sec, disk_size_mb=c.disk_mb,
        host_id=c.host_id, guest_ip=c.guest_ip, host_ip=c.host_ip, created_at=c.created_at,
        started_at=c.started_at, last_active_at=c.last_active_at, last_updated=c.last_updated,
        metadata={str(k): str(v) for k, v in c.metadata.items()}, auto_resume=c.auto_resume,
        ttl_sec=c.ttl_sec, on_timeout="destroy" if c.on_timeout == "destroy" else "pause",
        expires_at=c.expires_at,
        template_type="base" if c.template_type == "base" else "snapshot",
        allow_internet_access=c.allow_internet_access, egress_allow=list(c.egress_allow),
    )  # fmt: skip


def file_entry_view(e: pb.FileEntry) -> FileEntryView:
    return FileEntryView(
        name=e.name, path=e.path, type=e.type if e.type in FILE_TYPES else None,  # type: ignore[arg-type]  # narrowed by the set
        size=e.size, mode=e.mode, permissions=e.permissions, owner=e.owner, group=e.group,
        modified_at=e.modified_at, symlink_target=e.symlink_target or None,
    )  # fmt: skip


def template_view(t: Template) -> TemplateView:
    return TemplateView(
        name=t.name, type="base" if t.type == "base" else "snapshot", vcpus=t.vcpus,
        memory_mb=t.memory_mb, size_bytes=t.size_bytes, created_at=t.created_at,
        default_user=t.default_user, default_env=dict(t.default_env), created_by=t.created_by,
        platform=t.platform, protected=t.platform,
        metadata={str(k): str(v) for k, v in t.metadata.items()},
    )  # fmt: skip


def host_view(h: Host, capsules: int = 0) -> HostView:
    return HostView(
        id=h.id, status=HostStatus(h.status), address=h.address, arch=h.arch,
        cpu_cores=h.cpu_cores, memory_mb=h.memory_mb, disk_gb=h.disk_gb,
        last_heartbeat_at=h.last_heartbeat_at, type=HostType(h.type), team_id=h.team_id,
        provider=h.provider, availability_zone=h.availability_zone, created_at=h.created_at,
        load=h.load or None, capsules=capsules,
    )  # fmt: skip
