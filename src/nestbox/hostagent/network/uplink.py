"""Forwarding on the host's uplinks while capsules have egress, guarded so that the host
forwards nothing else.

Why: a capsule's egress leaves through its slot's veth (forwarding on there, `setup.py`) and is
NATed out of an uplink; the replies come *in* on the uplink, and Linux forwards a packet only if
forwarding is on for the interface it arrived on. Debian's default (`net.ipv4.ip_forward=0`)
has it off everywhere, so a capsule with egress got no answers.

What: while a capsule on this host (of any agent) has egress, each uplink (`egress_uplinks`,
else the devices of the IPv4 default routes) forwards:
  - forwarding already on for it (`net.ipv4.conf.<dev>.forwarding=1`: the operator's, e.g.
    `ip_forward=1`): nothing is changed or added; other forwarded traffic stays theirs;
  - forwarding off: first two guard rules go at the top of the root FORWARD chain, tagged
    `nestbox-uplink:<dev>`: `-i <dev> ! -o nbh+ -j DROP` and `-i <dev> -o nbh+ <not a reply>
    -j DROP`, then that one device's forwarding is turned on. What arrives on the uplink is
    forwarded only if it is a reply to a connection a capsule opened (into a capsule's host
    veth, `nbh<agent>x<slot>`); everything else stays dropped, as it was with forwarding off.
    The global `net.ipv4.ip_forward` and other interfaces are never touched.
When no capsule needs it any more (no egress slot left on the host), forwarding goes back off
on each guarded device, then its guards go. The guards are the record that the agent, not the
operator, turned a device on (in the kernel, so a crash loses nothing): a device without them
is never turned off. If the operator turned forwarding on globally meanwhile
(`conf.all.forwarding=1`), the device's setting is left as it is and only the guards go.

"Egress in use" is read from the kernel too: a `nestbox:<agent>:<slot>` tagged MASQUERADE rule
in the root nat table exists exactly while an egress slot does. Every decision runs under a
host-wide lock (`flock` on `LOCK_PATH`), so agents sharing the host never race on a device:
each turns forwarding on right after adding its slot's rules, and turning off re-reads the
rules under the lock.

Known limit: with forwarding on, the kernel may send an ICMP redirect for a packet that would
leave by the interface it came in on, before the FORWARD guard drops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.network.firewall import NOT_A_REPLY
from nestbox.hostagent.system import SystemCommandError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System

log = logging.getLogger(__name__)

LOCK_PATH = Path("/run/lock/nestbox-uplink-forwarding.lock")
GUARD_TAG = "nestbox-uplink"
#: Every agent's capsule host veths (`slots.host_veth_name`).
CAPSULE_VETHS = "nbh+"
DEVICE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
EGRESS_TAG = re.compile(r"^nestbox:[a-z0-9]{1,8}:\d+$")


def forwarding_key(dev: str) -> str:
    """The sysctl key of `dev`'s IPv4 forwarding (a dot in a name is written as a slash)."""
    return f"net.ipv4.conf.{dev.replace('.', '/')}.forwarding"


def guard_rules(dev: str) -> list[tuple[str, ...]]:
    """What arrives on `dev` is forwarded only as a reply into a capsule's veth."""
    comment = ("-m", "comment", "--comment", f"{GUARD_TAG}:{dev}")
    return [
        ("-i", dev, "!", "-o", CAPSULE_VETHS, *comment, "-j", "DROP"),
        ("-i", dev, "-o", CAPSULE_VETHS, *NOT_A_REPLY, *comment, "-j", "DROP"),
    ]


@dataclass(frozen=True, slots=True)
class UplinkState:
    dev: str
    forwarding: bool | None
    """None: the device does not exist."""
    guarded: bool
    """Nestbox turned its forwarding on (its guard rules are in place)."""


@dataclass(frozen=True, slots=True)
class ForwardingState:
    """What `nestbox-agent doctor` shows."""

    managed: bool
    egress_slots: int
    uplinks: tuple[UplinkState, ...]

    @property
    def ok(self) -> bool:
        """Egress can get answers: every uplink forwards, or the agent turns it on when
        needed (and has, if an egress slot exists)."""
        if any(u.forwarding is None and not u.guarded for u in self.uplinks):
            return False  # a named uplink that does not exist
        off = [u for u in self.uplinks if u.forwarding is False]
        return not off or (self.managed and self.egress_slots == 0)

    def describe(self) -> str:
        parts = [f"{self.egress_slots} egress slot(s) on this host"]
        if not self.uplinks:
            parts.append("no uplink (no IPv4 default route and no egress_uplinks)")
        for u in self.uplinks:
            if u.forwarding is None:
                parts.append(f"uplink {u.dev}: missing")
            elif u.guarded:
                parts.append(f"uplink {u.dev}: forwarding on by nestbox, guarded")
            elif u.forwarding:
                parts.append(f"uplink {u.dev}: forwarding on (the operator's; left alone)")
            elif self.managed:
                parts.append(f"uplink {u.dev}: forwarding off (nestbox turns it on, guarded, "
                             "while a capsule has egress)")  # fmt: skip
            else:
                parts.append(f"uplink {u.dev}: forwarding off and egress_forwarding off: "
                             "capsules with egress get no answers")  # fmt: skip
        return "; ".join(parts)


@contextlib.asynccontextmanager
async def _host_lock() -> AsyncIterator[None]:
    """The host-wide lock of every forwarding decision (an flock, released on close, also
    when the process dies)."""

    def open_lock() -> int:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        return os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    fd = await anyio.to_thread.run_sync(open_lock)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def uplinks(system: System, settings: AgentSettings) -> list[str]:
    """`egress_uplinks`, else the devices of the main table's IPv4 default routes."""
    if settings.egress_uplinks:
        found = list(settings.egress_uplinks)
    else:
        found = []
        for line in (await system.ip("-4", "route", "show", "default")).splitlines():
            words = line.split()  # "default via 192.0.2.1 dev eth0 ..." or "nexthop ... dev X"
            if "dev" in words[:-1]:
                found.append(words[words.index("dev") + 1])
    out: list[str] = []
    for dev in found:
        if not DEVICE.match(dev):
            log.warning("uplink %r skipped: not an interface name", dev)
        elif dev not in out:
            out.append(dev)
    return out


async def egress_slots(system: System) -> int:
    """Egress slots on this host, of every agent: their tagged MASQUERADE rules."""
    count = 0
    for line in (await system.iptables(None, "-t", "nat", "-S", "POSTROUTING")).splitlines():
        args = shlex.split(line)
        if args[:1] == ["-A"] and args[-2:] == ["-j", "MASQUERADE"]:
            count += any(EGRESS_TAG.match(a) for a in args)
    return count


async def guarded_devices(system: System) -> dict[str, list[list[str]]]:
    """Device -> its guard rules as listed (`iptables -S FORWARD` arguments)."""
    found: dict[str, list[list[str]]] = {}
    for line in (await system.iptables(None, "-S", "FORWARD")).splitlines():
        args = shlex.split(line)
        for i, arg in enumerate(args[:-1]):
            if args[0] == "-A" and arg == "--comment" and args[i + 1].startswith(GUARD_TAG + ":"):
                found.setdefault(args[i + 1].split(":", 1)[1], []).append(args)
    return found


async def ensure_forwarding(system: System, settings: AgentSettings) -> None:
    """An egress slot's rules were just added: make each uplink forward (see the module
    docstring). Without an uplink nothing is done (logged): the capsule gets no answers, as
    before. :raise SystemCommandError: a listing or a change failed."""
    if not settings.egress_forwarding:
        return
    async with _host_lock():
        devices = await uplinks(system, settings)
        if not devices:
            log.warning("egress: no uplink (no IPv4 default route and no egress_uplinks)")
            return
        guarded = await guarded_devices(system)
        for dev in devices:
            value = await system.sysctl_read(None, forwarding_key(dev), check=False)
            if value == "":
                log.warning("egress: uplink %s does not exist", dev)
                continue
            have = guarded.get(dev, [])
            if value == "1" and not have:
                continue  # the operator's: theirs to keep, ours to leave alone
            if len(have) != len(guard_rules(dev)):
                # Guards first: forwarding is never on for nestbox without them (all of them:
                # a partial set, which nothing here leaves, is replaced in the same step).
                lines = [" ".join(("-D", *args[1:])) for args in have]
                lines += [" ".join(("-I", "FORWARD", "1", *rule)) for rule in guard_rules(dev)]
                await system.iptables_restore(None, _filter(lines), noflush=True)
            if value != "1":
                await system.sysctl(None, forwarding_key(dev), "1")
                log.info("egress: forwarding on for uplink %s (guarded)", dev)


def _filter(lines: list[str]) -> str:
    """`iptables-restore --noflush` input: `lines` in the filter table, applied atomically.
    (No token has whitespace or quotes: names, addresses and tags are plain words.)"""
    return "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"


async def release_forwarding(system: System) -> None:
    """An egress slot's rules are gone: if no egress slot is left on the host, turn off the
    forwarding nestbox turned on, then remove its guards. Failures are logged, not raised (a
    teardown step; a device left on stays guarded, and the next release retries)."""
    try:
        if not await guarded_devices(system):
            return  # nestbox turned nothing on: nothing to undo (one listing)
        async with _host_lock():
            guarded = await guarded_devices(system)
            if not guarded or await egress_slots(system):
                return
            everywhere = await system.sysctl_read(None, "net.ipv4.conf.all.forwarding")
            for dev, rules in guarded.items():
                key = forwarding_key(dev)
                if await system.sysctl_read(None, key, check=False) == "1" and everywhere != "1":
                    await system.sysctl(None, key, "0")
                lines = [" ".join(("-D", *args[1:])) for args in rules]
                await system.iptables_restore(None, _filter(lines), noflush=True)
                log.info("egress: forwarding off again for uplink %s", dev)
    except (SystemCommandError, OSError) as err:
        log.warning("egress: uplink forwarding not released: %s", err)


async def forwarding_state(system: System, settings: AgentSettings) -> ForwardingState:
    """Read-only: the uplinks, their forwarding and guards, the host's egress slots."""
    guarded = await guarded_devices(system)
    devices = await uplinks(system, settings)
    states = []
    for dev in [*devices, *(d for d in guarded if d not in devices)]:
        value = await system.sysctl_read(None, forwarding_key(dev), check=False)
        states.append(UplinkState(dev, None if value == "" else value == "1", dev in guarded))
    return ForwardingState(settings.egress_forwarding, await egress_slots(system), tuple(states))
