"""What the manager keeps per capsule on top of the VM runtime's `Capsule`: the envd client of
the current run, the proxy's connection tracker, the metrics ring and sampler, the calls in
flight into the guest, the last activity, and the agent-level settings (`CapsuleMeta`,
persisted beside the capsule's disk so an agent restart keeps them).

No VM or network work here: `manager.py` decides, `runtime.py` acts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError

from nestbox.hostagent.durable import write_atomic
from nestbox.hostagent.errors import CapsuleFailed, StreamInterrupted
from nestbox.hostagent.metrics import MetricsRing
from nestbox.hostagent.proxytrack import ConnTracker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from nestbox.hostagent.capsule import CapsuleState
    from nestbox.hostagent.envdconn import CapsuleEnvd

log = logging.getLogger(__name__)

META_FILE = "agent.json"
"""In the capsule's directory, which the runtime removes with the capsule."""


class CapsuleMeta(BaseModel):
    """The agent-level settings of a capsule (the runtime's record holds the machine)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    team_id: str = ""
    idle_timeout_s: int = 0
    """0 = never auto-pause."""
    egress: bool = False
    created_at_unix_ms: int = 0


def read_meta(capsule_dir: Path) -> CapsuleMeta:
    """The saved meta, or defaults if there is none (a capsule made by an older agent)."""
    try:
        return CapsuleMeta.model_validate_json((capsule_dir / META_FILE).read_bytes())
    except (OSError, ValidationError):
        return CapsuleMeta()


def write_meta(capsule_dir: Path, meta: CapsuleMeta) -> None:
    """Durably replace the saved meta (temporary file, fsync, rename, fsync the directory).
    Blocking: call it in a worker thread."""
    write_atomic(capsule_dir / META_FILE, meta.model_dump_json())


@dataclass(frozen=True, slots=True)
class CapsuleView:
    """One capsule as ListCapsules shows it; `state` is the runtime's state or `error`."""

    capsule_id: str
    state: CapsuleState | str
    template_id: str
    meta: CapsuleMeta
    vcpus: int = 0
    memory_mib: int = 0
    host_address: str | None = None
    last_active_unix_ms: int = 0
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class ManagedCapsule:
    """The manager's state for one capsule. Lifecycle verbs hold `lock`; guest calls do not
    (many may run at once) but register in `_calls` so that a pause can interrupt them."""

    def __init__(self, capsule_id: str, meta: CapsuleMeta) -> None:
        self.id = capsule_id
        self.meta = meta
        # Serialises this capsule's lifecycle verbs (create, pause, resume, template, destroy,
        # the reaper's pause): `envd`, `error`, the sampler and the tracker's draining state
        # change only while it is held (or from the VM-exit callback, which only marks).
        self.lock = anyio.Lock()
        self.envd: CapsuleEnvd | None = None
        self.tracker = ConnTracker()
        self.metrics = MetricsRing()
        self.sampler: anyio.CancelScope | None = None
        self.error: str | None = None
        self.creating = True
        self.envd_version = ""
        self._calls: set[anyio.CancelScope] = set()
        self._last_active = time.monotonic()
        self._last_active_wall = time.time()

    # ── activity ────────────────────────────────────────────────────────────────────────

    def touch(self) -> None:
        """Count as activity now (resets the idle timer)."""
        self._last_active = time.monotonic()
        self._last_active_wall = time.time()

    def idle_s(self) -> float:
        return time.monotonic() - self._last_active

    def last_active_unix_ms(self) -> int:
        return int(self._last_active_wall * 1000)

    def is_idle_expired(self) -> bool:
        timeout = self.meta.idle_timeout_s
        return timeout > 0 and self.idle_s() > timeout

    # ── calls into the guest ────────────────────────────────────────────────────────────

    def require_envd(self) -> CapsuleEnvd:
        """:raise CapsuleFailed: the capsule is in `error`. The caller checked the state."""
        if self.error is not None:
            raise CapsuleFailed(f"capsule {self.id} failed: {self.error}")
        if self.envd is None:
            raise StreamInterrupted(f"capsule {self.id} is not running")
        return self.envd

    @contextlib.contextmanager
    def call_scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that `interrupt_calls()` cancels; a call it cut raises
        `StreamInterrupted`. Use it only around code that runs in one task (no yields of an
        async generator inside)."""
        scope = anyio.CancelScope()
        self._calls.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._calls.discard(scope)
        if scope.cancelled_caught:
            raise StreamInterrupted(f"capsule {self.id} was paused or stopped during the call")

    def add_call(self, scope: anyio.CancelScope) -> None:
        self._calls.add(scope)

    def remove_call(self, scope: anyio.CancelScope) -> None:
        self._calls.discard(scope)

    def interrupt_calls(self) -> int:
        """Cancel every call in flight (after the VM stopped: their sockets are dead)."""
        calls = list(self._calls)
        for scope in calls:
            scope.cancel()
        return len(calls)

    # ── the run (what exists only while the VM runs) ────────────────────────────────────

    def stop_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
            self.sampler = None

    async def end_run(self) -> None:
        """Stop sampling, cut the calls in flight and close the envd client (idempotent)."""
        self.stop_sampler()
        self.interrupt_calls()
        envd, self.envd = self.envd, None
        if envd is not None:
            with anyio.CancelScope(shield=True):
                await envd.aclose()
