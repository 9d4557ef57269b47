"""Changing a live capsule's idle timeout (SetIdleTimeout): the reaper reads the new value at
its next pass, and it is saved with the capsule's settings, so a pause, resume or agent restart
keeps it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.hostagent.errors import BadRequest

if TYPE_CHECKING:
    from nestbox.hostagent.managed import CapsuleView
    from nestbox.hostagent.manager import CapsuleManager

MAX_IDLE_TIMEOUT_S = 30 * 86400


async def set_idle_timeout(manager: CapsuleManager, capsule_id: str, seconds: int) -> CapsuleView:
    """Set the capsule's idle timeout (0 = never auto-pause), whatever its state; the idle
    clock is not reset. :raise CapsuleNotFound: :raise BadRequest:"""
    if not 0 <= seconds <= MAX_IDLE_TIMEOUT_S:
        raise BadRequest(f"idle timeout must be 0 to {MAX_IDLE_TIMEOUT_S} s")
    await manager.runtime.set_fields(capsule_id, idle_timeout_s=seconds)
    return manager.view(capsule_id)
