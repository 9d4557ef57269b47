"""Fork: `count` new capsules that are copies of a running one at this instant (memory,
processes, files), on the source's host (`ForkCapsule`, `hostagent/fork.py`).

The copies' rows are made first (`pending`, under their locks, like a create's), with the
source's template, machine, idle timeout, lifetime, auto-resume and user metadata, and count
against the team's quota. The agent call and the outcome are shielded from cancellation; if the
agent fails, no copy is left (it removes what it made) and the rows are hidden. A copy is an
ordinary capsule from then on: its lifetime does not depend on the source's.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.db.capsules import DESTROYED
from nestbox.controlplane.errors import HostUnavailable, InvalidRequest
from nestbox.controlplane.services.capsules import AGENT_METADATA, expiry, running_values
from nestbox.controlplane.services.events import publish_audit
from nestbox.controlplane.services.views import capsule_view
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.ids import new_capsule_id
from nestbox.protocol.lifetime import MAX_FORKS, ForkView

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.services.capsules import CapsuleService
    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Target, Targets

log = logging.getLogger(__name__)


class ForkService:
    def __init__(
        self,
        db: Database,
        targets: Targets,
        capsules: CapsuleService,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._targets = targets
        self._capsules = capsules
        self._clock = clock

    async def fork(self, principal: Principal, capsule_id: str, count: int = 1) -> ForkView:
        """`count` (1-10) running copies of the caller's running capsule `capsule_id`.

        :raise NotFound: :raise InvalidState: not running (a paused one with `auto_resume` is
        resumed first). :raise InvalidRequest: :raise QuotaExceeded: :raise AgentCallError:
        :raise HostUnavailable:
        """
        if not 1 <= count <= MAX_FORKS:
            raise InvalidRequest(f"count must be 1 to {MAX_FORKS}")
        target = await self._targets.running(principal, capsule_id)
        ids: list[str] = [new_capsule_id() for _ in range(count)]
        async with AsyncExitStack() as held:
            for cid in ids:
                await held.enter_async_context(self._capsules.locks.hold(cid))
            await self._make_rows(principal, target.capsule, ids)
            with anyio.CancelScope(shield=True):
                view = await self._fork(principal, target, ids)
        return view

    async def _make_rows(self, principal: Principal, source: Capsule, ids: list[str]) -> None:
        user = {k: v for k, v in source.metadata.items() if k not in AGENT_METADATA}
        async with self._db.transaction() as tx:
            await self._capsules.within_quota(tx, principal.team_id, adding=len(ids))
            for cid in ids:
                await tx.capsules.create(
                    cid, team_id=source.team_id, host_id=source.host_id or "",
                    template=source.template, template_id=source.template_id,
                    vcpus=source.vcpus, memory_mb=source.memory_mb, disk_mb=source.disk_mb,
                    timeout_sec=source.timeout_sec, metadata=dict(user),
                    auto_resume=source.auto_resume, ttl_sec=source.ttl_sec,
                    on_timeout=source.on_timeout, template_type=source.template_type,
                    allow_internet_access=source.allow_internet_access,
                    egress_allow=list(source.egress_allow),
                )  # fmt: skip

    async def _fork(self, principal: Principal, target: Target, ids: list[str]) -> ForkView:
        source = target.capsule
        event = principal.audit("capsule.fork", "capsule", source.id, copies=ids,
                                host_id=target.host.id)  # fmt: skip
        request = pb.ForkCapsuleRequest(capsule_id=source.id, count=len(ids), capsule_ids=ids)
        try:
            answer = await target.agent.fork_capsule(request)
        except (AgentCallError, HostUnavailable) as err:
            async with self._db.transaction() as tx:
                for cid in ids:
                    await tx.capsules.update(cid, status=DESTROYED)
                failed = replace(event, status="error",
                                 metadata={**event.metadata, "error": err.code})  # fmt: skip
                await tx.audit.record(failed)
            raise
        now = self._clock()
        rows: list[Capsule] = []
        async with self._db.transaction() as tx:
            for copy in answer.capsules:
                row = await tx.capsules.get(copy.capsule_id)
                if row is None:
                    continue
                system = {k: v for k, v in copy.metadata.items() if k in AGENT_METADATA}
                await tx.capsules.update(
                    copy.capsule_id, started_at=now, metadata={**row.metadata, **system},
                    expires_at=expiry(row.ttl_sec, now), **running_values(copy, now),
                )  # fmt: skip
                created = principal.audit(
                    "capsule.create", "capsule", copy.capsule_id, host_id=target.host.id,
                    template=row.template, forked_from=source.id,
                )  # fmt: skip
                await tx.audit.record(created)
                await publish_audit(tx, created)  # the events stream sees each copy made
            await tx.audit.record(event)
            for cid in ids:
                fresh = await tx.capsules.get(cid)
                if fresh is not None:
                    rows.append(fresh)
        for row in rows:
            if row.status == DESTROYED:  # its team was deleted meanwhile
                await self._destroy_quietly(target, row.id)
        log.info("capsule forked", extra={"capsule_id": source.id, "count": len(ids),
                                          "paused_ms": answer.paused_ms})  # fmt: skip
        return ForkView(
            source_id=source.id,
            capsules=[capsule_view(r) for r in rows if r.status != DESTROYED],
            paused_ms=answer.paused_ms,
        )

    @staticmethod
    async def _destroy_quietly(target: Target, capsule_id: str) -> None:
        try:
            await target.agent.destroy_capsule(capsule_id)
        except (AgentCallError, HostUnavailable) as err:
            log.warning("forked copy left after its team went: %s", err,
                        extra={"capsule_id": capsule_id})  # fmt: skip
