"""Uplink forwarding for egress (`network/uplink.py`) as commands: turned on only where it is
off, guards first; the operator's forwarding left alone; turned off (then the guards removed)
only when no egress slot is left on the host. The real kernel path is in
tests/integration/vm/test_network.py."""

from __future__ import annotations

from nestbox.hostagent.network import uplink
from nestbox.hostagent.settings import AgentSettings
from tests.fakes.system import FakeSystem

ROUTES = ("ip", "-4", "route", "show", "default")
FWD = ("sysctl", "-n", "net.ipv4.conf.eth0.forwarding")
ALL = ("sysctl", "-n", "net.ipv4.conf.all.forwarding")
GUARDS = ("iptables", "-w", "-S", "FORWARD")
NAT = ("iptables", "-w", "-t", "nat", "-S", "POSTROUTING")
GUARD_LINES = (
    '-P FORWARD ACCEPT\n-A FORWARD -i eth0 ! -o nbh+ -m comment --comment "nestbox-uplink:eth0"'
    " -j DROP\n-A FORWARD -i eth0 -o nbh+ -m conntrack ! --ctstate RELATED,ESTABLISHED -m "
    'comment --comment "nestbox-uplink:eth0" -j DROP\n'
)
MASQUERADE = '-A POSTROUTING -s 10.200.0.22/32 -m comment --comment "nestbox:a0:5" -j MASQUERADE\n'


def settings(**kw: object) -> AgentSettings:
    return AgentSettings(**kw)  # type: ignore[arg-type]


def fake(forwarding: str, *, guards: str = "", nat: str = "", everywhere: str = "0") -> FakeSystem:
    return FakeSystem({
        ROUTES: "default via 192.0.2.1 dev eth0 proto static\n",
        FWD: forwarding + "\n", ALL: everywhere + "\n", GUARDS: guards, NAT: nat,
    })  # fmt: skip


async def test_off_is_turned_on_behind_guards() -> None:
    system = fake("0")
    await uplink.ensure_forwarding(system, settings())
    restore = [c for c in system.calls if c.argv[0] == "iptables-restore"]
    assert system.commands.index(restore[0].argv) < system.commands.index(
        ("sysctl", "-q", "-w", "net.ipv4.conf.eth0.forwarding=1")
    )
    text = (restore[0].input or b"").decode()
    assert "-I FORWARD 1 -i eth0 ! -o nbh+ -m comment --comment nestbox-uplink:eth0 -j DROP" in text
    assert "-i eth0 -o nbh+ -m conntrack ! --ctstate ESTABLISHED,RELATED" in text
    # The global switch is never touched.
    assert not any("ip_forward" in " ".join(c) for c in system.commands)


async def test_the_operators_forwarding_is_left_alone() -> None:
    system = fake("1")
    await uplink.ensure_forwarding(system, settings())
    assert system.commands == [ROUTES, GUARDS, FWD]
    system = fake("1", guards=GUARD_LINES)  # on, but ours (guarded): nothing to add
    await uplink.ensure_forwarding(system, settings())
    assert system.commands == [ROUTES, GUARDS, FWD]


async def test_named_uplinks_and_the_setting_that_turns_it_off() -> None:
    system = fake("0")
    await uplink.ensure_forwarding(system, settings(egress_uplinks=["eth0", "bad name!"]))
    assert ROUTES not in system.commands
    assert ("sysctl", "-q", "-w", "net.ipv4.conf.eth0.forwarding=1") in system.commands
    system = fake("0")
    await uplink.ensure_forwarding(system, settings(egress_forwarding=False))
    assert system.commands == []


async def test_release_turns_off_then_removes_the_guards_when_no_egress_is_left() -> None:
    system = fake("1", guards=GUARD_LINES)
    await uplink.release_forwarding(system)
    off = system.commands.index(("sysctl", "-q", "-w", "net.ipv4.conf.eth0.forwarding=0"))
    [(at, delete)] = [(i, c) for i, c in enumerate(system.calls) if c.argv[0] == "iptables-restore"]
    assert off < at  # forwarding off first, then the guards go, both in one step
    assert (delete.input or b"").decode().splitlines() == [
        "*filter",
        "-D FORWARD -i eth0 ! -o nbh+ -m comment --comment nestbox-uplink:eth0 -j DROP",
        "-D FORWARD -i eth0 -o nbh+ -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment "
        "--comment nestbox-uplink:eth0 -j DROP",
        "COMMIT",
    ]


async def test_release_keeps_forwarding_while_an_egress_slot_exists() -> None:
    system = fake("1", guards=GUARD_LINES, nat=MASQUERADE)
    await uplink.release_forwarding(system)
    assert not any(c[0] == "iptables-restore" or c[:3] == ("sysctl", "-q", "-w")
                   for c in system.commands)  # fmt: skip


async def test_release_without_guards_is_one_listing() -> None:
    system = fake("1")
    await uplink.release_forwarding(system)
    assert system.commands == [GUARDS]


async def test_release_leaves_forwarding_the_operator_turned_on_everywhere() -> None:
    system = fake("1", guards=GUARD_LINES, everywhere="1")
    await uplink.release_forwarding(system)
    assert not any(c[:3] == ("sysctl", "-q", "-w") for c in system.commands)
    assert sum(c[0] == "iptables-restore" for c in system.commands) == 1  # the guards go


async def test_state_for_doctor() -> None:
    state = await uplink.forwarding_state(fake("0"), settings())
    assert state.ok
    assert "uplink eth0: forwarding off (nestbox turns it on" in state.describe()
    state = await uplink.forwarding_state(fake("0"), settings(egress_forwarding=False))
    assert not state.ok
    state = await uplink.forwarding_state(fake("1", guards=GUARD_LINES, nat=MASQUERADE), settings())
    assert state.ok
    assert state.egress_slots == 1
    assert "forwarding on by nestbox, guarded" in state.describe()


async def test_a_partial_set_of_guards_is_replaced_before_forwarding_goes_on() -> None:
    one = "\n".join(GUARD_LINES.splitlines()[:2]) + "\n"
    system = fake("0", guards=one)
    await uplink.ensure_forwarding(system, settings())
    [restore] = [c for c in system.calls if c.argv[0] == "iptables-restore"]
    lines = (restore.input or b"").decode().splitlines()
    assert [ln.split()[0] for ln in lines] == ["*filter", "-D", "-I", "-I", "COMMIT"]
    assert system.commands[-1] == ("sysctl", "-q", "-w", "net.ipv4.conf.eth0.forwarding=1")
