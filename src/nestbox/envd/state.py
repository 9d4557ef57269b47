"""The envd runtime: the one object every handler reaches through `request.app.state.runtime`.

It holds the settings and the mutable defaults `/init` changes (user, workdir, env, identity,
access token), plus the long-lived subsystems (process registry, watchers, connection tracker,
port subsystem, the guest machine) and the lifecycle handlers' helpers (the `/init` lock, the
CPU sampler). Built once in `__main__` (`server.build_runtime`), before the event loop starts.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nestbox.envd.guest import GuestMachine
from nestbox.envd.logring import LogRing
from nestbox.envd.metrics import CpuSampler

if TYPE_CHECKING:
    from nestbox.envd.conntrack import ConnTracker
    from nestbox.envd.filesystem.watch import WatcherRegistry
    from nestbox.envd.ports import PortSubsystem
    from nestbox.envd.process.registry import ProcessRegistry
    from nestbox.envd.settings import EnvdSettings


@dataclass
class Defaults:
    """What new processes and file operations use when a request does not say."""

    user: str = "root"
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Identity:
    capsule_id: str = ""
    template_id: str = ""

    def env(self) -> dict[str, str]:
        return {"NESTBOX_CAPSULE_ID": self.capsule_id, "NESTBOX_TEMPLATE_ID": self.template_id}


@dataclass
class MachineUpdate:
    """What an answered `/init` still has to apply to the machine (`lifecycle.finish_init`)."""

    received: float
    """`time.monotonic()` when the request came in (the clock is stepped to what the host's
    time is *now*, not to the request's timestamp)."""
    host_ns: int | None = None
    entropy: bytes = b""
    identity: bool = False
    """The identity files need rewriting."""

    def merge(self, later: MachineUpdate) -> None:
        """`later` came in before this one was applied: one update doing both."""
        if later.host_ns is not None:
            self.host_ns, self.received = later.host_ns, later.received
        self.entropy += later.entropy
        self.identity = self.identity or later.identity


class RestoreFlag:
    """`needs_restore`: set by `/snapshot/prepare`; `claim()` is true exactly once afterwards.

    A lock, not the event loop, guards it, so the compare-and-set holds even if a handler ever
    runs in a worker thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False

    def set(self) -> None:
        with self._lock:
            self._set = True

    def claim(self) -> bool:
        with self._lock:
            was, self._set = self._set, False
            return was


@dataclass
class Runtime:
    settings: EnvdSettings
    in_vm: bool
    processes: ProcessRegistry
    watchers: WatcherRegistry
    tracker: ConnTracker
    ports: PortSubsystem
    machine: GuestMachine = field(init=False)
    """Clock, RNG, disk sync: the real machine in a VM, a no-op one outside (`in_vm`)."""
    defaults: Defaults = field(default_factory=Defaults)
    identity: Identity = field(default_factory=Identity)
    identity_files: dict[str, str] | None = None
    """What envd last wrote to the identity files (`guest.write_identity`), None if unknown."""
    pending: MachineUpdate | None = None
    """Clock, identity files and RNG work of an `/init` that has answered; applied right after
    its answer, or by the next request to envd if that comes first (`lifecycle.finish_init`)."""
    hosts_pin: str | None = None
    """A new host name that `/etc/hosts` does not name yet (a clone's, a fork copy's): written
    by the first request that may run a program or read files (`lifecycle.pin_hostname`), not
    by `/init`. Rewriting the file was the largest part of what a clone touched after its
    restore (the file system's and block layer's paths, the disk overlay): an idle clone never
    writes it. Kept in memory, so a pause before that request leaves it pending."""
    access_token: str | None = None
    """Required in `X-Access-Token` on every request but `GET /health` once set (`app.EnvdApp`);
    set by `/init` (only a request carrying the current one gets there), never cleared."""
    needs_restore: RestoreFlag = field(default_factory=RestoreFlag)
    last_prepare: str = "unknown"
    """What the last `/snapshot/prepare` did, for the post-restore recovery's log line."""
    last_init_ns: int | None = None
    """The `timestamp` of the last `/init` that applied its data, in ns since the epoch; an
    `/init` with an older one skips its data updates."""
    init_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """E2B's initLock: two `/init` calls never interleave their updates. (It binds to a loop only
    when a caller first has to wait, so it may be built before the loop starts.)"""
    cpu_sampler: CpuSampler = field(default_factory=CpuSampler)
    """The previous CPU reading `/metrics` measures from."""
    logs: LogRing = field(default_factory=LogRing)
    """envd's last log lines (`GET /logs`), attached to its logger while the server runs."""

    def __post_init__(self) -> None:
        self.machine = GuestMachine(in_vm=self.in_vm)

    def base_env(self) -> dict[str, str]:
        """Environment every new process starts from, before its user's login variables and
        the request's own `envs`."""
        return {**self.defaults.env, **self.identity.env()}
