"""The /proc/net/tcp parser, the loopback-listener filter, and PortSubsystem's socat bookkeeping
against a fake /proc/net and a fake `socat` (a script that just waits): no network."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
from pathlib import Path

import pytest

from nestbox.envd.ports import (
    RESTART_FIRST_SCAN_S,
    PortStatistics,
    PortSubsystem,
    loopback_listeners,
    parse_proc_net_tcp,
)
from tests.conftest import eventually

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"


def row(local: str, state: str) -> str:
    return f"   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000  0\n"


TCP = HEADER + "".join(
    [
        row("0100007F:1F90", "0A"),  # 127.0.0.1:8080 LISTEN        -> forward
        row("00000000:0016", "0A"),  # 0.0.0.0:22 LISTEN            -> reachable already
        row("0200007F:1F90", "0A"),  # 127.0.0.2:8080 (socat's own) -> never
        row("0100007F:1388", "01"),  # 127.0.0.1:5000 ESTABLISHED   -> not a listener
        row("0100007F:C383", "0A"),  # 127.0.0.1:50051 but envd's own port -> ignored
        "   garbage line\n",
    ]
)
TCP6 = HEADER + "".join(
    [
        row("00000000000000000000000001000000:2328", "0A"),  # [::1]:9000 -> forward over v6
        row("0000000000000000FFFF00000100007F:1B58", "0A"),  # [::ffff:127.0.0.1]:7000 -> v4
        row("00000000000000000000000000000000:0050", "0A"),  # [::]:80 -> reachable already
        row("00000000000000000000000001000000:1F90", "0A"),  # [::1]:8080, also on v4 -> v4
    ]
)


def test_parser_decodes_addresses_ports_and_states() -> None:
    sockets = parse_proc_net_tcp(TCP)
    assert len(sockets) == 5  # the garbage line is skipped
    first = sockets[0]
    assert (first.address, first.port, first.state) == (
        ipaddress.ip_address("127.0.0.1"),
        8080,
        0x0A,
    )
    v6 = parse_proc_net_tcp(TCP6)
    assert v6[0].address == ipaddress.ip_address("::1")
    assert v6[1].address == ipaddress.ip_address("::ffff:127.0.0.1")


def test_only_loopback_listeners_are_forwarded() -> None:
    sockets = parse_proc_net_tcp(TCP) + parse_proc_net_tcp(TCP6)
    assert loopback_listeners(sockets, ignore=frozenset({50051})) == {
        8080: False,
        9000: True,
        7000: False,
    }


def test_a_loopback_forward_address_is_refused() -> None:
    with pytest.raises(ValueError, match="onto itself"):
        PortSubsystem("127.0.0.1", 1.0)


@pytest.fixture
def fake_socat(tmp_path: Path) -> Path:
    script = tmp_path / "socat"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    return script


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists" for kill(0); it counts as dead.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def socat_args(ports: PortSubsystem, port: int) -> list[str]:
    args = ports._socats[port].args
    assert isinstance(args, list)
    return [str(a) for a in args[1:]]


async def test_subsystem_follows_listeners_and_stop_kills_every_socat(
    tmp_path: Path, fake_socat: Path
) -> None:
    proc_net = tmp_path / "net"
    proc_net.mkdir()
    (proc_net / "tcp").write_text(HEADER + row("0100007F:1F90", "0A"))
    ports = PortSubsystem("10.0.0.2", 3600, proc_net=proc_net, socat=str(fake_socat))

    ports.scan_once()  # one scan by hand: the interval is an hour
    stats = ports.statistics()
    assert stats.forwarded == (8080,)
    pid = ports._socats[8080].pid
    assert os.getpgid(pid) == pid  # its own process group
    assert socat_args(ports, 8080) == [
        "TCP4-LISTEN:8080,bind=10.0.0.2,reuseaddr,fork",
        "TCP4:127.0.0.1:8080",
    ]

    (proc_net / "tcp6").write_text(HEADER + row("00000000000000000000000001000000:2328", "0A"))
    ports.scan_once()
    assert ports.statistics().forwarded == (8080, 9000)
    assert socat_args(ports, 9000) == [
        "TCP4-LISTEN:9000,bind=10.0.0.2,reuseaddr,fork",
        "TCP6:[::1]:9000",
    ]

    (proc_net / "tcp").write_text(HEADER)  # 8080's server went away
    ports.scan_once()
    assert ports.statistics().forwarded == (9000,)
    await ports.stop()  # also reaps what the scan killed
    await eventually(lambda: not alive(pid), within=10, what="pid killed")

    await ports.start()
    await ports.start()  # idempotent
    assert ports.statistics().running
    await ports.stop()
    await ports.stop()
    assert ports.statistics() == PortStatistics(
        running=False, forward_address="10.0.0.2", forwarded=()
    )


async def test_a_socat_that_dies_is_started_again(tmp_path: Path, fake_socat: Path) -> None:
    proc_net = tmp_path / "net"
    proc_net.mkdir()
    (proc_net / "tcp").write_text(HEADER + row("0100007F:1F90", "0A"))
    ports = PortSubsystem("10.0.0.2", 3600, proc_net=proc_net, socat=str(fake_socat))
    ports.scan_once()
    first = ports._socats[8080]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    ports.scan_once()
    assert ports._socats[8080].pid != first.pid
    await ports.stop()


async def test_forwarding_off_is_a_no_op() -> None:
    ports = PortSubsystem(None, 0.01)
    await ports.start()
    assert not ports.statistics().running
    await ports.restart()
    await ports.stop()


async def test_a_restart_scans_first_after_a_short_delay(
    tmp_path: Path, fake_socat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restore the request that triggered the restart answers before the first scan;
    a plain start scans at once."""
    proc_net = tmp_path / "net"
    proc_net.mkdir()
    (proc_net / "tcp").write_text(HEADER + row("0100007F:1F90", "0A"))
    ports = PortSubsystem("10.0.0.2", 3600, proc_net=proc_net, socat=str(fake_socat))
    scans: list[float] = []
    monkeypatch.setattr(ports, "scan_once", lambda: scans.append(asyncio.get_running_loop().time()))
    await ports.start()
    await asyncio.sleep(0.01)
    assert len(scans) == 1
    started = asyncio.get_running_loop().time()
    await ports.restart()
    await asyncio.sleep(0.01)
    assert len(scans) == 1
    await asyncio.sleep(RESTART_FIRST_SCAN_S)
    assert len(scans) == 2
    assert scans[1] - started >= RESTART_FIRST_SCAN_S
    await ports.stop()


async def test_an_idle_envd_scans_seldom_and_a_request_scans_at_once(
    tmp_path: Path, fake_socat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short period while envd is in use, the idle period (here an hour) after `active_s`
    without a request; a request (`activity()`) ends the idle wait with a scan at once."""
    proc_net = tmp_path / "net"
    proc_net.mkdir()
    (proc_net / "tcp").write_text(HEADER)
    ports = PortSubsystem("10.0.0.2", 0.01, proc_net=proc_net, socat=str(fake_socat),
                          idle_interval=3600, active_s=0.1)  # fmt: skip
    scans: list[float] = []
    monkeypatch.setattr(ports, "scan_once", lambda: scans.append(asyncio.get_running_loop().time()))
    await ports.start()
    try:
        await eventually(lambda: len(scans) >= 3)  # in use: every 0.01 s
        await eventually(lambda: ports.idle)  # 0.1 s without a request: the hour-long wait
        seen = len(scans)
        ports.activity()
        await eventually(lambda: len(scans) > seen)
        await eventually(lambda: len(scans) > seen + 2)  # in use again: the short period
    finally:
        await ports.stop()


async def test_an_idle_envd_does_not_scan_until_asked(tmp_path: Path, fake_socat: Path) -> None:
    """`idle_interval` 0 (the default): no scan at all while idle; `scan_now()` (the port
    proxy's `POST /ports/scan`) forwards a new loopback listener and answers once its socat
    listens; stopped (before a snapshot), it starts nothing."""
    proc_net = tmp_path / "net"
    proc_net.mkdir()
    (proc_net / "tcp").write_text(HEADER)
    ports = PortSubsystem("10.0.0.2", 0.01, proc_net=proc_net, socat=str(fake_socat),
                          idle_interval=0, active_s=0.05)  # fmt: skip
    assert await ports.scan_now() == ()  # not started
    await ports.start()
    try:
        await eventually(lambda: ports.idle)
        # A server starts on loopback while envd is idle: nothing notices it...
        (proc_net / "tcp").write_text(HEADER + row("0100007F:1F90", "0A"))
        await asyncio.sleep(0.1)
        assert ports.idle
        assert ports.statistics().forwarded == ()
        # ...until the proxy asks. (The socat's own listener, as the kernel would show it.)
        (proc_net / "tcp").write_text(
            HEADER + row("0100007F:1F90", "0A") + row("0200000A:1F90", "0A")
        )
        assert await ports.scan_now() == (8080,)
        assert socat_args(ports, 8080)[0] == "TCP4-LISTEN:8080,bind=10.0.0.2,reuseaddr,fork"
    finally:
        await ports.stop()
    assert await ports.scan_now() == ()
    assert ports.statistics().forwarded == ()
