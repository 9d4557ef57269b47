"""iptables rules for one slot: a full ruleset inside its netns, tagged rules in the root one.

Inside the netns (applied in one atomic `iptables-restore`, removed with the netns):
  - nat PREROUTING: `-i veth0 -d <host_address>` DNAT to the guest, 169.254.0.21;
  - FORWARD policy DROP; veth0 -> tap0 to the guest is allowed, tap0 -> veth0 only for
    ESTABLISHED,RELATED (replies), so the guest can answer but never start a connection;
  - envd's port (TCP 49983) only from the host end of the slot's veth, the source address of
    every connection the host opens to the capsule (the DNAT changes only the destination),
    so nothing forwarded from elsewhere reaches envd even if the root namespace's rules let
    it through; OUTPUT to it over tap0 is dropped (no process in the netns talks to envd);
  - INPUT from tap0: only ESTABLISHED,RELATED; the netns itself offers the guest nothing
    (DNS to the gateway is rejected at once without egress, so lookups fail fast);
  - no default route and no MASQUERADE, unless the capsule has egress; with egress, port 53 of
    the gateway (UDP and TCP) is DNATed to the slot's DNS forwarder (`egress.py`) on the host
    end of the veth.

In the root namespace (tagged `nestbox:<agent_id>:<slot>` so cleanup removes exactly its own,
added with `iptables-restore --noflush`, which leaves every other program's rules alone):
  - INPUT: drop anything from the slot's host veth that is not a reply, so a guest never
    reaches the agent's, the control plane's or any other port on the host;
  - FORWARD: drop new connections *into* the slot's veth (nobody but the host itself opens
    connections to a capsule, even with forwarding on for egress), and drop
    everything *from* it, or with egress only what goes to internal ranges (other capsules,
    veths, private and link-local networks such as cloud metadata); with an allow-list,
    accept only its CIDRs (after those drops) and drop the rest;
  - with egress, INPUT accepts UDP and TCP to the slot's DNS forwarder (above the INPUT drop).
Drops are inserted at the top of their chain, ahead of anyone's ACCEPT; the few egress ACCEPTs
are appended at the bottom, so the operator's own FORWARD filtering still applies first.
Egress also needs forwarding on the uplink the replies come in by: `uplink.py` turns it on for
that device only, guarded, while a capsule has egress (never the global `ip_forward`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from nestbox.hostagent.network.slots import GUEST_IP, NETNS_VETH, TAP_IP, TAP_NAME, SlotNetwork
from nestbox.protocol.envd import ENVD_PORT

if TYPE_CHECKING:
    import contextlib

    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System

#: Destinations a capsule with egress still never reaches through the host (besides the
#: agent's own slot_cidr and veth_cidr): private, shared (CGNAT), link-local (cloud metadata
#: at 169.254.169.254), "this network", multicast and reserved ranges.
EGRESS_DENIED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
NOT_A_REPLY = ("-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED")
A_REPLY = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED")


def netns_ruleset(plan: SlotNetwork) -> str:
    """The complete `iptables-restore` input for a fresh slot netns."""
    guest = f"{GUEST_IP}/32"
    dnat = f"-j DNAT --to-destination {GUEST_IP}"
    nat = [f"-A PREROUTING -i {NETNS_VETH} -d {plan.host_address}/32 {dnat}"]
    to_envd = f"-o {TAP_NAME} -d {guest} -p tcp --dport {ENVD_PORT}"
    forward = [
        f"-A FORWARD -i {NETNS_VETH} {to_envd} -s {plan.veth_host_ip}/32 -j ACCEPT",
        f"-A FORWARD {to_envd} -j DROP",
        f"-A FORWARD -i {NETNS_VETH} -o {TAP_NAME} -d {guest} -j ACCEPT",
        f"-A FORWARD -i {TAP_NAME} -o {NETNS_VETH} {' '.join(A_REPLY)} -j ACCEPT",
    ]
    dns = f"-i {TAP_NAME} -d {TAP_IP}/32 -p udp --dport 53"
    dns_tcp = f"-i {TAP_NAME} -d {TAP_IP}/32 -p tcp --dport 53"
    guest_input = [f"-A INPUT -i {TAP_NAME} {' '.join(A_REPLY)} -j ACCEPT"]
    if plan.egress:
        to = f"{plan.veth_host_ip}:{plan.dns_port}"
        nat[:0] = [f"-A PREROUTING {m} -j DNAT --to-destination {to}" for m in (dns, dns_tcp)]
        nat.append(f"-A POSTROUTING -o {NETNS_VETH} -s {guest} -j MASQUERADE")
        forward.append(f"-A FORWARD -i {TAP_NAME} -o {NETNS_VETH} -s {guest} -j ACCEPT")
    else:
        guest_input += [
            f"-A INPUT {dns} -j REJECT --reject-with icmp-port-unreachable",
            f"-A INPUT {dns_tcp} -j REJECT --reject-with tcp-reset",
        ]
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        *nat,
        "COMMIT",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD DROP [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        *guest_input,
        f"-A INPUT -i {TAP_NAME} -j DROP",
        *forward,
        f"-A OUTPUT {to_envd} -j DROP",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


async def apply_netns_firewall(system: System, plan: SlotNetwork) -> None:
    """Install `netns_ruleset(plan)` in the slot's netns (removed with the netns)."""
    await system.iptables_restore(plan.netns, netns_ruleset(plan), noflush=False)


def tag(agent_id: str, slot: int) -> str:
    """The comment on every root-namespace rule of this agent's `slot`."""
    return f"nestbox:{agent_id}:{slot}"


@dataclass(frozen=True)
class HostRule:
    """One root-namespace rule: where it goes and its match/target (without the tag)."""

    table: Literal["filter", "nat"]
    chain: str
    at: Literal["top", "bottom"]
    spec: tuple[str, ...]


def host_rules(settings: AgentSettings, plan: SlotNetwork) -> list[HostRule]:
    """The root-namespace rules of one slot (see the module docstring)."""
    dev = plan.host_veth
    rules = [
        HostRule("filter", "INPUT", "top", ("-i", dev, *NOT_A_REPLY, "-j", "DROP")),
        HostRule("filter", "FORWARD", "top", ("-o", dev, *NOT_A_REPLY, "-j", "DROP")),
    ]
    if not plan.egress:
        rules.append(HostRule("filter", "FORWARD", "top", ("-i", dev, "-j", "DROP")))
        return rules
    src = f"{plan.veth_ns_ip}/32"
    # "top" rules are each inserted at position 1, so a later one ends up above an earlier
    # one: the DNS accept above the INPUT drop; for FORWARD, from the top down: the denied
    # ranges, the allowed CIDRs, the drop of everything else.
    to_dns = ("-i", dev, "-d", f"{plan.veth_host_ip}/32")
    for proto in ("udp", "tcp"):
        dns = (*to_dns, "-p", proto, "--dport", str(plan.dns_port), "-j", "ACCEPT")
        rules.append(HostRule("filter", "INPUT", "top", dns))
    if plan.egress_allow:
        rules.append(HostRule("filter", "FORWARD", "top", ("-i", dev, "-j", "DROP")))
        for net in plan.egress_allow:
            spec = ("-i", dev, "-s", src, "-d", net, "-j", "ACCEPT")
            rules.append(HostRule("filter", "FORWARD", "top", spec))
    for net in (settings.slot_cidr, settings.veth_cidr, *EGRESS_DENIED):
        rules.append(HostRule("filter", "FORWARD", "top", ("-i", dev, "-d", net, "-j", "DROP")))
    rules += [
        HostRule("filter", "FORWARD", "bottom", ("-i", dev, "-s", src, "-j", "ACCEPT")),
        HostRule("filter", "FORWARD", "bottom", ("-o", dev, *A_REPLY, "-j", "ACCEPT")),
        HostRule("nat", "POSTROUTING", "bottom", ("-s", src, "-j", "MASQUERADE")),
    ]
    return rules


def host_rules_text(rules: list[HostRule], comment: str, op: Literal["add", "delete"]) -> str:
    """`iptables-restore --noflush` input that adds (or deletes) `rules`, tagged `comment`."""
    out: list[str] = []
    for table in ("filter", "nat"):
        chosen = [r for r in rules if r.table == table]
        if not chosen:
            continue
        out.append(f"*{table}")
        for r in chosen:
            # The target (`-j X`) stays last; the tag goes before it.
            spec = (*r.spec[:-2], "-m", "comment", "--comment", comment, *r.spec[-2:])
            if op == "delete":
                where: tuple[str, ...] = ("-D", r.chain)
            else:
                where = ("-I", r.chain, "1") if r.at == "top" else ("-A", r.chain)
            # iptables-restore splits on whitespace and knows only double quotes: no token
            # here has either (names, addresses and the tag are plain words by construction).
            out.append(" ".join((*where, *spec)))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


async def add_host_rules(
    system: System,
    settings: AgentSettings,
    plan: SlotNetwork,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Add the slot's root-namespace rules atomically; push their removal onto `stack`."""
    rules = host_rules(settings, plan)
    comment = tag(settings.agent_id, plan.slot)
    await system.iptables_restore(None, host_rules_text(rules, comment, "add"), noflush=True)
    stack.push_async_callback(
        system.iptables_restore, None, host_rules_text(rules, comment, "delete"), noflush=True
    )


def tagged_slot(agent_id: str, rule_args: list[str]) -> int | None:
    """The slot in the `nestbox:<agent_id>:<slot>` comment of one `iptables -S` rule, if any."""
    for i, arg in enumerate(rule_args[:-1]):
        if arg == "--comment":
            m = re.fullmatch(rf"nestbox:{re.escape(agent_id)}:(\d+)", rule_args[i + 1])
            if m:
                return int(m.group(1))
    return None


async def remove_tagged_host_rules(
    system: System, agent_id: str, keep: set[int] | frozenset[int]
) -> list[str]:
    """Delete root-namespace rules tagged with `agent_id` and a slot not in `keep`; rules of
    other agents and other programs are never touched. Returns the deleted rules."""
    removed: list[str] = []
    for table in ("filter", "nat"):
        listing = await system.iptables(None, "-t", table, "-S")
        for line in listing.splitlines():
            args = shlex.split(line)
            if args[:1] != ["-A"]:
                continue
            slot = tagged_slot(agent_id, args)
            if slot is None or slot in keep:
                continue
            await system.iptables(None, "-t", table, "-D", *args[1:])
            removed.append(f"-t {table} {line}")
    return removed
