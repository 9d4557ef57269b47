"""A capsule: its state machine, its one on-disk record, its one live registry entry
(`Capsule`: the record, the running VM if any, the lock and what the service tracks per
capsule) and its errors.

    CapsuleError
    ├── CapsuleNotFound   no capsule with that id on this agent
    ├── InvalidState      the operation is not allowed in the capsule's current state
    └── GuestUnreachable  envd did not answer in time after a boot or restore

A failed teardown raises `undo.TeardownError` (not a `CapsuleError`: slot networks unwind too).

State machine (QEMU `Runstate` style: an enum plus the table of legal moves, `TRANSITIONS`;
ARCHITECTURE.md draws the same table):

    STARTING ──> RUNNING ──> PAUSING ──> PAUSED ──> RESUMING ──> RUNNING
                  ^  │  ^        │                     │
                  │  │  └────────┘ save failed:        └──> PAUSED (restore failed)
                  │  │             the guest runs on
                  │  └──> SNAPSHOTTING ──> STOPPED (consumed into a template)
                  └────────┘ save failed
    any state but STOPPED ──> STOPPING ──> STOPPED
    any state but STOPPED ──> ERROR (its VM died or could not be taken back) ──> STOPPED

An ERROR capsule has nothing left (no VM, files or record on disk): it stays listed, with the
reason in `CapsuleRecord.error`, until it is destroyed.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path  # noqa: TC003 (pydantic needs it at runtime)
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nestbox.hostagent.durable import fsync_path, write_atomic
from nestbox.hostagent.metrics import MetricsRing, Sampling
from nestbox.hostagent.proxytrack import ConnTracker
from nestbox.hostagent.undo import UndoStack
from nestbox.hostagent.vmm.base import RamSpec

if TYPE_CHECKING:
    from nestbox.hostagent.envdconn import CapsuleEnvd
    from nestbox.hostagent.lifecycle import Run

log = logging.getLogger(__name__)


class CapsuleState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    SNAPSHOTTING = "snapshotting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


S = CapsuleState
TRANSITIONS: dict[CapsuleState, frozenset[CapsuleState]] = {
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.ERROR}),
    S.RUNNING: frozenset({S.PAUSING, S.SNAPSHOTTING, S.STOPPING, S.ERROR}),
    S.PAUSING: frozenset({S.PAUSED, S.RUNNING, S.STOPPING, S.ERROR}),
    S.PAUSED: frozenset({S.RESUMING, S.STOPPING, S.ERROR}),
    S.RESUMING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.ERROR}),
    S.SNAPSHOTTING: frozenset({S.STOPPED, S.RUNNING, S.STOPPING, S.ERROR}),
    S.STOPPING: frozenset({S.STOPPED, S.ERROR}),
    S.STOPPED: frozenset(),
    S.ERROR: frozenset({S.STOPPED}),
}


class CapsuleError(Exception):
    """Root of the capsule lifecycle's errors."""


class CapsuleNotFound(CapsuleError):
    def __init__(self, capsule_id: str) -> None:
        super().__init__(f"capsule {capsule_id} does not exist")
        self.capsule_id = capsule_id


class InvalidState(CapsuleError):
    """The capsule is in `current`; the operation needs one of `required`."""

    def __init__(
        self, capsule_id: str, current: CapsuleState, required: frozenset[CapsuleState]
    ) -> None:
        need = ", ".join(sorted(required)) or "nothing"
        super().__init__(f"capsule {capsule_id} is {current}; needs {need}")
        self.capsule_id = capsule_id
        self.current = current
        self.required = required


class GuestUnreachable(CapsuleError):
    """envd did not answer `/health` (or `/init`) before the deadline."""

    def __init__(self, capsule_id: str, step: str, detail: str = "") -> None:
        super().__init__(f"capsule {capsule_id}: envd unreachable during {step} {detail}".strip())
        self.capsule_id = capsule_id
        self.step = step


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_capsule_id() -> str:
    """`cl-` + 25 lowercase base36 characters (Wrenn's format)."""
    return "cl-" + "".join(secrets.choice(_BASE36) for _ in range(25))


RamMode = Literal["anonymous", "template", "shared"]
"""How the running VM's RAM is mapped: anonymous memory; the template's RAM file copy-on-write
(a clone, until its first pause); or a RAM file of its own mapped shared (a VM whose snapshot
becomes a template)."""


class MachineRecord(BaseModel):
    """The machine a capsule's snapshot must be restored into (same devices and sizes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: Path
    initrd: Path | None
    cmdline: str
    vcpus: int
    memory_mib: int
    image_version: str


class CapsuleRecord(BaseModel):
    """`<state_dir>/capsules/<id>.json`, the capsule's one record (the machine, the run, the
    envd tokens and the service's settings of it): enough to re-adopt a running VM or resume a
    paused one after an agent restart. Replaced whole and atomically on every change
    (`write_record`). Records of agents before the merge kept the service's settings in
    `<dir>/agent.json`; `migrate_legacy_meta` folds that file in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    template_id: str
    state: CapsuleState
    machine: MachineRecord
    ram: RamMode
    ram_file: Path | None = None
    template_dir: Path | None = None
    """The template version a clone's disk (and RAM, until its first pause) is based on."""
    dir: Path
    disk: Path
    snapshot: Path | None = None
    """The state file: while PAUSED and RESUMING, and while PAUSING where it will be (it is
    renamed into place only once complete, so a PAUSING record whose snapshot exists is a
    pause that finished)."""
    slot: int | None = None
    host_address: str | None = None
    pid: int | None = None
    """The VMM of the current run. Recorded as soon as the process exists, before the agent
    waits for anything (the VMM's API, the restore, envd), and kept through PAUSING and
    SNAPSHOTTING, so that start-up recovery always finds the VM an interrupted operation left."""
    staging: Path | None = None
    """While SNAPSHOTTING: the template staging directory being filled (recovery removes it)."""
    default_user: str = "root"
    env_vars: dict[str, str] = Field(default_factory=dict)
    default_workdir: str | None = None
    """Sent in the /init of a create (a built template's WORKDIR); a snapshot keeps it."""
    access_token: str | None = None
    """The token envd holds (`X-Access-Token` on every call to it; the record is 0600). A clone
    starts with its template's, a cold boot with none (envd is open until its first `/init`)."""
    pending_token: str | None = None
    """The fresh token the `/init` in flight sets (create, resume): recorded (with STARTING or
    RESUMING) before that `/init` is sent, and moved to `access_token` in the write that records
    RUNNING after its answer. A crash in between leaves a STARTING or RESUMING record, whose VM
    recovery kills: the token dies with it (a resumed snapshot's envd holds `access_token`)."""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    team_id: str = ""
    idle_timeout_s: int = 0
    """Auto-pause after this long without activity (0 = never; the reaper)."""
    egress: bool = False
    """Outbound internet from the guest (every run's slot network is made with it)."""
    egress_allow: list[str] = Field(default_factory=list)
    """With `egress`: the only CIDRs / host names it may reach (`network/egress.py`)."""
    template_kind: Literal["snapshot", "base"] = "snapshot"
    """The kind of template it came from: a snapshot's machine is the template's, a base
    template's the one the create asked for."""
    error: str | None = None
    """Why the capsule is in ERROR (in memory only: an ERROR capsule has no record on disk)."""

    def moved_to(self, state: CapsuleState) -> CapsuleRecord:
        """A copy in `state`. :raise InvalidState: the move is not in `TRANSITIONS`."""
        if state not in TRANSITIONS[self.state]:
            raise InvalidState(self.id, self.state, frozenset({state}))
        return self.model_copy(update={"state": state})

    @property
    def pause_snapshot(self) -> Path:
        """Where a pause writes the capsule's snapshot."""
        return self.dir / "snapshot.state"

    @property
    def run_dir(self) -> Path:
        """The VMM's runtime files (API socket, pid file, serial and VMM logs)."""
        return self.dir / "run"

    def ram_spec(self) -> RamSpec:
        """Where the VM's RAM lives, as `ram` and `ram_file` say: anonymous memory, the
        template's RAM file copy-on-write, or a RAM file of its own mapped shared."""
        if self.ram == "anonymous" or self.ram_file is None:
            return RamSpec()
        return RamSpec(file=self.ram_file, share=self.ram == "shared")


class Capsule:
    """The agent's one live entry for a capsule, from the moment its create starts until it is
    destroyed: the record (`record`, mirrored on disk), the current run (VM, slot lease, envd
    client) if it runs, the files' undo stack, and what the service tracks while it runs (the
    proxy's connection tracker, the metrics ring and sampler, the calls in flight into the
    guest, the last activity, envd's version).

    `lock` serialises the capsule's lifecycle verbs (create, pause, resume, template, destroy,
    the reaper's pause, the exit watcher's clean-up): the record, `run`, `files`, the sampler
    and the tracker's draining state change only while it is held. It is the capsule's only
    lock. Guest calls do not take it (many run at once) but register in `calls` so that the end
    of a run cuts them."""

    def __init__(self, record: CapsuleRecord, files: UndoStack | None = None) -> None:
        self.record = record
        self.files = files if files is not None else UndoStack(f"capsule {record.id} files")
        self.run: Run | None = None
        self.lock = anyio.Lock()
        self.watch: anyio.CancelScope | None = None
        self.tracker = ConnTracker()
        self.metrics = MetricsRing()
        self.sampler: Sampling | None = None
        self.envd_version = ""
        self.calls: set[anyio.CancelScope] = set()
        self._last_active = time.monotonic()
        self._last_active_wall = time.time()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> CapsuleState:
        return self.record.state

    @property
    def envd(self) -> CapsuleEnvd:
        """The envd client of the running VM. :raise InvalidState: not running."""
        if self.run is None:
            raise InvalidState(self.id, self.state, frozenset({CapsuleState.RUNNING}))
        return self.run.envd

    @property
    def pid(self) -> int | None:
        return self.run.pid if self.run else None

    @property
    def host_address(self) -> str | None:
        return self.run.network.host_address if self.run else None

    # ── activity (the idle reaper's clock) ──────────────────────────────────────────────

    def touch(self) -> None:
        """Count as activity now (resets the idle timer)."""
        self._last_active = time.monotonic()
        self._last_active_wall = time.time()

    def idle_s(self) -> float:
        return time.monotonic() - self._last_active

    def last_active_unix_ms(self) -> int:
        return int(self._last_active_wall * 1000)

    def is_idle_expired(self) -> bool:
        timeout = self.record.idle_timeout_s
        return timeout > 0 and self.idle_s() > timeout

    # ── what ends with the run ──────────────────────────────────────────────────────────

    def stop_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
            self.sampler = None

    def interrupt_calls(self) -> int:
        """Cancel every call in flight (after the VM stopped: their sockets are dead)."""
        calls = list(self.calls)
        for scope in calls:
            scope.cancel()
        return len(calls)


def records_dir(state_dir: Path) -> Path:
    return state_dir / "capsules"


def write_record(state_dir: Path, record: CapsuleRecord) -> None:
    """Durably replace the record file (`write_atomic`). Blocking: call it in a worker thread."""
    write_atomic(records_dir(state_dir) / f"{record.id}.json", record.model_dump_json(indent=2))


def remove_record(state_dir: Path, capsule_id: str) -> None:
    """Remove the record durably (the capsule's files are removed after it, never before)."""
    (records_dir(state_dir) / f"{capsule_id}.json").unlink(missing_ok=True)
    fsync_path(records_dir(state_dir))


def read_records(state_dir: Path) -> list[CapsuleRecord]:
    """Every readable record on disk; an unreadable one is logged and skipped (start-up
    recovery removes it as a stray)."""
    base = records_dir(state_dir)
    records = []
    for path in sorted(base.glob("*.json")) if base.is_dir() else []:
        try:
            records.append(CapsuleRecord.model_validate_json(path.read_bytes()))
        except (OSError, ValidationError) as err:
            log.error("unreadable capsule record %s: %s", path.name, err)
    return records


LEGACY_META_FILE = "agent.json"
"""Where agents before the one-record merge kept a capsule's service settings (team, idle
timeout, egress, creation time), beside its disk."""


def migrate_legacy_meta(state_dir: Path, record: CapsuleRecord) -> CapsuleRecord:
    """`record` with its legacy `agent.json` folded in (then written, then that file removed),
    or as it is when there is none. A crash in between leaves both, and the next start folds
    the same values in again. Blocking: call it in a worker thread."""
    legacy = record.dir / LEGACY_META_FILE
    try:
        doc = json.loads(legacy.read_bytes())
    except FileNotFoundError:
        return record
    except (OSError, ValueError) as err:
        log.warning("unreadable %s of capsule %s ignored: %s", LEGACY_META_FILE, record.id, err)
        doc = {}
    update: dict[str, object] = {}
    if isinstance(doc, dict):
        if isinstance(doc.get("team_id"), str):
            update["team_id"] = doc["team_id"]
        if isinstance(doc.get("idle_timeout_s"), int):
            update["idle_timeout_s"] = doc["idle_timeout_s"]
        if isinstance(doc.get("egress"), bool):
            update["egress"] = doc["egress"]
        if isinstance(ms := doc.get("created_at_unix_ms"), int) and ms > 0:
            update["created_at"] = datetime.fromtimestamp(ms / 1000, UTC)
    record = record.model_copy(update=update)
    write_record(state_dir, record)
    legacy.unlink(missing_ok=True)
    fsync_path(record.dir)
    log.info("capsule record migrated: %s folded in", LEGACY_META_FILE,
             extra={"capsule_id": record.id})  # fmt: skip
    return record
