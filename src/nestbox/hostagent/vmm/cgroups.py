"""One cgroup per VM: memory, CPU and pids limits, on cgroup v2 or v1 behind one interface.

Layout: `<root>/<parent>/<agent-id>/<vm>` on v2 (a pure unified hierarchy: the host has
`<root>/cgroup.controllers`), `<root>/<controller>/<parent>/<agent-id>/<vm>` for each of the
`memory`, `cpu` and `pids` v1 hierarchies otherwise (hybrid hosts like ours). The VM's cgroup is
made and limited before its VMM starts, and the VMM's process joins it before QEMU is `exec`ed
(`confine.Confinement.wrap`), so every page of guest RAM is charged to it (v1 charges memory
where it was first touched, and never moves a charge with the task). A controller the host
lacks is left out and reported (`missing`); nothing here fails because of it.

Everything here is small synchronous file I/O on cgroupfs; callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
RMDIR_RETRY_S = 2.0
"""A VMM that just exited may still be counted in its cgroup for a moment (until it is reaped);
removal retries on EBUSY this long."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int
    """Hard memory limit (no swap beyond it)."""
    cpus: float
    """CPU bandwidth in cores (CFS quota / period)."""
    pids: int
    """Tasks (processes and threads) at most."""


@dataclass(frozen=True, slots=True)
class Cgroups:
    """This agent's cgroups. `version` None: no usable controller (everything off)."""

    version: Literal[1, 2] | None
    root: Path
    """Where the hierarchies are mounted (normally /sys/fs/cgroup)."""
    bases: dict[str, Path]
    """controller -> this agent's directory in that controller's hierarchy (v2: the same
    directory for every controller)."""
    missing: dict[str, str]
    """controller -> why it is not used."""

    @classmethod
    def detect(cls, root: Path, parent: str, agent_id: str) -> Cgroups:
        """What the host offers under `root` (normally /sys/fs/cgroup)."""
        rel = Path(parent) / agent_id
        if (root / "cgroup.controllers").is_file():
            available = set(_read(root / "cgroup.controllers").split())
            bases = {c: root / rel for c in CONTROLLERS if c in available}
            missing = {c: "not in cgroup.controllers" for c in CONTROLLERS if c not in available}
            return cls(2, root, bases, missing)
        bases, missing = {}, {}
        for c in CONTROLLERS:
            if (root / c / "cgroup.procs").is_file():
                bases[c] = root / c / rel
            else:
                missing[c] = f"no cgroup v1 hierarchy at {root / c}"
        if not bases:
            why = {c: f"no cgroup v2, and no v1 {c} hierarchy, under {root}" for c in CONTROLLERS}
            return cls(None, root, {}, why)
        return cls(1, root, bases, missing)

    @property
    def enabled(self) -> bool:
        return bool(self.bases)

    def dirs(self, name: str) -> list[Path]:
        """The VM's cgroup directories (one per hierarchy)."""
        return sorted({base / name for base in self.bases.values()})

    def create(self, name: str, limits: Limits) -> list[Path]:
        """Make the VM's cgroup and set its limits; return the `cgroup.procs` files the VMM's
        process writes its pid into. An existing one (a removal that failed) is reused.

        :raise OSError:
        """
        if self.version == 2:
            self._enable_v2_controllers()
        for d in self.dirs(name):
            d.mkdir(parents=True, exist_ok=True)
        for controller, base in self.bases.items():
            for file, value in self._limit_files(controller, limits):
                _write(base / name / file, value)
        return [d / "cgroup.procs" for d in self.dirs(name)]

    def _limit_files(self, controller: str, limits: Limits) -> list[tuple[str, str]]:
        quota = max(1000, round(limits.cpus * CFS_PERIOD_US))
        mem = str(limits.memory_bytes)
        if self.version == 2:
            return {
                "memory": [("memory.max", mem), ("memory.swap.max?", "0")],
                "cpu": [("cpu.max", f"{quota} {CFS_PERIOD_US}")],
                "pids": [("pids.max", str(limits.pids))],
            }[controller]
        return {
            # memsw (RAM + swap) exists only with swap accounting; set after the RAM limit,
            # which it may never be below.
            "memory": [("memory.limit_in_bytes", mem), ("memory.memsw.limit_in_bytes?", mem)],
            "cpu": [("cpu.cfs_period_us", str(CFS_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))],
            "pids": [("pids.max", str(limits.pids))],
        }[controller]

    def _enable_v2_controllers(self) -> None:
        """v2 hands a controller to children only when every ancestor enables it in
        `cgroup.subtree_control` (the root may hold processes; our parents hold none)."""
        wanted = " ".join(f"+{c}" for c in self.bases)
        base = next(iter(self.bases.values()))
        levels = [base, *base.parents]
        for level in reversed(levels[: levels.index(self.root) + 1]):
            level.mkdir(exist_ok=True)
            current = set(_read(level / "cgroup.subtree_control").split())
            if not set(self.bases) <= current:
                _write(level / "cgroup.subtree_control", wanted)

    def procs(self, name: str) -> list[int]:
        """The pids in the VM's cgroup (empty if it does not exist)."""
        pids: set[int] = set()
        for d in self.dirs(name):
            with contextlib.suppress(FileNotFoundError):
                pids.update(int(p) for p in _read(d / "cgroup.procs").split())
        return sorted(pids)

    def remove(self, name: str, *, retry_for: float = RMDIR_RETRY_S) -> None:
        """Remove the VM's cgroup once its processes are gone (a no-op if it does not exist).

        :raise OSError: still busy after `retry_for` seconds.
        """
        deadline = time.monotonic() + retry_for
        for d in self.dirs(name):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

    def names(self) -> set[str]:
        """Every VM cgroup of this agent that exists."""
        found: set[str] = set()
        for base in self.bases.values():
            with contextlib.suppress(FileNotFoundError):
                found.update(p.name for p in base.iterdir() if p.is_dir())
        return found

    def remove_leftovers(self, live: set[str]) -> list[str]:
        """Remove this agent's VM cgroups not in `live`, killing what still runs in them
        (a VMM nobody adopted: nothing else is ever put in our cgroups). Return their names."""
        removed = []
        for name in sorted(self.names() - live):
            pids = self.procs(name)
            for pid in pids:
                _kill(pid)
            if pids:
                log.warning("killed %d orphan process(es) in cgroup %s", len(pids), name)
            try:
                self.remove(name, retry_for=5.0)
            except OSError as err:
                log.error("cannot remove leftover cgroup %s: %s", name, err)
                continue
            removed.append(name)
        return removed

    def remove_agent_dirs(self) -> None:
        """Remove this agent's parent directories if no VM cgroup is left in them (the shared
        `<parent>` stays: another agent may be making its directory in it right now)."""
        for base in set(self.bases.values()):
            with contextlib.suppress(OSError):
                base.rmdir()

    def read(self, name: str, controller: str, file: str) -> str:
        """One control file of the VM's cgroup (tests, doctor). :raise OSError:"""
        return _read(self.bases[controller] / name / file).strip()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str) -> None:
    """Write a control file; a name ending in `?` is optional (skipped if absent)."""
    optional = path.name.endswith("?")
    target = path.with_name(path.name.rstrip("?"))
    if optional and not target.exists():
        return
    target.write_text(value)
