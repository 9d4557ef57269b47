"""E2B's sandbox verbs on Nestbox's capsule services.

A sandbox is a capsule: create, pause, resume and destroy go through `CapsuleService`, E2B's
timeout through `LifetimeService`, listing through `services/paging.py`, metrics through
`CapsuleMetrics` (so quota, placement, locks, audit, events and the reconciler hold as for
`/v1`). What is E2B's own here:

- `timeout` is a lifetime in seconds (`ttl_sec`, counted again from each resume), not an idle
  timer: E2B capsules get no idle auto-pause (`timeout_sec` 0); at the end the capsule is
  destroyed, or paused when made with `autoPause` (`on_timeout`). `set_timeout` restarts the
  lifetime from now; `refresh` and a connect to a running sandbox only ever move the end later.
- States: E2B knows `running` and `paused`. pending/starting/resuming/snapshotting show as
  running, pausing as paused; a capsule that stopped, failed or went missing is not found.
- `envdAccessToken`: `access_token(id)`, an HMAC of the capsule id under the control plane's
  secret key: one per capsule (a clone is another capsule), never stored, checked by the envd
  gateway in constant time. It does not change on resume: the SDK's instance `connect()`
  keeps the token it had (SECURITY.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import ValidationError

from nestbox.controlplane.api.deps import validation_message
from nestbox.controlplane.db.capsules import PageKey
from nestbox.controlplane.e2b.models import (
    DEFAULT_TIMEOUT_S,
    ConnectSandbox,
    ListedSandbox,
    NewSandbox,
    NewSnapshot,
    SandboxCreated,
    SandboxDetail,
    SandboxLogEntry,
    SandboxMetric,
    SnapshotInfo,
)
from nestbox.controlplane.errors import InvalidRequest, InvalidState, NotFound
from nestbox.controlplane.secretbox import load_secret_key
from nestbox.controlplane.services.capsules import AGENT_METADATA
from nestbox.controlplane.services.paging import (
    ListQuery,
    decode_cursor,
    encode_cursor,
    list_page,
)
from nestbox.protocol.capsules import DEFAULT_TEMPLATE, CapsuleCreate, CapsuleStatus
from nestbox.protocol.envd import ENVD_VERSION, LOG_LINES
from nestbox.protocol.templates import SnapshotCreate

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from nestbox.controlplane.db.templates import Template
    from nestbox.controlplane.services.container import Services
    from nestbox.controlplane.services.principal import Principal
    from nestbox.protocol.capsules import CapsuleView
    from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

MIB = 1024 * 1024
BASE_TEMPLATE = "base"
"""E2B's default template id: our `base` template where there is one, else `minimal`."""
RUNNING = ("pending", "starting", "running", "resuming", "snapshotting")
PAUSED = ("pausing", "paused")
STATES = {"running": RUNNING, "paused": PAUSED}
NEVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
"""`endAt` of a sandbox without a lifetime (made through `/v1`)."""
MAX_PAGE = 100
METRICS_RANGE = "10m"
UNSUPPORTED = ("network", "mcp", "volume_mounts")
"""Create fields we cannot honour: refused (400) rather than silently ignored."""
_TOKEN_CONTEXT = b"nestbox/e2b/envd-access-token/v1\0"
SNAPSHOT_TAG = ":default"
"""E2B names a snapshot `<name>:<tag>`; ours have the one tag (a name never holds a `:`)."""
LOG_LEVELS = ("debug", "info", "warn", "error")
SOURCE_CAPSULE = "source_capsule"
"""The metadata key `SnapshotService` records a snapshot template's capsule under."""

_keys: dict[Path, bytes] = {}


def e2b_state(status: str) -> str | None:
    """E2B's state of a capsule status, or None: E2B does not show it."""
    return next((state for state, statuses in STATES.items() if status in statuses), None)


def user_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """The caller's metadata, without what the agent adds (agent_version, ...)."""
    return {k: str(v) for k, v in metadata.items() if k not in AGENT_METADATA}


def parse_metadata_query(raw: str) -> dict[str, str]:
    """The SDK's `metadata` filter: `urlencode({quote(k): quote(v)})`, once more encoded as a
    query value (already decoded once by the framework)."""
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def bare_name(template_id: str) -> str:
    """A template or snapshot name without E2B's tag (`name:default` -> `name`)."""
    return template_id.removesuffix(SNAPSHOT_TAG)


def snapshot_info(name: str) -> SnapshotInfo:
    return SnapshotInfo(snapshot_id=name + SNAPSHOT_TAG, names=[name + SNAPSHOT_TAG])


def log_entry(entry: pb.LogEntry) -> SandboxLogEntry:
    level = entry.level if entry.level in LOG_LEVELS else "info"
    return SandboxLogEntry(
        timestamp=datetime.fromtimestamp(entry.ts_unix_ms / 1000, UTC), level=level,  # type: ignore[arg-type] # checked just above
        message=entry.message, fields=dict(entry.fields),
    )  # fmt: skip


def access_token(key: bytes, capsule_id: str) -> str:
    """The E2B envd access token of a capsule (see the module's docstring)."""
    digest = hmac.new(key, _TOKEN_CONTEXT + capsule_id.encode(), hashlib.sha256).digest()
    return "ea_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def token_matches(key: bytes, capsule_id: str, presented: str) -> bool:
    return hmac.compare_digest(access_token(key, capsule_id).encode(), presented.encode())


async def secret_key(data_dir: Path) -> bytes:
    """The control plane's secret key, read once per data directory."""
    key = _keys.get(data_dir)
    if key is None:
        key = _keys[data_dir] = await anyio.to_thread.run_sync(load_secret_key, data_dir)
    return key


async def e2b_service(services: Services) -> E2bService:
    return E2bService(services, await secret_key(services.settings.data_dir))


@dataclass
class E2bService:
    services: Services
    key: bytes
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def access_token(self, capsule_id: str) -> str:
        return access_token(self.key, capsule_id)

    # ── create ──

    async def create(self, principal: Principal, body: NewSandbox) -> SandboxCreated:
        """:raise InvalidRequest: a field we cannot honour, a bad template id."""
        for name in UNSUPPORTED:
            if getattr(body, name):
                raise InvalidRequest(f"{name} is not supported by this server")
        template = await self._template(principal, body.template_id)
        try:
            request = CapsuleCreate.model_validate({
                "template": template, "timeout_sec": 0, "metadata": body.metadata or None,
                "envs": body.env_vars or None, "ttl_sec": body.timeout,
                "on_timeout": "pause" if body.auto_pause else "destroy",
                "auto_resume": body.resumes_on_traffic,
                "allow_internet_access": body.allow_internet_access,
            })  # fmt: skip
        except ValidationError as err:
            raise InvalidRequest(validation_message(err)) from None
        view = await self.services.capsules.create(principal, request)
        return self._created(view)

    async def _template(self, principal: Principal, template_id: str) -> str:
        if template_id != BASE_TEMPLATE:
            return bare_name(template_id)  # a snapshot's id names its template
        async with self.services.db.transaction() as tx:
            found = await tx.templates.find(principal.team_id, BASE_TEMPLATE)
        return BASE_TEMPLATE if found is not None else DEFAULT_TEMPLATE

    def _created(self, view: CapsuleView) -> SandboxCreated:
        return SandboxCreated(
            template_id=view.template, sandbox_id=view.id, client_id=view.host_id or "nestbox",
            envd_version=str(view.metadata.get("envd_version") or ENVD_VERSION),
            envd_access_token=self.access_token(view.id),
        )  # fmt: skip

    # ── reads ──

    async def _visible(self, principal: Principal, capsule_id: str) -> CapsuleView:
        """The caller's capsule in a state E2B shows. :raise NotFound:"""
        view = await self.services.capsules.get(principal, capsule_id)
        if e2b_state(view.status) is None:
            raise NotFound("sandbox", capsule_id)
        return view

    def _listed(self, view: CapsuleView) -> ListedSandbox:
        state: Literal["running", "paused"] = (
            "running" if e2b_state(view.status) == "running" else "paused"
        )
        if view.ttl_sec <= 0:
            end = NEVER
        else:
            end = view.expires_at or self.clock() + timedelta(seconds=view.ttl_sec)
        return ListedSandbox(
            template_id=view.template, sandbox_id=view.id, client_id=view.host_id or "nestbox",
            started_at=view.started_at or view.created_at, end_at=end, cpu_count=view.vcpus,
            memory_mb=view.memory_mb, disk_size_mb=view.disk_size_mb, state=state,
            envd_version=str(view.metadata.get("envd_version") or ENVD_VERSION),
            metadata=user_metadata(view.metadata),
        )  # fmt: skip

    async def detail(self, principal: Principal, capsule_id: str) -> SandboxDetail:
        listed = self._listed(await self._visible(principal, capsule_id))
        return SandboxDetail(**listed.model_dump(), envd_access_token=self.access_token(capsule_id))

    async def listing(
        self,
        principal: Principal,
        *,
        metadata: dict[str, str],
        states: set[str],
        limit: int | None,
        token: str | None,
    ) -> tuple[list[ListedSandbox], str | None]:
        """A page of the team's sandboxes in creation order (`services/paging.py`: the token
        is its cursor)."""
        statuses = [s for state in sorted(states) for s in STATES[state]]
        after = decode_cursor(token) if token else None
        query = ListQuery(statuses=statuses, metadata=metadata, after=after, limit=limit)
        found = await list_page(self.services.capsules, principal, query)
        return [self._listed(v) for v in found.capsules], found.next_cursor

    async def metrics(self, principal: Principal, capsule_id: str) -> list[SandboxMetric]:
        capsule = await self._visible(principal, capsule_id)
        found = await self.services.metrics.metrics(principal, capsule_id, METRICS_RANGE)
        return [
            SandboxMetric(
                timestamp=datetime.fromtimestamp(p.timestamp_unix, UTC),
                timestamp_unix=p.timestamp_unix,
                cpu_count=capsule.vcpus,
                cpu_used_pct=p.cpu_pct,
                mem_used=p.mem_bytes,
                mem_total=capsule.memory_mb * MIB,
                disk_used=p.disk_bytes,
                disk_total=capsule.disk_size_mb * MIB,
            )
            for p in found.points
        ]

    async def logs(
        self, principal: Principal, capsule_id: str, *, start_ms: int = 0, limit: int = LOG_LINES
    ) -> list[SandboxLogEntry]:
        """The sandbox's envd log lines from `start_ms` on, oldest first: the bounded ring
        envd keeps in the guest (`envd/logring.py`), read through its host agent. It lives in
        the guest's memory, so it is kept through a pause but read only while running.
        :raise NotFound: :raise InvalidState: paused."""
        target = await self.services.targets.target(principal, capsule_id)
        status = target.capsule.status
        if e2b_state(status) is None:
            raise NotFound("sandbox", capsule_id)
        if status != CapsuleStatus.RUNNING:
            raise InvalidState(f"sandbox {capsule_id}", status, ["running"])
        found = await target.agent.capsule_logs(capsule_id, start_ms, limit)
        return [log_entry(e) for e in found]

    # ── snapshots (snapshot templates: `services/snapshots.py`) ──

    async def create_snapshot(
        self, principal: Principal, capsule_id: str, body: NewSnapshot
    ) -> SnapshotInfo:
        """Snapshot the sandbox into the team's template `body.name` (replacing one of that
        name, as E2B assigns it a new build); a running sandbox runs on afterwards with the
        same end. :raise NotFound: :raise InvalidRequest: :raise InvalidState:"""
        if body.memory is False:
            raise InvalidRequest("filesystem-only snapshots (memory: false) are not supported")
        view = await self._visible(principal, capsule_id)
        try:
            request = SnapshotCreate(
                sandbox_id=capsule_id, name=bare_name(body.name) if body.name else None
            )
        except ValidationError as err:
            raise InvalidRequest(validation_message(err)) from None
        made = await self.services.snapshots.create(principal, request, overwrite=True)
        if view.status == CapsuleStatus.RUNNING:
            await self.services.capsules.resume(principal, capsule_id)
            if view.expires_at is not None:  # the snapshot's pause does not lengthen its life
                async with self.services.db.transaction() as tx:
                    await tx.capsules.update(capsule_id, expires_at=view.expires_at)
        return snapshot_info(made.name)

    async def snapshots(
        self,
        principal: Principal,
        *,
        sandbox_id: str | None,
        name: str | None,
        limit: int,
        token: str | None,
    ) -> tuple[list[SnapshotInfo], str | None]:
        """A page of the team's snapshot templates (those made from a sandbox) in creation
        order, and the next page's token (a `services/paging.py` cursor)."""
        async with self.services.db.transaction() as tx:
            found = await tx.templates.of_team(principal.team_id)

        def wanted(t: Template) -> bool:
            source = t.metadata.get(SOURCE_CAPSULE)
            return (source is not None and (sandbox_id is None or source == sandbox_id)
                    and (name is None or t.name == bare_name(name)))  # fmt: skip

        items = sorted((t for t in found if wanted(t)), key=lambda t: (t.created_at, t.id))
        if token:
            after = decode_cursor(token)
            items = [t for t in items if (t.created_at, t.id) > (after.created_at, after.id)]
        page = items[:limit]
        more = len(items) > limit
        next_token = encode_cursor(PageKey(page[-1].created_at, page[-1].id)) if more else None
        return [snapshot_info(t.name) for t in page], next_token

    async def delete_template(self, principal: Principal, name: str) -> None:
        """Delete the team's template (a snapshot, or one it built). :raise NotFound:
        :raise Forbidden: a platform template."""
        await self.services.snapshots.delete(principal, bare_name(name))

    # ── lifecycle ──

    async def kill(self, principal: Principal, capsule_id: str) -> None:
        """:raise NotFound: (the SDK's `kill()` then answers False)"""
        await self.services.capsules.destroy(principal, capsule_id)

    async def pause(self, principal: Principal, capsule_id: str) -> None:
        """:raise InvalidState: not running (409: the SDK's `pause()` answers False)."""
        await self._visible(principal, capsule_id)
        await self.services.capsules.pause(principal, capsule_id)

    async def connect(
        self, principal: Principal, capsule_id: str, body: ConnectSandbox, *, must_resume: bool
    ) -> tuple[SandboxCreated, bool]:
        """Resume a paused sandbox (waiting out a pause in progress) or attach to a running
        one; the answer and whether it was resumed. `must_resume` (`/resume`): a running
        sandbox is 409. A `timeout` is a new lifetime for a resumed sandbox, and moves a
        running one's end only later. :raise NotFound: :raise InvalidState:"""
        view = await self._visible(principal, capsule_id)
        with anyio.fail_after(120):
            while view.status == CapsuleStatus.PAUSING:  # the pause is finishing
                await anyio.sleep(0.2)
                view = await self._visible(principal, capsule_id)
        resumed = view.status == CapsuleStatus.PAUSED
        if resumed:
            view = await self.services.capsules.resume(principal, capsule_id)
        elif must_resume:
            raise InvalidState(f"sandbox {capsule_id}", view.status, ["paused"])
        lifetime = self.services.lifetime
        if body.auto_pause is not None:
            on_timeout = "pause" if body.auto_pause else "destroy"
            view = await lifetime.set_timeout(principal, capsule_id, on_timeout=on_timeout)
        if body.timeout is not None:
            end = self.clock() + timedelta(seconds=body.timeout)
            if resumed or view.expires_at is None or end > view.expires_at:
                view = await lifetime.set_timeout(principal, capsule_id, ttl_sec=body.timeout)
        return self._created(view), resumed

    async def set_timeout(self, principal: Principal, capsule_id: str, seconds: int) -> None:
        """The sandbox ends `seconds` from now (a paused one: after its resume)."""
        await self._visible(principal, capsule_id)
        await self.services.lifetime.set_timeout(principal, capsule_id, ttl_sec=max(seconds, 1))

    async def refresh(self, principal: Principal, capsule_id: str, duration: int | None) -> None:
        """Keep a running sandbox alive at least `duration` seconds more (its lifetime if
        none); never brings its end nearer."""
        view = await self._visible(principal, capsule_id)
        if view.status != CapsuleStatus.RUNNING or view.expires_at is None:
            return
        end = self.clock() + timedelta(seconds=duration or view.ttl_sec or DEFAULT_TIMEOUT_S)
        if end > view.expires_at:
            async with self.services.db.transaction() as tx:
                await tx.capsules.update(capsule_id, expires_at=end)
