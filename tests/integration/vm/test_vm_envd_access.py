"""Who can talk to a capsule's envd, with real QEMU guests (clones of the session's `minimal`
template): its own access token, fresh for every clone and after every resume, and only from
the host side of the slot's veth, over IPv4 (IPv6 is off in every slot netns).

Requests from the host go to the capsule address directly (`host_address:49983`) in raw HTTP
(`http.client`), the way anything on the host could send them.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from nestbox.hostagent.storage.templates import load_template
from nestbox.protocol.envd import ENVD_PORT
from tests.integration.vm.conftest import open_runtime, sh

if TYPE_CHECKING:
    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.settings import AgentSettings

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

GUEST_IP, GUEST_PORT = "169.254.0.21", 8000


def envd_call(
    capsule: Capsule, method: str, path: str, token: str | None, body: bytes = b""
) -> int:
    """The status of one raw request from the host to the capsule's envd."""
    assert capsule.host_address is not None
    conn = http.client.HTTPConnection(capsule.host_address, ENVD_PORT, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Access-Token"] = token
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def accepts(capsule: Capsule, token: str | None) -> bool:
    """True if envd serves `token` (checked on a data route and an RPC), False if it answers
    401 to both; anything else fails the test."""
    envs = envd_call(capsule, "GET", "/envs", token)
    stat_ = envd_call(capsule, "POST", "/filesystem.Filesystem/Stat", token, b'{"path": "/"}')
    assert envs == stat_, (envs, stat_)
    assert envs in (200, 401), envs
    return envs == 200


def record_on_disk(vm: AgentSettings, capsule: Capsule) -> dict[str, object]:
    path = vm.state_dir / "capsules" / f"{capsule.id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


async def test_two_clones_get_their_own_tokens(vm: AgentSettings) -> None:
    template = load_template(vm.templates_dir, "minimal")
    template_token = template.meta.access_token
    assert template_token  # the booted capsule's, kept with the snapshot ...
    assert stat.S_IMODE(template.dir.meta_file.stat().st_mode) == 0o600  # ... privately
    async with open_runtime(vm) as runtime:
        a, b = await runtime.clone("minimal", 2)
        tokens = [a.record.access_token, b.record.access_token]
        assert all(tokens)
        assert len({*tokens, template_token}) == 3
        for capsule in (a, b):
            assert capsule.record.pending_token is None
            on_disk = record_on_disk(vm, capsule)
            assert on_disk["access_token"] == capsule.record.access_token
            assert on_disk["pending_token"] is None
        ta, tb = a.record.access_token, b.record.access_token

        def check() -> None:
            assert accepts(a, ta)
            assert accepts(b, tb)
            for capsule, others in ((a, [tb, template_token, None, ""]),
                                    (b, [ta, template_token, None, ""])):  # fmt: skip
                for token in others:
                    assert not accepts(capsule, token), token
                assert envd_call(capsule, "GET", "/health", None) == 200

        await anyio.to_thread.run_sync(check)
        # The agent's own clients carry the new tokens.
        assert (await a.envd.exec("true", timeout_s=None)).exit_code == 0
        assert (await b.envd.exec("true", timeout_s=None)).exit_code == 0


async def test_every_resume_sets_a_new_token(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        seen = [capsule.record.access_token]
        for _ in range(2):
            await runtime.pause(capsule.id)
            paused = record_on_disk(vm, capsule)
            assert paused["state"] == "paused"
            assert (paused["access_token"], paused["pending_token"]) == (seen[-1], None)
            await runtime.resume(capsule.id)
            token = capsule.record.access_token
            assert token is not None
            assert token not in seen
            assert record_on_disk(vm, capsule)["access_token"] == token
            assert await anyio.to_thread.run_sync(accepts, capsule, token)
            for old in seen:
                assert not await anyio.to_thread.run_sync(accepts, capsule, old)
            assert (await capsule.envd.exec("true", timeout_s=None)).exit_code == 0
            seen.append(token)


# --- the network side: envd only from the host side of the veth, no IPv6 --------------------

SERVE = """
import socket
s = socket.create_server(("::", 8000), family=socket.AF_INET6, dualstack_ipv6=True)
while True:
    c, _ = s.accept()
    c.sendall(b"guest-server")
    c.close()
"""

PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.settimeout(10)
    print(s.recv(64).decode() or "connected")
except OSError as e:
    print("FAIL", e)
"""


def probe_from_netns(netns: str, host: str, port: int, timeout: float = 2.0) -> str:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, host, str(port)]
    done = subprocess.run([*argv, str(timeout)], capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


async def probe_from_guest(capsule: Capsule, host: str, port: int, wait: float = 3.0) -> str:
    result = await capsule.envd.exec(
        "python3", ["-c", PROBE, host, str(port), str(wait)], timeout_s=None
    )
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


def link_local(mac: str) -> str:
    """The EUI-64 link-local address an interface with `mac` would have."""
    b = bytearray(int(x, 16) for x in mac.split(":"))
    b[0] ^= 0x02
    eui = bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


async def test_envd_only_from_the_host_side_and_no_ipv6(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        assert capsule.run is not None
        netns = capsule.run.network.netns
        # IPv6 is off in the slot netns: no address on any interface.
        for conf in ("all", "default", "lo", "tap0", "veth0"):
            value = sh("ip", "netns", "exec", netns, "sysctl", "-n",
                       f"net.ipv6.conf.{conf}.disable_ipv6")  # fmt: skip
            assert value.strip() == "1", conf
        assert sh("ip", "-n", netns, "-6", "addr", "show") == ""
        # A dual-stack server in the guest, and the guest's own link-local address.
        start = 'python3 -c "$SERVE" > /dev/null 2>&1 &'
        assert (
            await capsule.envd.exec("sh", ["-c", start], envs={"SERVE": SERVE}, timeout_s=None)
        ).exit_code == 0
        out = (
            await capsule.envd.exec(
                "ip", ["-6", "-o", "addr", "show", "dev", "eth0"], timeout_s=None
            )
        ).stdout
        words = out.decode().split()
        guest_ll = words[words.index("inet6") + 1].split("/")[0]
        assert guest_ll.startswith("fe80:"), out

        def from_netns() -> None:
            # Positive control: the netns reaches the guest's server over IPv4 ...
            deadline = time.monotonic() + 60
            while (got := probe_from_netns(netns, GUEST_IP, GUEST_PORT)) != "guest-server":
                assert time.monotonic() < deadline, got
                time.sleep(0.5)
            # ... but neither it nor envd over the guest's link-local IPv6 address ...
            for port in (GUEST_PORT, ENVD_PORT):
                got = probe_from_netns(netns, f"{guest_ll}%tap0", port)
                assert got.startswith("FAIL"), (port, got)
            # ... nor envd over IPv4 from inside the netns: only the host side of the veth.
            assert probe_from_netns(netns, GUEST_IP, ENVD_PORT).startswith("FAIL")
            assert envd_call(capsule, "GET", "/health", None) == 200

        await anyio.to_thread.run_sync(from_netns)
        # From the guest: IPv6 works inside it (its own link-local address, the positive
        # control), but the netns never answers it over IPv6, not even with a reset.
        got = await probe_from_guest(capsule, f"{guest_ll}%eth0", GUEST_PORT)
        assert got == "guest-server"
        mac = sh("ip", "-n", netns, "-o", "link", "show", "tap0").split("link/ether ")[1].split()[0]
        got = await probe_from_guest(capsule, f"{link_local(mac)}%eth0", 9)
        assert got.startswith("FAIL"), got
        assert "refused" not in got, got
