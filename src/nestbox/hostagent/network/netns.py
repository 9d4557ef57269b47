"""A slot's network namespace and the veth pair that links it to the root namespace.

Each function is one build step; a step that makes something outliving the netns itself
pushes its undo onto the caller's exit stack as soon as it has succeeded. Things made *inside*
the netns (addresses, sysctls, the TAP, firewall rules) need no undo of their own: deleting
the netns removes them.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from nestbox.hostagent.network.slots import NETNS_VETH, VETH_PREFIX, SlotNetwork

if TYPE_CHECKING:
    import contextlib

    from nestbox.hostagent.system import System


async def create_netns(system: System, name: str, stack: contextlib.AsyncExitStack) -> None:
    """Create netns `name` with loopback up; its deletion is the slot's last undo."""
    await system.ip("netns", "add", name)
    stack.push_async_callback(system.ip, "netns", "del", name)
    await system.ip("link", "set", "lo", "up", netns=name)


async def disable_ipv6(system: System, netns: str) -> None:
    """The plan is IPv4 only; without IPv6 the guest cannot talk to the netns (nor envd be
    reached from it) over link-local addresses that no firewall rule here mentions. `all`
    covers the interfaces that exist (lo), `default` those made after (tap0, veth0). A failure
    is an error, unless the host runs without IPv6: then there is no such sysctl, and nothing
    to disable."""
    check = host_has_ipv6()
    for scope in ("all", "default"):
        await system.sysctl(netns, f"net.ipv6.conf.{scope}.disable_ipv6", "1", check=check)


@functools.cache
def host_has_ipv6() -> bool:
    """Whether the kernel has IPv6 (its sysctls exist); read once."""
    return os.path.exists("/proc/sys/net/ipv6")


async def enable_forwarding(system: System, netns: str) -> None:
    """Forwarding inside the netns (veth0 <-> tap0); the root namespace's devices are set
    elsewhere: the slot's host veth in `setup.py`, the uplinks in `uplink.py`."""
    await system.sysctl(netns, "net.ipv4.ip_forward", "1")


async def create_veth(system: System, plan: SlotNetwork, stack: contextlib.AsyncExitStack) -> None:
    """The veth pair: `plan.host_veth` in the root namespace, `veth0` in the netns, both up.

    The undo deletes the host end explicitly (which also removes veth0 and every route through
    it) rather than relying on the netns deletion, which the kernel finishes asynchronously.
    """
    await system.ip(
        "link", "add", plan.host_veth, "type", "veth",
        "peer", "name", NETNS_VETH, "netns", plan.netns,
    )  # fmt: skip
    stack.push_async_callback(system.ip, "link", "del", plan.host_veth)
    await system.ip("addr", "add", f"{plan.veth_host_ip}/{VETH_PREFIX}", "dev", plan.host_veth)
    await system.ip("link", "set", plan.host_veth, "up")
    await system.ip(
        "addr", "add", f"{plan.veth_ns_ip}/{VETH_PREFIX}", "dev", NETNS_VETH, netns=plan.netns
    )
    await system.ip("link", "set", NETNS_VETH, "up", netns=plan.netns)


async def add_default_route(system: System, plan: SlotNetwork) -> None:
    """Egress only: the netns' default route, via the host end of the veth."""
    await system.ip(
        "route", "add", "default", "via", plan.veth_host_ip, "dev", NETNS_VETH, netns=plan.netns
    )


async def add_host_route(
    system: System, plan: SlotNetwork, stack: contextlib.AsyncExitStack
) -> None:
    """Root namespace: the slot's host-facing /32 via the netns end of its veth. It is more
    specific than the slot_cidr blackhole, so it is the only way in; added last, so the
    capsule becomes reachable only once everything else is in place."""
    dst = f"{plan.host_address}/32"
    await system.ip("route", "add", dst, "via", plan.veth_ns_ip, "dev", plan.host_veth)
    stack.push_async_callback(system.ip, "route", "del", dst, "dev", plan.host_veth)
