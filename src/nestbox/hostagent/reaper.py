"""The idle reaper: pauses running capsules idle longer than their idle timeout.

Idle means no exec, PTY input, file operation, ping, proxied request or streamed output for
`idle_timeout_s` seconds (0 = never). A capsule whose pause fails is destroyed, as in the seed
(a capsule that can neither run on unattended nor be paused must not hold its slot). The ids
it paused are reported once by the next ListCapsules (`auto_paused_ids`), which is how the
control plane learns of them. Runs for the agent's life in the app's task group.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.capsule import CapsuleNotFound, InvalidState
from nestbox.hostagent.errors import CapsuleFailed

if TYPE_CHECKING:
    from nestbox.hostagent.manager import CapsuleManager

log = logging.getLogger(__name__)


async def reap_idle(manager: CapsuleManager, interval_s: float = 2.0) -> None:
    """Every `interval_s`, pause the expired capsules. Never returns; never raises."""
    while True:
        await anyio.sleep(interval_s)
        await reap_once(manager)


async def reap_once(manager: CapsuleManager) -> list[str]:
    """One sweep: pause (at most `pause_concurrency` at a time) every expired capsule.
    Returns the ids it paused."""
    expired = manager.expired()
    paused: list[str] = []
    if not expired:
        return paused
    limiter = anyio.CapacityLimiter(manager.settings.pause_concurrency)

    async def one(capsule_id: str) -> None:
        async with limiter:
            if await _reap(manager, capsule_id):
                paused.append(capsule_id)

    async with anyio.create_task_group() as tg:
        for capsule_id in expired:
            tg.start_soon(one, capsule_id)
    return paused


async def _reap(manager: CapsuleManager, capsule_id: str) -> bool:
    try:
        if not await manager.pause(capsule_id, only_if_idle=True):
            return False  # activity while it waited for the capsule's lock
    except (CapsuleNotFound, InvalidState, CapsuleFailed):
        return False  # destroyed, paused or failed meanwhile
    except Exception as err:
        log.warning("auto-pause failed (%s); destroying the capsule", err,
                    extra={"capsule_id": capsule_id})  # fmt: skip
        try:
            await manager.destroy(capsule_id)
        except Exception as destroy_err:
            log.error("destroy after a failed auto-pause: %s", destroy_err,
                      extra={"capsule_id": capsule_id})  # fmt: skip
        return False
    manager.record_auto_paused(capsule_id)
    log.info("capsule auto-paused after its idle timeout", extra={"capsule_id": capsule_id})
    return True
