"""The per-slot address plan and the pool of slots one agent hands out.

Pure arithmetic and bookkeeping: nothing here touches the host (that is `setup.py`).

Address plan (e2b `network/slot.go` is the model). A *slot* is an index i in
[slot_first, slot_first + slot_count); each capsule holds one slot while it exists.
With the defaults (slot_cidr 10.201.0.0/16, veth_cidr 10.200.0.0/16) slot i = 5 gets:

    root namespace                      netns nbx-<agent>-5                 guest (QEMU)
    ─────────────────────────────────   ─────────────────────────────────   ──────────────
    nbh<agent>x5  10.200.0.21/30  <──>  veth0  10.200.0.22/30
    route 10.201.0.5/32 via 10.200.0.22 DNAT 10.201.0.5 -> 169.254.0.21
                                        tap0   169.254.0.22/30        <──>  eth0 169.254.0.21/30

  - host-facing capsule address = slot_cidr network + i (10.201.0.5): what the agent, the
    proxy and the control plane use to reach the capsule. It is on no interface: the root
    namespace routes the /32 into the slot's veth, and the netns DNATs it to the guest.
  - veth /30 = veth_cidr network + 4*i (10.200.0.20/30): .+1 on the host side, .+2 in the
    netns. A /30 (not a /31) so both ends are ordinary host addresses for every tool.
  - inside every netns the TAP is 169.254.0.22/30 and the guest is 169.254.0.21: identical in
    all slots, so a snapshot clone restored into any slot needs no re-addressing.
  - slot_cidr and veth_cidr each carry a blackhole route in the root namespace: a packet for a
    slot without a (more specific) live route is dropped instead of following the default
    route off the machine.
  - names carry the agent id, so two agents on one machine (disjoint slot ranges) never touch
    each other's leftovers: netns `nbx-<agent>-<i>`, host veth `nbh<agent>x<i>` (at most 15
    characters, the kernel's IFNAMSIZ - 1), netns veth `veth0`, TAP `tap0`.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from nestbox.hostagent.settings import AgentSettings

#: Same in every slot's netns (see the plan above).
TAP_NAME = "tap0"
NETNS_VETH = "veth0"
TAP_IP = "169.254.0.22"
GUEST_IP = "169.254.0.21"
GUEST_PREFIX = 30
GUEST_NETWORK = ipaddress.ip_network(f"{GUEST_IP}/{GUEST_PREFIX}", strict=False)
VETH_PREFIX = 30
#: IFNAMSIZ is 16 including the terminating NUL.
MAX_IFNAME = 15


class NoFreeSlot(Exception):
    """Every slot of this agent is held by a capsule."""


@dataclass(frozen=True)
class SlotNetwork:
    """Names and addresses of one slot's network (see the module docstring)."""

    slot: int
    netns: str
    tap: str
    host_address: str
    guest_ip: str
    host_veth: str
    veth_host_ip: str
    veth_ns_ip: str
    egress: bool = False
    egress_allow: tuple[str, ...] = ()
    """With egress: the only CIDRs the guest may reach (empty: every public address)."""
    dns_port: int = 0
    """With egress: the port of the slot's DNS forwarder on `veth_host_ip`."""


def netns_name(agent_id: str, slot: int) -> str:
    return f"nbx-{agent_id}-{slot}"


def host_veth_name(agent_id: str, slot: int) -> str:
    return f"nbh{agent_id}x{slot}"


def parse_netns_name(agent_id: str, name: str) -> int | None:
    """The slot of this agent's netns `name`, or None if it is not one (another agent's, ...)."""
    m = re.fullmatch(rf"nbx-{re.escape(agent_id)}-(\d+)", name)
    return int(m.group(1)) if m else None


def parse_host_veth_name(agent_id: str, name: str) -> int | None:
    """The slot of this agent's host veth `name`, or None. The slot is all digits after the
    last `x`, so a name belongs to at most one agent id even if agent ids contain an `x`."""
    m = re.fullmatch(rf"nbh{re.escape(agent_id)}x(\d+)", name)
    return int(m.group(1)) if m else None


def plan_slot(settings: AgentSettings, slot: int) -> SlotNetwork:
    """The addresses and names of `slot`.

    :raise ValueError: the slot is outside this agent's range, or does not fit the CIDRs or
        the interface-name limit.
    """
    if not settings.slot_first <= slot < settings.slot_first + settings.slot_count:
        raise ValueError(
            f"slot {slot} is outside [{settings.slot_first}, "
            f"{settings.slot_first + settings.slot_count})"
        )
    slot_net = ipaddress.IPv4Network(settings.slot_cidr)
    veth_net = ipaddress.IPv4Network(settings.veth_cidr)
    # The last address of slot_cidr is its broadcast address: never a capsule.
    if slot >= slot_net.num_addresses - 1:
        raise ValueError(f"slot {slot} does not fit in slot_cidr {slot_net}")
    if 4 * slot + 3 >= veth_net.num_addresses:
        raise ValueError(f"slot {slot} does not fit in veth_cidr {veth_net}")
    host_veth = host_veth_name(settings.agent_id, slot)
    if len(host_veth) > MAX_IFNAME:
        raise ValueError(f"interface name {host_veth!r} is longer than {MAX_IFNAME} characters")
    veth_base = veth_net.network_address + 4 * slot
    return SlotNetwork(
        slot=slot,
        netns=netns_name(settings.agent_id, slot),
        tap=TAP_NAME,
        host_address=str(slot_net.network_address + slot),
        guest_ip=GUEST_IP,
        host_veth=host_veth,
        veth_host_ip=str(veth_base + 1),
        veth_ns_ip=str(veth_base + 2),
    )


def check_plan(settings: AgentSettings) -> None:
    """Validate the whole slot range once, at startup, so a bad config fails there.

    :raise ValueError: IPv6 or overlapping CIDRs, or a slot that does not fit (see plan_slot).
    """
    nets = [ipaddress.ip_network(c) for c in (settings.slot_cidr, settings.veth_cidr)]
    if any(n.version != 4 for n in nets):
        raise ValueError("slot_cidr and veth_cidr must be IPv4 networks")
    v4 = [ipaddress.IPv4Network(n) for n in nets] + [GUEST_NETWORK]
    for i, a in enumerate(v4):
        for b in v4[i + 1 :]:
            if a.overlaps(b):
                raise ValueError(f"address ranges {a} and {b} overlap")
    # The highest slot has the largest addresses and the longest names.
    plan_slot(settings, settings.slot_first)
    plan_slot(settings, settings.slot_first + settings.slot_count - 1)


@dataclass(frozen=True)
class SlotPoolStatistics:
    total: int
    in_use: int
    free: int


class SlotPool:
    """Hands out this agent's slots; a released slot goes to the back of the queue, so it is
    reused as late as possible (the kernel tears a netns down asynchronously, and stale
    conntrack/ARP state for its addresses has time to expire)."""

    def __init__(self, settings: AgentSettings) -> None:
        check_plan(settings)
        first, count = settings.slot_first, settings.slot_count
        self._all = range(first, first + count)
        # Invariant guarded by _lock: _free and _in_use are disjoint and together hold exactly
        # the slots of _all, and _free has no duplicates; i.e. a slot is never handed to two
        # capsules. Every method is a check-then-move that must stay atomic even if an await
        # is ever added inside it.
        self._lock = anyio.Lock()
        self._free: collections.deque[int] = collections.deque(self._all)
        self._in_use: set[int] = set()

    async def allocate(self) -> int:
        """Take a free slot.

        :raise NoFreeSlot: all slots are in use.
        """
        async with self._lock:
            if not self._free:
                raise NoFreeSlot(f"all {len(self._all)} slots are in use")
            slot = self._free.popleft()
            self._in_use.add(slot)
            return slot

    async def claim(self, slot: int) -> None:
        """Mark a specific slot as in use (a capsule that survived an agent restart).

        :raise ValueError: the slot is not in this agent's range or is already in use.
        """
        async with self._lock:
            if slot not in self._all or slot in self._in_use:
                raise ValueError(f"slot {slot} cannot be claimed")
            self._free.remove(slot)
            self._in_use.add(slot)

    async def release(self, slot: int) -> None:
        """Give a slot back. Releasing a slot that is not in use is a bug.

        :raise ValueError: the slot is not in use.
        """
        async with self._lock:
            if slot not in self._in_use:
                raise ValueError(f"slot {slot} is not in use")
            self._in_use.remove(slot)
            self._free.append(slot)

    def in_use(self) -> frozenset[int]:
        """The slots held right now (what `cleanup_leftovers` must keep)."""
        return frozenset(self._in_use)

    def statistics(self) -> SlotPoolStatistics:
        n = len(self._in_use)
        return SlotPoolStatistics(total=len(self._all), in_use=n, free=len(self._all) - n)
