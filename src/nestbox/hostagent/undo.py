"""Undo stacks: what exists is exactly what the stack says exists.

Every step that makes something pushes its undo on an `UndoStack` right after it succeeds. If a
later step fails or the caller cancels, `unwind` runs the undos in reverse, shielded from the
cancellation, under its own deadline, attempting every one and collecting the failures
(`TeardownError`). Used by the capsule lifecycle (`lifecycle`, `runtime`) and by the slot
networks (`network.pool`), so it imports nothing of the agent's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class TeardownError(Exception):
    """Undo steps failed; `errors` holds each failure (every step was still attempted)."""

    def __init__(self, what: str, errors: list[BaseException]) -> None:
        super().__init__(
            f"{what}: {len(errors)} undo step(s) failed: " + "; ".join(repr(e) for e in errors)
        )
        self.what = what
        self.errors = errors


class UndoStack(contextlib.AsyncExitStack):
    """An AsyncExitStack whose async undos never stop the unwinding: each failure is logged
    and kept in `errors`, and the next undo runs."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.errors: list[BaseException] = []

    def push_async_callback(
        self, callback: Callable[..., Awaitable[Any]], /, *args: Any, **kwds: Any
    ) -> Callable[..., Awaitable[Any]]:
        async def guarded() -> None:
            try:
                await callback(*args, **kwds)
            except Exception as err:
                log.warning("undo step of %s failed: %r", self.what, err)
                self.errors.append(err)

        super().push_async_callback(guarded)
        return callback


async def unwind(stack: UndoStack, within: float) -> None:
    """Run every undo of `stack` (reverse order), shielded, within `within` seconds (the
    teardown's own deadline: the caller's may be what was just cancelled).

    :raise TeardownError: some undo failed or the deadline passed (all were attempted).
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(within) as scope:
        await stack.aclose()
    if scope.cancelled_caught:
        stack.errors.append(TimeoutError(f"teardown exceeded {within:g} s"))
    if stack.errors:
        raise TeardownError(stack.what, stack.errors)


async def unwind_after_failure(stack: UndoStack, within: float) -> None:
    """`unwind` while another exception is propagating: undo failures are logged (and the
    original exception, or the cancellation, is what the caller sees)."""
    try:
        await unwind(stack, within)
    except TeardownError as err:
        log.error("%s", err)
