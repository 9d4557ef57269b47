"""Re-expose servers that listen only on the guest's loopback, so the host's port proxy can
reach them: a scanner reads /proc/net/tcp{,6} every interval and keeps one `socat` per loopback
listener, bound to the forward address (the guest's eth0 IPv4 in a VM).

The interval is `scan_interval` (1 s) while envd is in use (an authorised request that may
start a program within the last `active_s`, 60 s: envd calls `activity()` for each; `/init`,
`/health`, `/metrics` and the like do not count, `lifecycle.NO_GUEST_USE`). After that the
scanner sleeps until the next such request (`idle_interval` 0, the default) or polls every
`idle_interval` seconds: an idle guest that wakes for nothing costs the host nothing, and a 5 s
scan was most of what an idle capsule cost beyond a bare guest (`make bench-density`: envd
SIGSTOPped, a capsule cost what the bare guest did). A server that starts listening on loopback
while envd is idle is found by the first such request, or by `scan_now()` (`POST /ports/scan`),
which the host's port proxy sends when a dial into the capsule is refused: it scans, waits until
each new socat listens, and answers.

The subsystem stops before a snapshot (no socat survives into the memory image) and restarts on
post-restore recovery. It never touches envd's HTTP connections (that is `conntrack.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TCP_LISTEN = 0x0A  # `st` column of /proc/net/tcp: include/net/tcp_states.h TCP_LISTEN
LOOPBACK = frozenset(
    {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("::ffff:127.0.0.1"),
    }
)
"""Exactly these, not all of 127/8: socat's own listeners may sit on another loopback address
(tests forward to 127.0.0.2) and must never be forwarded again."""
REAP_TIMEOUT_S = 2.0
RESTART_FIRST_SCAN_S = 0.1
"""After a restart (post-restore recovery) the first scan waits this long: the request that
triggered the recovery (`/init`, which the host is waiting on) answers first."""
LISTEN_WAIT_S = 3.0
"""How long `scan_now()` waits for the socats it started to listen (a fork and exec under TCG
on a busy host)."""
LISTEN_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Socket:
    """One row of /proc/net/tcp or /proc/net/tcp6."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    state: int


@dataclass(frozen=True, slots=True)
class PortStatistics:
    running: bool
    forward_address: str | None
    forwarded: tuple[int, ...]
    """Ports with a live socat, ascending."""


def _decode_address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints the address as 32-bit words in host byte order (little-endian here).
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ipaddress.IPv4Address(words)
    return ipaddress.IPv6Address(words)


def parse_proc_net_tcp(text: str) -> list[Socket]:
    """Rows of /proc/net/tcp or tcp6 (header skipped; malformed lines ignored)."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, _, port = fields[1].partition(":")
        try:
            sockets.append(Socket(_decode_address(local), int(port, 16), int(fields[3], 16)))
        except ValueError:
            continue
    return sockets


def loopback_listeners(sockets: list[Socket], *, ignore: frozenset[int]) -> dict[int, bool]:
    """`{port: ipv6}` of sockets listening on loopback only; a port with an IPv4 listener is
    forwarded to IPv4."""
    found: dict[int, bool] = {}
    for s in sockets:
        if s.state != TCP_LISTEN or s.address not in LOOPBACK or s.port in ignore:
            continue
        ipv6 = isinstance(s.address, ipaddress.IPv6Address) and s.address.ipv4_mapped is None
        found[s.port] = found.get(s.port, True) and ipv6
    return found


class PortSubsystem:
    """Scanner + socat forwarder with an idempotent `start()`/`stop()`.

    With `forward_address=None` forwarding is off and every method is a no-op. The scanner is an
    asyncio task owned by this object (started by envd's lifespan, stopped by its shutdown and by
    `/snapshot/prepare`); a lock serialises start/stop so a restart never overlaps a stop.
    """

    def __init__(
        self,
        forward_address: str | None,
        scan_interval: float,
        *,
        ignore_ports: frozenset[int] = frozenset(),
        proc_net: Path = Path("/proc/net"),
        socat: str = "socat",
        idle_interval: float | None = None,
        active_s: float = 60.0,
    ) -> None:
        self._bind = None if forward_address is None else ipaddress.ip_address(forward_address)
        if self._bind is not None and self._bind in LOOPBACK:
            raise ValueError(f"forward address {forward_address} would forward onto itself")
        self.forward_address = forward_address
        self.scan_interval = scan_interval
        self.idle_interval = scan_interval if idle_interval is None else idle_interval
        """0: no scan while idle, only on a request (`activity()`) or `scan_now()`."""
        self.active_s = active_s
        self._last_activity = time.monotonic()
        self._wake: asyncio.Event | None = None
        """Set while the scanner waits out an idle interval: `activity()` ends the wait."""
        self.ignore_ports = ignore_ports
        self._proc_net = proc_net
        self._socat = socat
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._socats: dict[int, subprocess.Popen[bytes]] = {}
        self._dying: list[subprocess.Popen[bytes]] = []
        self._warned: set[int] = set()

    async def start(self, *, first_scan_after: float = 0.0) -> None:
        """Begin scanning (the first scan after `first_scan_after` s); does nothing if
        forwarding is off or already running. (Logged at DEBUG: the callers' own lines say
        it, off the snapshot and restore paths.)"""
        if self.forward_address is None:
            return
        async with self._lock:
            if self._task is None:
                self._task = asyncio.create_task(
                    self._scan_loop(first_scan_after), name="envd-port-scanner"
                )
                log.debug("port forwarding on %s started", self.forward_address)

    async def stop(self) -> None:
        """Stop the scanner, SIGKILL every socat process group and reap them. Idempotent.

        The scanner only awaits in its sleep (each scan is synchronous), so cancelling it is
        immediate and can never leave a socat started but unrecorded.
        """
        async with self._lock:
            task, self._task = self._task, None
            try:
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
            finally:  # even if this stop() is itself cancelled, no socat outlives it
                for port in list(self._socats):
                    self._kill(port)
                self._warned.clear()
            await self._reap_dying()
            if task is not None:
                log.debug("port forwarding stopped")

    async def restart(self) -> None:
        await self.stop()
        await self.start(first_scan_after=RESTART_FIRST_SCAN_S)

    def statistics(self) -> PortStatistics:
        return PortStatistics(
            running=self._task is not None,
            forward_address=self.forward_address,
            forwarded=tuple(sorted(p for p, proc in self._socats.items() if proc.poll() is None)),
        )

    @property
    def idle(self) -> bool:
        """The scanner is waiting out an idle interval."""
        return self._wake is not None

    def activity(self) -> None:
        """envd is in use (a request arrived): scan every `scan_interval` for the next
        `active_s`, and now if the scanner was waiting out an idle interval."""
        self._last_activity = time.monotonic()
        if self._wake is not None:
            self._wake.set()

    async def _pause(self) -> None:
        if time.monotonic() - self._last_activity < self.active_s:
            await asyncio.sleep(self.scan_interval)
            return
        self._wake = wake = asyncio.Event()
        try:
            if self.idle_interval <= 0:
                await wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.idle_interval)
        finally:
            self._wake = None

    async def _scan_loop(self, first_scan_after: float) -> None:
        failures = 0
        if first_scan_after > 0:
            await asyncio.sleep(first_scan_after)
        while True:
            try:
                self.scan_once()
                failures = 0
            except Exception:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "port scan failed", exc_info=True)
            await self._pause()

    async def scan_now(self) -> tuple[int, ...]:
        """Scan at once (also while idle), then wait until every socat this scan started
        listens (at most `LISTEN_WAIT_S`); the forwarded ports. Nothing while the subsystem is
        stopped (before a snapshot) or forwarding is off. Counts as activity."""
        if self._task is None or self._bind is None:
            return ()
        self.activity()
        before = set(self._socats)
        self.scan_once()
        new = {p for p in self._socats if p not in before}
        deadline = time.monotonic() + LISTEN_WAIT_S
        while new and time.monotonic() < deadline:
            listening = {s.port for s in self._read_sockets()
                         if s.state == TCP_LISTEN and s.address == self._bind}  # fmt: skip
            new = {
                p for p in new - listening if p in self._socats and self._socats[p].poll() is None
            }
            if new:
                await asyncio.sleep(LISTEN_POLL_S)
        return self.statistics().forwarded

    def scan_once(self) -> None:
        """Read the listeners and bring the socat set in line with them (synchronous)."""
        wanted = loopback_listeners(self._read_sockets(), ignore=self.ignore_ports)
        self._dying = [p for p in self._dying if p.poll() is None]
        for port, proc in list(self._socats.items()):
            if port not in wanted:
                self._kill(port)
                self._warned.discard(port)
            elif proc.poll() is not None:
                del self._socats[port]  # exited by itself; started again below
                self._warn_once(port, f"socat for port {port} exited with {proc.returncode}")
        for port, ipv6 in wanted.items():
            if port not in self._socats:
                self._spawn(port, ipv6=ipv6)

    def _read_sockets(self) -> list[Socket]:
        sockets: list[Socket] = []
        for name in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError):  # tcp6 is absent without IPv6
                sockets += parse_proc_net_tcp((self._proc_net / name).read_text())
        return sockets

    def _spawn(self, port: int, *, ipv6: bool) -> None:
        bind = self._bind
        assert bind is not None
        listen = (
            f"TCP4-LISTEN:{port},bind={bind},reuseaddr,fork"
            if bind.version == 4
            else f"TCP6-LISTEN:{port},bind=[{bind}],reuseaddr,fork"
        )
        target = f"TCP6:[::1]:{port}" if ipv6 else f"TCP4:127.0.0.1:{port}"
        try:
            # Popen directly (as asyncio itself does): the fork/exec is about a millisecond and,
            # with no await before the process is recorded, a cancelled scan cannot orphan it.
            proc = subprocess.Popen(
                [self._socat, listen, target],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killpg takes its forks too
            )
        except OSError as err:
            self._warn_once(port, f"cannot start socat for port {port}: {err}")
            return
        self._socats[port] = proc
        log.info("forwarding %s:%d to loopback (socat pid %d)", bind, port, proc.pid)

    def _kill(self, port: int) -> None:
        proc = self._socats.pop(port)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self._dying.append(proc)
            log.info("stopped forwarding port %d", port)

    async def _reap_dying(self) -> None:
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while True:
            self._dying = [p for p in self._dying if p.poll() is None]
            if not self._dying or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        if self._dying:
            log.warning("%d socat processes did not exit after SIGKILL", len(self._dying))

    def _warn_once(self, port: int, message: str) -> None:
        # The guest controls these ports; one warning per port, not one per scan.
        level = logging.DEBUG if port in self._warned else logging.WARNING
        self._warned.add(port)
        log.log(level, "%s", message)
