"""What the port proxy needs from the rest of the agent: a way to find a capsule's address
and hold it busy (`CapsuleTargets`), and the per-capsule in-flight counter that a pause
drains (`ConnTracker`, the seed's host-side `conntracker.go`).

No HTTP here: the manager implements `CapsuleTargets` with one `ConnTracker` per capsule, and
`proxy.py` turns the errors below into 404/503 answers.

    ProxyTargetError          root
    ├── TargetNotFound        no such capsule on this agent (404)
    └── TargetUnavailable     the capsule exists but takes no proxied traffic now (503)
        └── Draining          it is being paused: in-flight requests are finishing
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable


class ProxyTargetError(Exception):
    """Root of the errors `CapsuleTargets.acquire` raises."""


class TargetNotFound(ProxyTargetError):
    """No capsule with this id runs on this agent."""


class TargetUnavailable(ProxyTargetError):
    """The capsule takes no proxied traffic right now (starting, paused, being destroyed)."""


class Draining(TargetUnavailable):
    """The capsule is being paused; new proxied requests are refused until it resumes."""


class Lease(NamedTuple):
    """A capsule's host-facing address, held until `release()` is called (exactly once)."""

    address: str
    release: Callable[[], None]


class CapsuleTargets(Protocol):
    """Where proxied traffic for a capsule goes."""

    def acquire(self, capsule_id: str) -> Lease:
        """The capsule's address, counted as in flight until the lease is released.

        :raise TargetNotFound: no such capsule.
        :raise TargetUnavailable: it cannot take traffic now (`Draining` while pausing).
        """
        ...


@dataclass(frozen=True, slots=True)
class TrackerStatistics:
    active: int
    draining: bool


class ConnTracker:
    """Counts one capsule's in-flight proxied requests so a pause can wait for them.

    Invariant: `_active` is the number of successful `acquire()`s not yet released. All calls
    happen on the event loop and `acquire` does not await, so no drain can start between its
    check and its count: no lock, and no second check (the seed needs one after its WaitGroup
    add because its goroutines run in parallel).
    """

    def __init__(self) -> None:
        self._active = 0
        self._draining = False
        self._changed: anyio.Event | None = None  # set (then dropped) at 0 active or on reset

    def acquire(self) -> None:
        """Count one request in. :raise Draining: a drain is under way."""
        if self._draining:
            raise Draining("the capsule is being paused")
        self._active += 1

    def release(self) -> None:
        """Count one request out."""
        if self._active <= 0:
            raise RuntimeError("ConnTracker.release() without a matching acquire()")
        self._active -= 1
        if self._active == 0:
            self._wake()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to `timeout_s` seconds for in-flight ones to finish
        (or for `reset()`). Returns True when none is left. Draining stays on until `reset()`."""
        self._draining = True
        with anyio.move_on_after(timeout_s):
            while self._active > 0 and self._draining:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        return self._active == 0

    def reset(self) -> None:
        """Accept requests again (after a resume, or when a pause failed); wakes a drain."""
        self._draining = False
        self._wake()

    def statistics(self) -> TrackerStatistics:
        return TrackerStatistics(active=self._active, draining=self._draining)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
