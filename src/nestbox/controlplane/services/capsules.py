"""Capsule lifecycle: create (placement, then the agent clones the template), list, get,
pause, resume, ping, destroy.

Each verb records its intent in the database first (`pending`, `pausing`, `resuming`), then
asks the host agent, then records the outcome; the agent call and the outcome are shielded
from cancellation, so a client that hangs up never leaves a row that disagrees with its host.
Verbs on one capsule are serialised (`KeyedLocks`, held from a create's first write on); the
reconciler leaves a capsule in a transitional status alone while a call of this process holds
its lock (and for `stuck_after_s` after its last change), and updates only rows unchanged since
it read them.

Quota: a team holds at most `quota` capsules that hold resources (`HOLDS_RESOURCES`: pending,
running, resuming, …; paused ones do not count); a create or resume beyond it is 429
`quota_exceeded`. The check locks the team's row, so concurrent creates (on several control
planes too) cannot both take the last place.

Destroy hides the capsule at once (`destroyed`): a GET afterwards is 404, whatever its host
said. A destroy its host could not carry out is retried by the reconciler when the host
answers again.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.db.capsules import DESTROYED, Committed
from nestbox.controlplane.errors import HostUnavailable, InvalidState, NotFound, QuotaExceeded
from nestbox.controlplane.scheduling import Candidate, Demand
from nestbox.controlplane.services.capsule_policy import CreatePolicy, demand_for, egress_for
from nestbox.controlplane.services.events import publish_audit
from nestbox.controlplane.services.locks import KeyedLocks
from nestbox.controlplane.services.views import (
    capsule_view,
    from_unix_ms,
    status_of,
)
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.ids import new_capsule_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.audit import AuditEvent
    from nestbox.controlplane.db.capsules import Capsule, PageKey
    from nestbox.controlplane.db.hosts import Host
    from nestbox.controlplane.db.templates import Template
    from nestbox.controlplane.scheduling import Placement
    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Targets
    from nestbox.protocol.capsules import CapsuleCreate, CapsuleView

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MB = 512
MIN_IDLE_TIMEOUT_S = 60
"""Positive idle timeouts below this are raised to it (the SDK documents the clamp)."""
AGENT_METADATA = ("agent_version", "accel", "image_version", "envd_version")


def agent_template_id(template: Template) -> str:
    """The template's name on its host: platform templates by name (every agent has
    `minimal`), a team's snapshots by their unique id (two teams may use one name)."""
    return template.name if template.platform else template.id


def running_values(capsule: pb.Capsule, now: datetime) -> dict[str, Any]:
    """Row values for a capsule the agent just started or resumed."""
    return {
        "status": status_of(capsule.state).value, "host_ip": capsule.host_ip,
        "guest_ip": capsule.guest_ip, "last_active_at": from_unix_ms(
            capsule.last_active_at_unix_ms) or now,
    }  # fmt: skip


class CapsuleService:
    def __init__(
        self,
        db: Database,
        targets: Targets,
        placement: Placement,
        *,
        quota: int = 0,
        policy: CreatePolicy | None = None,
        locks: KeyedLocks | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        auto_resume_default: bool = False,
        min_idle_timeout_s: int = MIN_IDLE_TIMEOUT_S,
    ) -> None:
        self.min_idle_timeout_s = min_idle_timeout_s
        self._db = db
        self._targets = targets
        self._placement = placement
        self._quota = quota
        self._policy = policy or CreatePolicy()
        self._auto_resume_default = auto_resume_default
        self._clock = clock
        self.locks = locks or KeyedLocks()

    # ── reads ──

    async def list_for(
        self,
        principal: Principal,
        *,
        statuses: Sequence[str] | None = None,
        metadata: dict[str, str] | None = None,
        after: PageKey | None = None,
        limit: int | None = None,
    ) -> list[CapsuleView]:
        """The team's capsules in creation order, filtered (`statuses`, every pair of
        `metadata`) and paged by key (after `after`, at most `limit`: see `services/paging`)."""
        async with self._db.transaction() as tx:
            found = await tx.capsules.page_team(
                principal.team_id, statuses=statuses, metadata=metadata, after=after, limit=limit
            )
        return [capsule_view(c) for c in found]

    async def get(self, principal: Principal, capsule_id: str) -> CapsuleView:
        capsule, _ = await self._targets.find(principal, capsule_id)
        return capsule_view(capsule)

    # ── create ──

    async def create(self, principal: Principal, req: CapsuleCreate) -> CapsuleView:
        """Place and start a capsule from `req.template`.

        :raise NotFound: no such template. :raise HostUnavailable: no host can take it.
        :raise QuotaExceeded: the team holds its quota of capsules.
        :raise AgentCallError: the host refused or failed (the capsule is then gone).
        """
        capsule_id = new_capsule_id()
        async with self.locks.hold(capsule_id):
            return await self._create(principal, req, capsule_id)

    async def _create(
        self, principal: Principal, req: CapsuleCreate, capsule_id: str
    ) -> CapsuleView:
        async with self._db.transaction() as tx:
            template = await tx.templates.find(principal.team_id, req.template)
            if template is None:
                raise NotFound("template", req.template)
            await self._within_quota(tx, principal.team_id)
            demand = demand_for(template, req, self._policy)
            egress, egress_allow = egress_for(req, self._policy)
            host = await self._place(tx, principal, template, demand)
            timeout = req.timeout_sec and max(req.timeout_sec, self.min_idle_timeout_s)
            capsule = await tx.capsules.create(
                capsule_id, team_id=principal.team_id, host_id=host.id,
                template=template.name, template_id=template.id, vcpus=demand.vcpus,
                memory_mb=demand.memory_mb, disk_mb=demand.disk_mb, timeout_sec=timeout,
                metadata=dict(req.metadata or {}), ttl_sec=req.ttl_sec, on_timeout=req.on_timeout,
                auto_resume=self._auto_resume_default if req.auto_resume is None
                else req.auto_resume, template_type=template.type,
                allow_internet_access=egress, egress_allow=egress_allow,
            )  # fmt: skip
        request = pb.CreateCapsuleRequest(
            template=agent_template_id(template), vcpus=demand.vcpus, memory_mb=demand.memory_mb,
            disk_mb=demand.disk_mb, idle_timeout_sec=timeout, default_user=template.default_user,
            default_env={**template.default_env, **(req.envs or {})}, capsule_id=capsule.id,
            team_id=principal.team_id, egress=egress, egress_allow=egress_allow,
            default_workdir=str(template.metadata.get("default_workdir") or ""),
        )  # fmt: skip
        with anyio.CancelScope(shield=True):
            view = await self._start(principal, capsule, host, request, template)
        return view

    async def _place(
        self, tx: Tx, principal: Principal, template: Template, demand: Demand
    ) -> Host:
        hosts = [h for h in await tx.hosts.with_status("online")
                 if h.team_id in (None, principal.team_id)]  # fmt: skip
        if template.host_id is not None:
            # A team's snapshot lives on the host that took it.
            hosts = [h for h in hosts if h.id == template.host_id]
            if not hosts:
                raise HostUnavailable(f"the host holding template {template.name} is not online")
        committed = await tx.capsules.committed()
        candidates = [candidate(h, committed.get(h.id)) for h in hosts]
        chosen = self._placement.choose(demand, candidates)
        return next(h for h in hosts if h.id == chosen.host_id)

    async def _start(
        self,
        principal: Principal,
        capsule: Capsule,
        host: Host,
        request: pb.CreateCapsuleRequest,
        template: Template,
    ) -> CapsuleView:
        event = principal.audit("capsule.create", "capsule", capsule.id, host_id=host.id,
                                template=capsule.template)  # fmt: skip
        try:
            started, template_size = await self._targets.agent(host).create_capsule(request)
        except (AgentCallError, HostUnavailable) as err:
            await self._forget_failed(capsule, host)
            failed = replace(event, status="error", metadata={**event.metadata, "error": err.code})
            async with self._db.transaction() as tx:
                await tx.audit.record(failed)
                await publish_audit(tx, failed)
            raise
        now = self._clock()
        system = {k: v for k, v in started.metadata.items() if k in AGENT_METADATA}
        metadata = {**capsule.metadata, **system}
        fresh = await self._set_and_get(
            capsule.id, audit=event, vcpus=started.vcpus or capsule.vcpus,
            memory_mb=started.memory_mb or capsule.memory_mb, started_at=now,
            metadata=metadata, expires_at=expiry(capsule.ttl_sec, now),
            **running_values(started, now),
        )  # fmt: skip
        if fresh.status == DESTROYED:
            # Its team was deleted meanwhile (or the reconciler settled a create it thought
            # lost): the VM must not outlive the row.
            await self._destroy_on(host, capsule.id)
            raise NotFound("capsule", capsule.id)
        await self._learn_size(template, host, template_size)
        log.info("capsule created", extra={"capsule_id": capsule.id, "host_id": host.id})
        return capsule_view(fresh)

    async def _learn_size(self, template: Template, host: Host, size: int) -> None:
        """A platform template is made on each host at its first use, so only a host can say
        its size: the row takes the latest a shared host reported (hosts of one version differ
        by a few blocks). A team's own (BYOC) host is that team's machine: what it says never
        changes a row every team sees. A team's templates got their sizes when they were made."""
        if host.team_id is None and template.platform and size and size != template.size_bytes:
            async with self._db.transaction() as tx:
                await tx.templates.set_size(template.id, size)

    async def _forget_failed(self, capsule: Capsule, host: Host) -> None:
        """A create failed: make sure the agent has nothing left, hide the row."""
        try:
            with anyio.fail_after(30):
                await self._targets.agent(host).destroy_capsule(capsule.id)
        except (AgentCallError, HostUnavailable, TimeoutError) as err:
            log.debug("cleanup after a failed create: %s", err, extra={"capsule_id": capsule.id})
        async with self._db.transaction() as tx:
            await tx.capsules.update(capsule.id, status=DESTROYED)

    # ── pause, resume, ping ──

    async def pause(self, principal: Principal, capsule_id: str) -> CapsuleView:
        """:raise InvalidState: not running. :raise AgentCallError:"""
        async with self.locks.hold(capsule_id):
            target = await self._targets.target(principal, capsule_id)
            self._require(target.capsule, CapsuleStatus.RUNNING)
            async with self._db.transaction() as tx:
                await tx.capsules.update(capsule_id, status=CapsuleStatus.PAUSING.value)
            paused = await self._transition(
                capsule_id,
                lambda: target.agent.pause_capsule(capsule_id),
                undo=CapsuleStatus.RUNNING,
                outcome=lambda answer: {"status": status_of(answer.state).value, "host_ip": ""},
                audit=principal.audit("capsule.pause", "capsule", capsule_id),
            )
        return capsule_view(paused)

    async def resume(self, principal: Principal, capsule_id: str) -> CapsuleView:
        """:raise InvalidState: not paused. :raise AgentCallError:"""
        async with self.locks.hold(capsule_id):
            target = await self._targets.target(principal, capsule_id)
            self._require(target.capsule, CapsuleStatus.PAUSED)
            async with self._db.transaction() as tx:
                await self._within_quota(tx, principal.team_id)
                template = (await tx.templates.find(principal.team_id, target.capsule.template)
                            if target.capsule.template_id else None)  # fmt: skip
                await tx.capsules.update(capsule_id, status=CapsuleStatus.RESUMING.value)
            request = pb.ResumeCapsuleRequest(
                capsule_id=capsule_id,
                default_user=template.default_user if template else "",
                default_env=dict(template.default_env) if template else {},
            )
            resumed = await self._transition(
                capsule_id,
                lambda: target.agent.resume_capsule(request),
                undo=CapsuleStatus.PAUSED,
                outcome=lambda answer: self._resumed(target.capsule, answer),
                audit=principal.audit("capsule.resume", "capsule", capsule_id),
            )
        return capsule_view(resumed)

    def _resumed(self, capsule: Capsule, answer: pb.Capsule) -> dict[str, Any]:
        """Row values after a resume: running, and a new run's lifetime."""
        now = self._clock()
        return {**running_values(answer, now), "expires_at": expiry(capsule.ttl_sec, now)}

    async def ping(self, principal: Principal, capsule_id: str) -> None:
        """Reset the idle timer. :raise InvalidState: not running."""
        target = await self._targets.running(principal, capsule_id)
        await target.agent.ping_capsule(capsule_id)
        await self._set(capsule_id, last_active_at=self._clock())

    # ── destroy ──

    async def destroy(self, principal: Principal, capsule_id: str) -> None:
        """Destroy the capsule on its host and hide it. :raise NotFound:"""
        async with self.locks.hold(capsule_id):
            _, host = await self._targets.find(principal, capsule_id)
            audit = principal.audit("capsule.destroy", "capsule", capsule_id)
            with anyio.CancelScope(shield=True):
                if host is not None:
                    await self._destroy_on(host, capsule_id)
                await self._set(capsule_id, status=DESTROYED, host_ip="", audit=audit)
        log.info("capsule destroyed", extra={"capsule_id": capsule_id})

    async def _destroy_on(self, host: Host, capsule_id: str) -> None:
        try:
            await self._targets.agent(host).destroy_capsule(capsule_id)
        except AgentCallError as err:
            if err.code is not ErrorCode.NOT_FOUND:
                # The row is hidden anyway; the reconciler destroys it once the host answers.
                log.warning("host %s did not destroy %s: %s", host.id, capsule_id, err.message,
                            extra={"capsule_id": capsule_id, "host_id": host.id})  # fmt: skip
        except HostUnavailable:
            pass

    # ── helpers ──

    async def within_quota(self, tx: Tx, team_id: str, adding: int = 1) -> None:
        """For verbs outside this service that start capsules (fork). :raise QuotaExceeded:"""
        await self._within_quota(tx, team_id, adding)

    async def _within_quota(self, tx: Tx, team_id: str, adding: int = 1) -> None:
        """:raise QuotaExceeded: `adding` more would take the team over its `quota` (none
        if 0)."""
        if self._quota <= 0:
            return
        await tx.teams.lock(team_id)
        held = await tx.capsules.count_holding(team_id)
        if held + adding > self._quota:
            raise QuotaExceeded(
                f"the team already has {held} capsules (its quota is {self._quota}); "
                "pause or destroy one first"
            )

    @staticmethod
    def _require(capsule: Capsule, status: CapsuleStatus) -> None:
        if capsule.status != status:
            raise InvalidState(f"capsule {capsule.id}", capsule.status, [status.value])

    async def _transition(
        self,
        capsule_id: str,
        call: Callable[[], Awaitable[T]],
        *,
        undo: CapsuleStatus,
        outcome: Callable[[T], dict[str, Any]],
        audit: AuditEvent,
    ) -> Capsule:
        """The agent half of a verb whose intent is recorded: `call` the agent, then set the
        row to `outcome(answer)` and record `audit`; the row after that. Shielded, so a client
        that hangs up cannot leave the row in its transitional status.
        :raise AgentCallError: the agent refused (the row is put back to `undo`)."""
        with anyio.CancelScope(shield=True):
            try:
                answer = await call()
            except AgentCallError:
                await self._set(capsule_id, status=undo.value)
                raise
            row = await self._set_and_get(capsule_id, audit=audit, **outcome(answer))
        if row.status == DESTROYED:
            raise NotFound("capsule", capsule_id)  # its team was deleted meanwhile
        return row

    async def _set(
        self, capsule_id: str, *, audit: AuditEvent | None = None, **values: Any
    ) -> None:
        """Update the row (and record `audit`) in one transaction."""
        async with self._db.transaction() as tx:
            await self._write(tx, capsule_id, audit, values)

    async def _set_and_get(
        self, capsule_id: str, *, audit: AuditEvent | None = None, **values: Any
    ) -> Capsule:
        """`_set`, and the row after it from the same transaction."""
        async with self._db.transaction() as tx:
            await self._write(tx, capsule_id, audit, values)
            fresh = await tx.capsules.get(capsule_id)
        assert fresh is not None
        return fresh

    @staticmethod
    async def _write(
        tx: Tx, capsule_id: str, audit: AuditEvent | None, values: dict[str, Any]
    ) -> None:
        await tx.capsules.update(capsule_id, **values)
        if audit is not None:
            await tx.audit.record(audit)
            await publish_audit(tx, audit)  # capsule.create|pause|resume|destroy: the stream


def expiry(ttl_sec: int, now: datetime) -> datetime | None:
    """When a run started `now` ends, for a lifetime of `ttl_sec` (0: never)."""
    return now + timedelta(seconds=ttl_sec) if ttl_sec > 0 else None


def candidate(host: Host, committed: Committed | None) -> Candidate:
    """A placement candidate from a host's registration, its last heartbeat and what the
    database placed on it."""
    load = host.load
    held = committed or Committed()
    return Candidate(
        host_id=host.id,
        cpu_cores=int(load.get("cpu_cores") or host.cpu_cores or 1),
        memory_total_mb=int(load.get("memory_total_mb") or host.memory_mb),
        memory_available_mb=int(load.get("memory_available_mb") or host.memory_mb),
        disk_total_mb=int(float(load.get("disk_total_gb") or host.disk_gb) * 1024),
        disk_free_mb=int(float(load.get("disk_free_gb") or host.disk_gb) * 1024),
        cpu_used_pct=float(load.get("cpu_used_pct") or 0.0),
        committed_vcpus=held.vcpus,
        committed_memory_mb=held.memory_mb,
        capsules=held.capsules,
    )
