"""Build and tear down one slot's network; keep the root namespace safe and tidy.

`open_slot_network` is the build-up, as ordered steps on the caller's exit stack (STYLE 2.6):
each step that makes something pushes its undo right after it succeeds, so closing the stack
after a failure or cancellation at any step removes exactly what exists, in reverse.
`ensure_blackhole` and `cleanup_leftovers` run at agent start-up. Not here: which slot a
capsule gets (`slots.SlotPool`) and the QEMU side of the TAP (`vmm/`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nestbox.hostagent.network import egress as egress_
from nestbox.hostagent.network import firewall, netns, tap, uplink
from nestbox.hostagent.network.slots import (
    SlotNetwork,
    parse_host_veth_name,
    parse_netns_name,
    plan_slot,
)

if TYPE_CHECKING:
    import contextlib

    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System

log = logging.getLogger(__name__)


async def open_slot_network(
    system: System,
    settings: AgentSettings,
    slot: int,
    *,
    egress: bool,
    stack: contextlib.AsyncExitStack,
) -> SlotNetwork:
    """Build slot `slot`'s netns, TAP, rate limit, firewall, veth and host route.

    Everything is undone when the caller closes `stack` (shielded, with its own deadline).
    Egress (off unless a capsule asks for it) adds a default route and NAT, forwarding on the
    host end of the slot's veth and, guarded, on the uplinks if it is off there (`uplink.py`),
    and a DNS forwarder (`egress.py`), but the guest still never reaches the host itself, internal
    ranges or another capsule (see `firewall`); an allow-list (`egress.egress_allow`) narrows
    it further.

    :raise ValueError: the slot is not in this agent's plan, or a bad allow-list.
    :raise SystemCommandError: a step failed (e.g. a leftover of the slot still exists:
        run `cleanup_leftovers` at start-up).
    """
    plan = dataclasses.replace(plan_slot(settings, slot), egress=egress)
    if egress:
        upstreams = await egress_.upstreams_for(settings)
        allow = egress_.parse_allow(egress_.current_allow())
        cidrs = await egress_.resolve_allow(allow, upstreams) if allow.names else allow.cidrs
        plan = dataclasses.replace(plan, egress_allow=tuple(cidrs), dns_port=settings.dns_port)
    started = time.monotonic()
    # Order matters: everything inside the netns (TAP, rate limit, firewall) is in place before
    # the veth connects it to the host, and the host route that makes the capsule reachable
    # comes last.
    await netns.create_netns(system, plan.netns, stack)
    await netns.disable_ipv6(system, plan.netns)
    await tap.create_tap(system, plan.netns)
    if settings.tap_rate_mbytes > 0:
        await tap.limit_guest_rate(
            system, plan.netns, settings.tap_rate_mbytes, settings.tap_burst_mbytes
        )
    await firewall.apply_netns_firewall(system, plan)
    await netns.enable_forwarding(system, plan.netns)
    if egress:
        # Pushed before the rules, so it runs after their removal: the host's last egress
        # slot going turns the uplinks' forwarding back off (`uplink.py`).
        stack.push_async_callback(uplink.release_forwarding, system)
    await firewall.add_host_rules(system, settings, plan, stack)
    await netns.create_veth(system, plan, stack)
    if egress:
        forwarder = await egress_.open_forwarder(settings, plan.veth_host_ip)
        stack.callback(forwarder.close)
        await system.sysctl(None, uplink.forwarding_key(plan.host_veth), "1")
        await uplink.ensure_forwarding(system, settings)
        await netns.add_default_route(system, plan)
    await netns.add_host_route(system, plan, stack)
    log.debug(
        "slot network up",
        extra={"slot": slot, "egress": egress, "ms": round((time.monotonic() - started) * 1000)},
    )
    return plan


async def ensure_blackhole(system: System, settings: AgentSettings) -> None:
    """Blackhole routes for slot_cidr and veth_cidr in the root namespace (idempotent).

    A packet for a slot whose /32 route or veth does not exist is dropped here instead of
    following the default route off the machine. Shared by every agent using the same ranges,
    so it is never removed.
    """
    for cidr in (settings.slot_cidr, settings.veth_cidr):
        await system.ip("route", "replace", "blackhole", cidr)


@dataclass
class Leftovers:
    """What `cleanup_leftovers` removed."""

    rules: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rules or self.routes or self.links or self.namespaces)


async def cleanup_leftovers(
    system: System, settings: AgentSettings, live_slots: set[int] | frozenset[int]
) -> Leftovers:
    """Remove this agent's netns, host veths, routes and root rules whose slot is not live.

    Only names and tags carrying *this* agent id are considered: another agent on the same
    machine keeps everything. Run at start-up, before the first slot is opened.

    :raise SystemCommandError: a listing or a removal failed.
    """
    agent = settings.agent_id
    done = Leftovers()
    done.rules = await firewall.remove_tagged_host_rules(system, agent, live_slots)

    def dead(slot: int | None) -> bool:
        return slot is not None and slot not in live_slots

    for line in (await system.ip("-o", "route", "show")).splitlines():
        words = line.split()
        dev = words[words.index("dev") + 1] if "dev" in words[:-1] else ""
        if dead(parse_host_veth_name(agent, dev)) and "kernel" not in words:
            await system.ip("route", "del", words[0], "dev", dev)
            done.routes.append(line)
    for line in (await system.ip("-o", "link", "show", "type", "veth")).splitlines():
        # "7: nbha0x5@if2: <BROADCAST,...> ..."
        name = line.split(":", 2)[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if dead(parse_host_veth_name(agent, name)):
            await system.ip("link", "del", name)
            done.links.append(name)
    for line in (await system.ip("netns", "list")).splitlines():
        name = line.split()[0] if line.strip() else ""
        if dead(parse_netns_name(agent, name)):
            await system.ip("netns", "del", name)
            done.namespaces.append(name)
    if done:
        log.warning("removed network leftovers of dead slots", extra={"leftovers": done})
    if any("MASQUERADE" in rule for rule in done.rules):
        await uplink.release_forwarding(system)  # a dead egress slot's
    return done
