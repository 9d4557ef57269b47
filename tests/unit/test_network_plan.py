"""The per-slot address plan, the slot pool, and the commands a slot's network is built from
(recorded by FakeSystem: no root, no network)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from nestbox.hostagent.network import (
    NoFreeSlot,
    SlotPool,
    SlotPoolStatistics,
    check_plan,
    cleanup_leftovers,
    egress,
    ensure_blackhole,
    open_slot_network,
    plan_slot,
)
from nestbox.hostagent.network.firewall import (
    HostRule,
    host_rules,
    host_rules_text,
    netns_ruleset,
    tagged_slot,
)
from nestbox.hostagent.network.netns import host_has_ipv6
from nestbox.hostagent.network.slots import parse_host_veth_name, parse_netns_name
from nestbox.hostagent.network.tap import tbf_args
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.system import SystemCommandError
from tests.fakes.system import FakeSystem

if TYPE_CHECKING:
    from pathlib import Path

NS = "nbx-a0-5"
HV = "nbha0x5"


def settings(**kw: object) -> AgentSettings:
    return AgentSettings(**kw)  # type: ignore[arg-type]


class FakeForwarder:
    """Stands in for the egress DNS forwarder (it binds the veth's address, which the fake
    system never makes)."""

    opened: list[str] = []  # noqa: RUF012 (a test's record)
    closed: list[str] = []  # noqa: RUF012

    def __init__(self, address: str) -> None:
        self.address = address
        self.opened.append(address)

    def close(self) -> None:
        self.closed.append(self.address)


@pytest.fixture(autouse=True)
def fake_forwarder(monkeypatch: pytest.MonkeyPatch) -> type[FakeForwarder]:
    FakeForwarder.opened, FakeForwarder.closed = [], []

    async def open_forwarder(settings: AgentSettings, address: str) -> FakeForwarder:
        return FakeForwarder(address)

    monkeypatch.setattr(egress, "open_forwarder", open_forwarder)
    return FakeForwarder


def test_settings_directories_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    monkeypatch.chdir(tmp_path)
    s = settings(data_dir="link", agent_id="b1")
    real = tmp_path.resolve() / "real"
    assert s.data_dir == real
    assert s.images_dir == real / "images"
    assert s.templates_dir == real / "templates"
    assert s.state_dir == real / "agents" / "b1"
    assert settings(data_dir="link", image_cache="img/../cache").images_dir == (
        tmp_path.resolve() / "cache"
    )


# --- the address plan ----------------------------------------------------------------------


def test_plan_default_slot() -> None:
    p = plan_slot(settings(), 5)
    assert (p.slot, p.netns, p.tap, p.host_veth) == (5, NS, "tap0", HV)
    assert (p.host_address, p.guest_ip) == ("10.201.0.5", "169.254.0.21")
    assert (p.veth_host_ip, p.veth_ns_ip) == ("10.200.0.21", "10.200.0.22")
    assert p.egress is False


def test_plan_uses_ip_arithmetic_across_octets() -> None:
    s = settings(slot_cidr="10.99.4.0/22", veth_cidr="10.98.0.0/16", slot_count=600)
    p = plan_slot(s, 300)
    assert p.host_address == "10.99.5.44"  # 10.99.4.0 + 300
    assert (p.veth_host_ip, p.veth_ns_ip) == ("10.98.4.177", "10.98.4.178")  # + 1200 + 1/2


def test_every_slot_is_distinct() -> None:
    s = settings()
    plans = [plan_slot(s, i) for i in range(1, 201)]
    for attr in ("host_address", "veth_host_ip", "veth_ns_ip", "netns", "host_veth"):
        assert len({getattr(p, attr) for p in plans}) == 200


@pytest.mark.parametrize("slot", [0, 201, -1])
def test_slot_outside_range(slot: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        plan_slot(settings(), slot)


def test_interface_name_limit() -> None:
    s = settings(agent_id="abcdefgh", slot_first=10000, slot_count=10)
    with pytest.raises(ValueError, match="longer than 15"):
        plan_slot(s, 10000)  # nbhabcdefghx10000: 17 characters
    with pytest.raises(ValueError, match="longer than 15"):
        SlotPool(s)


def test_check_plan_rejects_small_or_overlapping_ranges() -> None:
    with pytest.raises(ValueError, match="slot_cidr"):
        check_plan(settings(slot_cidr="10.201.0.0/24", slot_count=300))
    with pytest.raises(ValueError, match="veth_cidr"):
        check_plan(settings(veth_cidr="10.200.0.0/24", slot_count=100))
    with pytest.raises(ValueError, match="overlap"):
        check_plan(settings(slot_cidr="10.200.0.0/16"))
    with pytest.raises(ValueError, match="overlap"):
        check_plan(settings(veth_cidr="169.254.0.0/16"))
    with pytest.raises(ValueError, match="IPv4"):
        check_plan(settings(slot_cidr="fd00::/64"))
    check_plan(settings())


def test_names_parse_only_for_this_agent() -> None:
    assert parse_netns_name("a0", NS) == 5
    assert parse_netns_name("a0", "nbx-a01-5") is None
    assert parse_netns_name("a01", NS) is None
    assert parse_netns_name("a0", "nbx-a0-5x") is None
    assert parse_host_veth_name("a0", HV) == 5
    assert parse_host_veth_name("a", HV) is None
    assert parse_host_veth_name("a0x5", "nbha0x5x3") == 3
    assert parse_host_veth_name("a0", "nbha0x5x3") is None


# --- the slot pool -------------------------------------------------------------------------


async def test_pool_allocates_each_slot_once_and_reuses_late() -> None:
    pool = SlotPool(settings(slot_first=3, slot_count=3))
    assert [await pool.allocate() for _ in range(3)] == [3, 4, 5]
    with pytest.raises(NoFreeSlot):
        await pool.allocate()
    await pool.release(4)
    assert pool.statistics() == SlotPoolStatistics(total=3, in_use=2, free=1)
    assert await pool.allocate() == 4
    await pool.release(3)
    await pool.release(5)
    assert pool.in_use() == frozenset({4})
    assert await pool.allocate() == 3  # released first, reused first; 5 waits longer
    with pytest.raises(ValueError, match="not in use"):
        await pool.release(5)


async def test_pool_claim() -> None:
    pool = SlotPool(settings(slot_first=1, slot_count=3))
    await pool.claim(2)
    with pytest.raises(ValueError, match="cannot be claimed"):
        await pool.claim(2)
    with pytest.raises(ValueError, match="cannot be claimed"):
        await pool.claim(9)
    assert [await pool.allocate(), await pool.allocate()] == [1, 3]
    assert pool.statistics().free == 0


# --- rules and shaping ---------------------------------------------------------------------


def test_netns_ruleset_without_egress() -> None:
    rules = netns_ruleset(plan_slot(settings(), 5))
    assert "-A PREROUTING -i veth0 -d 10.201.0.5/32 -j DNAT --to-destination 169.254.0.21" in rules
    assert ":FORWARD DROP [0:0]" in rules
    assert "-A FORWARD -i veth0 -o tap0 -d 169.254.0.21/32 -j ACCEPT" in rules
    assert "-A INPUT -i tap0 -j DROP" in rules
    assert "MASQUERADE" not in rules
    assert "-A FORWARD -i tap0 -o veth0 -s" not in rules
    # No egress, no DNS: a lookup is refused at once rather than left to time out.
    dns = "-A INPUT -i tap0 -d 169.254.0.22/32"
    assert f"{dns} -p udp --dport 53 -j REJECT --reject-with icmp-port-unreachable" in rules
    assert "DNAT --to-destination 10.200" not in rules


@pytest.mark.parametrize("egress", [False, True])
def test_netns_ruleset_lets_only_the_host_side_of_the_veth_reach_envd(egress: bool) -> None:
    plan = dataclasses.replace(plan_slot(settings(), 5), egress=egress)
    lines = netns_ruleset(plan).splitlines()
    envd = "-o tap0 -d 169.254.0.21/32 -p tcp --dport 49983"
    # The host end of this slot's veth (10.200.0.21: where the agent's connections come
    # from) is accepted, anything else to envd dropped, both before the general ACCEPT.
    allow = f"-A FORWARD -i veth0 {envd} -s 10.200.0.21/32 -j ACCEPT"
    deny = f"-A FORWARD {envd} -j DROP"
    general = "-A FORWARD -i veth0 -o tap0 -d 169.254.0.21/32 -j ACCEPT"
    assert lines.index(allow) < lines.index(deny) < lines.index(general)
    assert f"-A OUTPUT {envd} -j DROP" in lines  # nor a process inside the netns
    assert sum("49983" in ln for ln in lines) == 3


def test_host_rules_are_tagged_and_ordered() -> None:
    s = settings()
    plan = plan_slot(s, 5)
    add = host_rules_text(host_rules(s, plan), "nestbox:a0:5", "add")
    assert add.splitlines() == [
        "*filter",
        "-I INPUT 1 -i nbha0x5 -m conntrack ! --ctstate ESTABLISHED,RELATED "
        "-m comment --comment nestbox:a0:5 -j DROP",
        "-I FORWARD 1 -o nbha0x5 -m conntrack ! --ctstate ESTABLISHED,RELATED "
        "-m comment --comment nestbox:a0:5 -j DROP",
        "-I FORWARD 1 -i nbha0x5 -m comment --comment nestbox:a0:5 -j DROP",
        "COMMIT",
    ]
    delete = host_rules_text(host_rules(s, plan), "nestbox:a0:5", "delete")
    assert [ln.split()[0] for ln in delete.splitlines()] == ["*filter", "-D", "-D", "-D", "COMMIT"]


def test_host_rules_with_egress_deny_internal_ranges_first() -> None:
    s = settings()
    plan = plan_slot(s, 5)
    rules = host_rules(s, dataclasses.replace(plan, egress=True, dns_port=10053))
    drops = [r for r in rules if r.at == "top" and r.chain == "FORWARD"]
    accepts = [r for r in rules if r.at == "bottom"]
    # The only top ACCEPTs: DNS (UDP and TCP) to the slot's forwarder, listed after (so
    # inserted above) the INPUT drop.
    dns = [r for r in rules if r.at == "top" and r.spec[-1] == "ACCEPT"]
    assert dns == [HostRule("filter", "INPUT", "top", ("-i", HV, "-d", "10.200.0.21/32",
                   "-p", proto, "--dport", "10053", "-j", "ACCEPT"))
                   for proto in ("udp", "tcp")]  # fmt: skip
    assert rules[0].chain == "INPUT"  # the drop, listed first: the accept goes above it
    assert rules.index(dns[0]) > 0
    denied = {r.spec[3] for r in drops if r.spec[2] == "-d"}
    assert {"10.201.0.0/16", "10.200.0.0/16", "169.254.0.0/16", "192.168.0.0/16"} <= denied
    assert all(r.spec[-1] == "DROP" for r in drops)
    masquerade = ("-s", "10.200.0.22/32", "-j", "MASQUERADE")
    assert HostRule("nat", "POSTROUTING", "bottom", masquerade) in rules
    assert {r.spec[-1] for r in accepts} == {"ACCEPT", "MASQUERADE"}


def test_tagged_slot() -> None:
    args = ["-A", "INPUT", "-i", HV, "-m", "comment", "--comment", "nestbox:a0:5", "-j", "DROP"]
    assert tagged_slot("a0", args) == 5
    assert tagged_slot("a", args) is None
    assert tagged_slot("a0", ["-A", "INPUT", "-j", "DROP"]) is None


def test_tbf_units() -> None:
    assert tbf_args(200, 100) == (
        "tbf", "rate", "1600000000bit", "burst", "100000000", "limit", "4000000",
    )  # fmt: skip
    assert tbf_args(1, 1)[-1] == str(256 * 1024)  # the queue never gets shorter than 256 KiB
    assert tbf_args(10000, 1)[-1] == str(4 * 1024 * 1024)  # nor longer than 4 MiB


# --- the build-up as commands --------------------------------------------------------------

EXPECTED = [
    ("ip", "netns", "add", NS),
    ("ip", "-n", NS, "link", "set", "lo", "up"),
    ("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"),
    ("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"),
    ("ip", "-n", NS, "tuntap", "add", "dev", "tap0", "mode", "tap"),
    ("ip", "-n", NS, "link", "set", "tap0", "txqueuelen", "5000", "up"),
    ("ip", "-n", NS, "addr", "add", "169.254.0.22/30", "dev", "tap0"),
    ("ip", "-n", NS, "link", "add", "ifb0", "type", "ifb"),
    ("ip", "-n", NS, "link", "set", "ifb0", "up"),
    ("tc", "-n", NS, "qdisc", "add", "dev", "ifb0", "root", *tbf_args(200, 100)),
    ("tc", "-n", NS, "qdisc", "add", "dev", "tap0", "handle", "ffff:", "ingress"),
    ("tc", "-n", NS, "filter", "add", "dev", "tap0", "parent", "ffff:", "protocol", "all",
     "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb0"),
    ("ip", "netns", "exec", NS, "iptables-restore", "-w"),
    ("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"),
    ("iptables-restore", "-w", "--noflush"),
    ("ip", "link", "add", HV, "type", "veth", "peer", "name", "veth0", "netns", NS),
    ("ip", "addr", "add", "10.200.0.21/30", "dev", HV),
    ("ip", "link", "set", HV, "up"),
    ("ip", "-n", NS, "addr", "add", "10.200.0.22/30", "dev", "veth0"),
    ("ip", "-n", NS, "link", "set", "veth0", "up"),
    ("ip", "route", "add", "10.201.0.5/32", "via", "10.200.0.22", "dev", HV),
]  # fmt: skip
EGRESS_ROUTE = ("ip", "-n", NS, "route", "add", "default", "via", "10.200.0.21", "dev", "veth0")


EGRESS_FORWARDING = ("sysctl", "-q", "-w", f"net.ipv4.conf.{HV}.forwarding=1")
UPLINKS = ("ip", "-4", "route", "show", "default")  # FakeSystem: none, so nothing more
NETNS_FORWARDING = ("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
GUARDS = ("iptables", "-w", "-S", "FORWARD")


def expected_commands(egress: bool) -> list[tuple[str, ...]]:
    cmds = list(EXPECTED)
    if egress:
        cmds[-1:-1] = [EGRESS_FORWARDING, UPLINKS, EGRESS_ROUTE]
    return cmds


def undo_of(cmd: tuple[str, ...], egress: bool = False) -> tuple[str, ...] | None:
    """What must undo `cmd` (None: removed together with the netns)."""
    if egress and cmd == NETNS_FORWARDING:
        return GUARDS  # the uplinks' release, after the root rules go: none guarded here
    if cmd == ("ip", "netns", "add", NS):
        return ("ip", "netns", "del", NS)
    if cmd[:4] == ("ip", "link", "add", HV):
        return ("ip", "link", "del", HV)
    if cmd == ("iptables-restore", "-w", "--noflush"):
        return cmd
    if cmd[:3] == ("ip", "route", "add"):
        return ("ip", "route", "del", "10.201.0.5/32", "dev", HV)
    return None


async def test_build_up_commands_without_egress() -> None:
    fake = FakeSystem()
    async with contextlib.AsyncExitStack() as stack:
        net = await open_slot_network(fake, settings(), 5, egress=False, stack=stack)
        assert fake.commands == expected_commands(egress=False)
        assert net == plan_slot(settings(), 5)
        ruleset = fake.calls[12].input
        assert ruleset is not None
        assert ruleset.decode() == netns_ruleset(net)
        assert b"-I INPUT 1 -i nbha0x5" in (fake.calls[14].input or b"")
    # Closing the stack undoes in reverse: route, veth, root rules, netns.
    undo = fake.commands[len(EXPECTED) :]
    assert undo == [undo_of(c) for c in reversed(EXPECTED) if undo_of(c)]
    assert (fake.calls[-2].input or b"").startswith(b"*filter\n-D INPUT -i nbha0x5")


async def test_build_up_commands_with_egress(fake_forwarder: type[FakeForwarder]) -> None:
    fake = FakeSystem()
    async with contextlib.AsyncExitStack() as stack:
        net = await open_slot_network(fake, settings(), 5, egress=True, stack=stack)
    assert net.egress
    assert fake.commands[: len(EXPECTED) + 3] == expected_commands(egress=True)
    assert fake_forwarder.opened == fake_forwarder.closed == ["10.200.0.21"]
    netns_rules = (fake.calls[12].input or b"").decode()
    assert "-A POSTROUTING -o veth0 -s 169.254.0.21/32 -j MASQUERADE" in netns_rules
    for proto in ("udp", "tcp"):
        dnat = f"-A PREROUTING -i tap0 -d 169.254.0.22/32 -p {proto} --dport 53 -j DNAT"
        assert f"{dnat} --to-destination 10.200.0.21:10053" in netns_rules
    assert "REJECT" not in netns_rules
    root_rules = (fake.calls[14].input or b"").decode()
    assert "-A FORWARD -i nbha0x5 -s 10.200.0.22/32" in root_rules
    assert "*nat\n-A POSTROUTING -s 10.200.0.22/32 -m comment --comment nestbox:a0:5" in root_rules
    assert all("nestbox:a0:5" in ln for ln in root_rules.splitlines() if ln.startswith("-"))


async def test_no_rate_limit_when_rate_is_zero() -> None:
    fake = FakeSystem()
    async with contextlib.AsyncExitStack() as stack:
        await open_slot_network(fake, settings(tap_rate_mbytes=0), 5, egress=False, stack=stack)
    assert not any(c[0] == "tc" or "ifb0" in c for c in fake.commands)


@pytest.mark.parametrize("egress", [False, True])
async def test_failure_at_each_step_undoes_exactly_what_was_made(egress: bool) -> None:
    cmds = expected_commands(egress)
    for n, failing in enumerate(cmds):
        fake = FakeSystem(fail_at=n)
        stack = contextlib.AsyncExitStack()
        # Run with check=False only where the host has no IPv6 (nothing to disable).
        tolerated = "disable_ipv6" in failing[-1] and not host_has_ipv6()
        if tolerated:
            await open_slot_network(fake, settings(), 5, egress=egress, stack=stack)
        else:
            with pytest.raises(SystemCommandError):
                await open_slot_network(fake, settings(), 5, egress=egress, stack=stack)
        made = len(cmds) if tolerated else n + 1
        assert fake.commands[:made] == cmds[:made], n
        succeeded = cmds if tolerated else cmds[:n]
        await stack.aclose()
        undo = [undo_of(c, egress) for c in reversed(succeeded) if undo_of(c, egress)]
        assert fake.commands[made:] == undo, n


async def test_cancellation_at_each_step_undoes_exactly_what_was_made() -> None:
    cmds = expected_commands(egress=False)
    for n in range(len(cmds)):
        with anyio.CancelScope() as scope:

            async def cancel_at_n(index: int, argv: tuple[str, ...], n: int = n) -> None:
                if index == n:
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()

            fake = FakeSystem(before_run=cancel_at_n)
            stack = contextlib.AsyncExitStack()
            await open_slot_network(fake, settings(), 5, egress=False, stack=stack)
        assert scope.cancelled_caught, n
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        assert fake.commands[: n + 1] == cmds[: n + 1]
        assert fake.commands[n + 1 :] == [undo_of(c) for c in reversed(cmds[:n]) if undo_of(c)]


# --- start-up: blackhole and leftovers -----------------------------------------------------


async def test_ensure_blackhole() -> None:
    fake = FakeSystem()
    await ensure_blackhole(fake, settings())
    assert fake.commands == [
        ("ip", "route", "replace", "blackhole", "10.201.0.0/16"),
        ("ip", "route", "replace", "blackhole", "10.200.0.0/16"),
    ]


async def test_cleanup_leftovers_touches_only_own_dead_slots() -> None:
    def rule(tag: str, dev: str) -> str:
        return f'-A INPUT -i {dev} -m comment --comment "{tag}" -j DROP'

    filter_rules = "\n".join(
        [
            "-P INPUT ACCEPT",
            rule("nestbox:a0:5", HV),  # own, dead: removed
            rule("nestbox:a0:6", "nbha0x6"),  # own, live: kept
            rule("nestbox:b1:5", "nbhb1x5"),  # another agent's: kept
            "-A INPUT -i eth0 -j ACCEPT",  # someone else's: kept
        ]
    )
    fake = FakeSystem(
        {
            ("iptables", "-w", "-t", "filter", "-S"): filter_rules,
            ("iptables", "-w", "-t", "nat", "-S"): "-P POSTROUTING ACCEPT\n",
            ("ip", "-o", "route", "show"): (
                "default via 192.0.2.1 dev eth0\n"
                "blackhole 10.201.0.0/16\n"
                f"10.200.0.20/30 dev {HV} proto kernel scope link src 10.200.0.21\n"
                f"10.201.0.5 via 10.200.0.22 dev {HV}\n"
                "10.201.0.6 via 10.200.0.26 dev nbha0x6\n"
                "10.201.0.7 via 10.200.0.30 dev nbhb1x7\n"
            ),
            ("ip", "-o", "link", "show", "type", "veth"): (
                f"7: {HV}@if2: <BROADCAST,UP> mtu 1500\n"
                "8: nbha0x6@if2: <BROADCAST,UP> mtu 1500\n"
                "9: nbhb1x5@if2: <BROADCAST,UP> mtu 1500\n"
                "10: vethdocker@if3: <BROADCAST,UP> mtu 1500\n"
            ),
            ("ip", "netns", "list"): (
                f"{NS} (id: 0)\nnbx-a0-6 (id: 1)\nnbx-b1-5 (id: 2)\nnbx-a0-9\nother\n"
            ),
        }
    )
    done = await cleanup_leftovers(fake, settings(), {6})
    deletions = [c for c in fake.commands if "-D" in c or "del" in c]
    assert deletions == [
        ("iptables", "-w", "-t", "filter", "-D", "INPUT", "-i", HV, "-m", "comment",
         "--comment", "nestbox:a0:5", "-j", "DROP"),
        ("ip", "route", "del", "10.201.0.5", "dev", HV),
        ("ip", "link", "del", HV),
        ("ip", "netns", "del", NS),
        ("ip", "netns", "del", "nbx-a0-9"),
    ]  # fmt: skip
    assert done.links == [HV]
    assert done.namespaces == [NS, "nbx-a0-9"]
    assert len(done.rules) == 1


# --- egress: allow-lists and the DNS forwarder ---------------------------------------------


def test_host_rules_with_an_allow_list_accept_only_it_after_the_denied_ranges() -> None:
    s = settings()
    plan = dataclasses.replace(
        plan_slot(s, 5), egress=True, dns_port=10053, egress_allow=("198.51.100.0/24",)
    )
    text = host_rules_text(host_rules(s, plan), "nestbox:a0:5", "add")
    # Each `-I FORWARD 1` goes above the ones before it: read the chain bottom-up.
    forward = [ln for ln in text.splitlines() if ln.startswith("-I FORWARD 1 -i")][::-1]
    denied_first = [i for i, ln in enumerate(forward) if "-d 10.0.0.0/8" in ln]
    allowed = [i for i, ln in enumerate(forward) if "-d 198.51.100.0/24" in ln]
    rest = [i for i, ln in enumerate(forward) if ln.endswith(f"-i {HV} -m comment "
            "--comment nestbox:a0:5 -j DROP")]  # fmt: skip
    assert denied_first
    assert allowed
    assert rest
    assert denied_first[0] < allowed[0] < rest[0]
    assert forward[allowed[0]].endswith("-j ACCEPT")


@pytest.mark.parametrize(
    ("entries", "cidrs", "names"),
    [
        (["10.0.0.1", "198.51.100.7/24"], ("10.0.0.1/32", "198.51.100.0/24"), ()),
        (["pypi.org", "Files.PythonHosted.org."], (), ("pypi.org", "files.pythonhosted.org")),
    ],
)
def test_parse_allow(entries: list[str], cidrs: tuple[str, ...], names: tuple[str, ...]) -> None:
    assert egress.parse_allow(entries) == egress.AllowList(cidrs, names)


@pytest.mark.parametrize("bad", ["::1/128", "1.2.3.4/33", "a b", "-x.org", "x" * 300, "1.2.3"])
def test_parse_allow_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="egress allow entry"):
        egress.parse_allow([bad])


def test_dns_a_query_and_answer_round_trip() -> None:
    query = egress.a_query("decoy.example", 0x1234)
    # A reply: the query with QR set and one A answer pointing at the question's name.
    answer = (
        b"\xc0\x0c"
        + b"\x00\x01\x00\x01"
        + b"\x00\x00\x00\x3c"
        + b"\x00\x04"
        + bytes([198, 51, 100, 7])
    )
    reply = query[:2] + b"\x81\x80" + query[4:6] + b"\x00\x01" + query[8:] + answer
    assert egress.parse_a_answers(reply, 0x1234) == ["198.51.100.7"]
    assert egress.parse_a_answers(reply, 0x4321) == []  # not an answer to this query
    assert egress.parse_a_answers(query, 0x1234) == []  # a query, not a response


def test_host_upstreams(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 10.255.255.53\nnameserver ::1\nsearch example\n")
    assert egress.host_upstreams(conf) == ["10.255.255.53"]
    assert egress.host_upstreams(tmp_path / "missing") == []
