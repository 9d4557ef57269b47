"""A capsule's lifetime: its idle timeout changed while it lives, an absolute lifetime per run
(`ttl_sec`, then `on_timeout`: pause or destroy), and auto-resume.

- `set_timeout`: the idle timeout goes to the agent (its reaper reads it; raised to
  `MIN_IDLE_TIMEOUT_S` as at create) and the row; a new `ttl_sec` restarts the running
  capsule's lifetime from now.
- `expire_due` (the `lifetimes` loop, every `lifetime_interval_s`): running capsules whose
  `expires_at` passed are paused (or destroyed) through the ordinary verbs, so their rows,
  locks and audit trail are as for a user's call. A capsule whose lock a call holds waits for
  the next pass; a conditional update claims each one (one control plane ends it, however
  many share the database). A resume starts a new run with the same lifetime
  (`CapsuleService.resume`).
- `ensure_running` (`Targets.running` calls it before any guest call: exec, processes, files,
  PTY, streams): a paused (or pausing) capsule created with `auto_resume` is resumed first,
  instead of answering 409. Concurrent calls resume it once: the others wait on its lock and
  find it running.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from nestbox.controlplane.db.capsules import Expect
from nestbox.controlplane.errors import InvalidRequest, InvalidState, NotFound
from nestbox.controlplane.services.capsules import MIN_IDLE_TIMEOUT_S, expiry
from nestbox.controlplane.services.principal import Principal
from nestbox.controlplane.services.views import capsule_view
from nestbox.protocol.accounts import Role
from nestbox.protocol.capsules import CapsuleStatus

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.services.capsules import CapsuleService
    from nestbox.controlplane.services.targets import Targets
    from nestbox.protocol.capsules import CapsuleView

log = logging.getLogger(__name__)

LIVE = (CapsuleStatus.RUNNING.value, CapsuleStatus.PAUSED.value)
"""Where a timeout can change (a transitional capsule belongs to the call moving it)."""
RESUMABLE = (CapsuleStatus.PAUSED.value, CapsuleStatus.PAUSING.value)


def system_principal(team_id: str) -> Principal:
    """Acts for the platform in a team (the lifetime loop's pauses and destroys)."""
    return Principal(team_id=team_id, role=Role.OWNER, user_id=None, name="lifetime")


class LifetimeService:
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

    # ── timeouts ──

    async def set_timeout(
        self,
        principal: Principal,
        capsule_id: str,
        *,
        timeout_sec: int | None = None,
        ttl_sec: int | None = None,
        on_timeout: str | None = None,
    ) -> CapsuleView:
        """Change the idle timeout (`timeout_sec`, 0 = never), the lifetime (`ttl_sec`,
        counted from now for a running capsule; 0 = none) and/or what ends it.

        :raise NotFound: :raise InvalidState: not running or paused. :raise InvalidRequest:
        :raise AgentCallError:
        """
        if timeout_sec is None and ttl_sec is None and on_timeout is None:
            raise InvalidRequest("give timeout_sec, ttl_sec or on_timeout")
        async with self._capsules.locks.hold(capsule_id):
            target = await self._targets.target(principal, capsule_id)
            capsule = target.capsule
            if capsule.status not in LIVE:
                raise InvalidState(f"capsule {capsule_id}", capsule.status, LIVE)
            values: dict[str, Any] = {}
            if timeout_sec is not None:
                timeout = timeout_sec and max(timeout_sec, MIN_IDLE_TIMEOUT_S)
                await target.agent.set_idle_timeout(capsule_id, timeout)
                values["timeout_sec"] = timeout
            if ttl_sec is not None:
                values["ttl_sec"] = ttl_sec
                running = capsule.status == CapsuleStatus.RUNNING
                values["expires_at"] = expiry(ttl_sec, self._clock()) if running else None
            if on_timeout is not None:
                values["on_timeout"] = on_timeout
            changed = {k: v for k, v in values.items() if k != "expires_at"}
            event = principal.audit("capsule.timeout", "capsule", capsule_id, **changed)
            async with self._db.transaction() as tx:
                await tx.capsules.update(capsule_id, **values)
                await tx.audit.record(event)
                fresh = await tx.capsules.get(capsule_id)
        if fresh is None or fresh.status == "destroyed":
            raise NotFound("capsule", capsule_id)
        return capsule_view(fresh)

    # ── auto-resume ──

    async def ensure_running(self, principal: Principal, capsule: Capsule) -> bool:
        """Resume `capsule` (the caller's, as just read) if it is paused or pausing and was
        created with `auto_resume`. Returns whether it asked for a resume."""
        if not capsule.auto_resume or capsule.status not in RESUMABLE:
            return False
        # InvalidState: another call resumed it meanwhile (or it went: the caller sees that)
        with contextlib.suppress(InvalidState):
            await self._capsules.resume(principal, capsule.id)
        log.info("capsule auto-resumed", extra={"capsule_id": capsule.id})
        return True

    # ── the lifetime loop ──

    async def expire_due(self) -> list[str]:
        """Pause (or destroy) running capsules whose run's lifetime ended. Returns their ids."""
        async with self._db.transaction() as tx:
            due = await tx.capsules.expired(self._clock(), (CapsuleStatus.RUNNING.value,))
        ended: list[str] = []
        for capsule in due:
            if self._capsules.locks.held(capsule.id) or not await self._claim(capsule):
                continue  # a call (or another control plane) is moving it
            try:
                await self._end(capsule)
            except (InvalidState, NotFound):
                continue  # it moved meanwhile
            except Exception as err:  # one capsule's failure must not stop the others
                log.warning("ending a capsule at its lifetime failed: %r", err,
                            extra={"capsule_id": capsule.id})  # fmt: skip
                async with self._db.transaction() as tx:  # the next pass tries again
                    await tx.capsules.update(capsule.id, expires_at=capsule.expires_at)
                continue
            ended.append(capsule.id)
        return ended

    async def _claim(self, capsule: Capsule) -> bool:
        """Take the ended lifetime (clear `expires_at` if the row is as read), so that of
        several control planes on one database only one ends the capsule."""
        expect = Expect(capsule.status, capsule.last_updated)
        async with self._db.transaction() as tx:
            return await tx.capsules.update(capsule.id, expect=expect, expires_at=None)

    async def _end(self, capsule: Capsule) -> None:
        principal = system_principal(capsule.team_id)
        if capsule.on_timeout == "destroy":
            await self._capsules.destroy(principal, capsule.id)
        else:
            await self._capsules.pause(principal, capsule.id)
        log.info("capsule lifetime ended: %s", capsule.on_timeout,
                 extra={"capsule_id": capsule.id})  # fmt: skip

    async def run(
        self, interval_s: float, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """`expire_due` every `interval_s` until cancelled."""
        task_status.started()
        while True:
            await anyio.sleep(interval_s)
            try:
                await self.expire_due()
            except Exception as err:  # the next round tries again; the loop must live on
                log.error("lifetime round failed: %r", err)
                log.debug("lifetime round traceback", exc_info=err)
