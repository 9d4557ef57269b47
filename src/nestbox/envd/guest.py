"""The guest machine: the ONLY module where envd changes (or probes) the machine it runs on.

Clock, kernel RNG, host name, disk sync, kernel command line, eth0's address. A `GuestMachine`
built with `in_vm=False` does nothing at all, so envd can run on a developer's host. Capsule
identity files are the exception: they go to `settings.run_dir` in both modes. Every call here
is blocking; async callers run them with `anyio.to_thread.run_sync`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nestbox.envd.state import Identity

log = logging.getLogger(__name__)

# <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
# <linux/sockios.h>: get an interface's IPv4 address.
SIOCGIFADDR = 0x8915
MAX_ENTROPY_BYTES = 512
"""More than enough to reseed; keeps the ioctl buffer small whatever the host sends."""

# E2B envd's tolerance: a guest clock up to 50 ms behind or 5 s ahead of the host is left alone
# (stepping it for less would only make timestamps inside the capsule jump for nothing).
CLOCK_MAX_BEHIND_NS = 50_000_000
CLOCK_MAX_AHEAD_NS = 5_000_000_000

CMDLINE = Path("/proc/cmdline")
ETC_HOSTS = Path("/etc/hosts")
HOSTNAME_ADDRESS = "127.0.1.1"
URANDOM = "/dev/urandom"


class Syscalls(Protocol):
    """The raw operations `GuestMachine` is built on; a fake records or refuses them."""

    def clock_settime_ns(self, ns: int) -> None: ...
    def rng_ioctl(self, request: int, arg: bytes | None) -> None: ...
    def sync(self) -> None: ...
    def read_text(self, path: Path) -> str: ...
    def interface_ipv4(self, name: str) -> str | None: ...
    def set_hostname(self, name: str) -> bool: ...
    def pin_in_hosts(self, name: str) -> None: ...


class RealSyscalls:
    def clock_settime_ns(self, ns: int) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, ns)

    def rng_ioctl(self, request: int, arg: bytes | None) -> None:
        fd = os.open(URANDOM, os.O_WRONLY)
        try:
            if arg is None:
                fcntl.ioctl(fd, request)
            else:
                # A mutable buffer: fcntl copies immutable arguments into a 1 KiB scratch buffer.
                fcntl.ioctl(fd, request, bytearray(arg), True)
        finally:
            os.close(fd)

    def sync(self) -> None:
        os.sync()

    def read_text(self, path: Path) -> str:
        return path.read_text()

    def interface_ipv4(self, name: str) -> str | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                ifreq = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()))
            except OSError:
                return None  # no such interface, or no IPv4 address on it
        return socket.inet_ntoa(ifreq[20:24])

    def set_hostname(self, name: str) -> bool:
        if socket.gethostname() == name:
            return False
        socket.sethostname(name)
        return True

    def pin_in_hosts(self, name: str) -> None:
        _pin_in_hosts(ETC_HOSTS, name)


def _pin_in_hosts(hosts: Path, name: str) -> None:
    """Point `127.0.1.1` at `name` in the hosts file (replaced atomically), so tools that
    resolve their own host name (sudo) find it without DNS."""
    lines = [
        line
        for line in hosts.read_text().splitlines()
        if not line.split() or line.split()[0] != HOSTNAME_ADDRESS
    ]
    lines.append(f"{HOSTNAME_ADDRESS}\t{name}")
    tmp = hosts.with_name(f".{hosts.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, hosts)
    # Not synced here: a background `os.sync()` thread (tried, to take these few blocks off the
    # next prepare's `sync`) left envd unable to answer after the restore of a snapshot taken
    # while it ran (tests/integration/vm/test_agent_crash.py, after a cold boot).


class GuestMachine:
    """The capsule VM envd runs in; with `in_vm=False` every method is a no-op."""

    def __init__(self, *, in_vm: bool, syscalls: Syscalls | None = None) -> None:
        self.in_vm = in_vm
        self._sys: Syscalls = syscalls or RealSyscalls()

    def set_clock(self, host_ns: int) -> float | None:
        """Step the guest clock to the host's time (ns since the epoch) if it is off by more
        than E2B's tolerance. Returns the step in seconds, None if the clock was left alone
        (the caller logs it: `/init` answers first). Failures are logged, not raised: a wrong
        clock must not fail `/init`."""
        if not self.in_vm:
            return None
        now = time.time_ns()
        if host_ns - CLOCK_MAX_BEHIND_NS <= now <= host_ns + CLOCK_MAX_AHEAD_NS:
            return None
        try:
            self._sys.clock_settime_ns(host_ns)
        except OSError as err:
            log.warning("cannot set the guest clock: %s", err)
            return None
        return (host_ns - now) / 1e9

    def reseed_rng(self, entropy: bytes) -> bool:
        """Mix the host's random bytes into the kernel pool, then force a CRNG reseed.

        Two snapshots restored from one memory image start with identical RNG state; adding
        entropy alone does not reseed an already initialised CRNG, hence RNDRESEEDCRNG.
        Returns whether both ioctls succeeded; failures are logged, not raised.
        """
        if not self.in_vm or not entropy:
            return False
        data = entropy[:MAX_ENTROPY_BYTES]
        # struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
        info = struct.pack("ii", len(data) * 8, len(data)) + data
        try:
            self._sys.rng_ioctl(RNDADDENTROPY, info)
            self._sys.rng_ioctl(RNDRESEEDCRNG, None)
        except OSError as err:
            log.warning("cannot reseed the guest RNG: %s", err)
            return False
        return True

    def set_hostname(self, name: str) -> bool:
        """Make `name` (the capsule id: every clone of a template gets its own) the kernel's
        host name; `/etc/hosts` is `pin_hostname`'s. Returns whether the name changed.
        Failures are logged, not raised."""
        if not self.in_vm or not name:
            return False
        try:
            return self._sys.set_hostname(name)
        except OSError as err:
            log.warning("cannot set the host name: %s", err)
            return False

    def pin_hostname(self, name: str) -> None:
        """Point `127.0.1.1` at `name` in `/etc/hosts`. Failures are logged, not raised."""
        if not self.in_vm or not name:
            return
        try:
            self._sys.pin_in_hosts(name)
        except OSError as err:
            log.warning("cannot write the host name into %s: %s", ETC_HOSTS, err)

    def sync(self) -> None:
        """Flush dirty pages to the disks, so the disk image is consistent when the VM freezes."""
        if self.in_vm:
            self._sys.sync()

    def kernel_params(self) -> dict[str, str]:
        """`key=value` words of the kernel command line (empty outside a VM)."""
        if not self.in_vm:
            return {}
        try:
            words = self._sys.read_text(CMDLINE).split()
        except OSError as err:
            log.warning("cannot read the kernel command line: %s", err)
            return {}
        return dict(w.split("=", 1) for w in words if "=" in w)

    def forward_address(self, params: dict[str, str]) -> str | None:
        """The guest's own IPv4 address: `nestbox.guest_ip=` on the kernel command line (an
        address with or without its `/prefix`), else eth0's address; None outside a VM or when
        neither is known."""
        if not self.in_vm:
            return None
        given = params.get("nestbox.guest_ip", "").split("/", 1)[0]
        return given or self._sys.interface_ipv4("eth0")


def identity_from_params(params: dict[str, str], identity: Identity) -> None:
    """Fill a cold-booted capsule's identity from `nestbox.capsule_id=`/`nestbox.template_id=`."""
    identity.capsule_id = params.get("nestbox.capsule_id", identity.capsule_id)
    identity.template_id = params.get("nestbox.template_id", identity.template_id)


def write_identity(
    run_dir: Path, identity: Identity, written: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write `<run_dir>/NESTBOX_CAPSULE_ID` and `NESTBOX_TEMPLATE_ID` (in both modes), replacing
    each atomically so a reader never sees half an id. A file whose value is already what
    `written` (the previous call's result) says is left alone. Returns what the files hold.

    Plain `os` calls, no text file objects: on `/init` right after a restore every syscall path
    is new to TCG, so fewer of them is faster.

    :raise OSError: the directory cannot be created or written.
    """
    values = identity.env()
    for name, value in values.items():
        if written is not None and written.get(name) == value:
            continue
        tmp = run_dir / f".{name}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        os.replace(tmp, run_dir / name)
    return values
