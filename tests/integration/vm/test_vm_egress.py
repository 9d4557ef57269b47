"""A real guest with egress off (the default) reaches nothing: not an "outside" decoy netns the
root namespace can reach, not a listener on the host side of its own veth, not its slot's netns.

The decoy is a namespace made here (10.230.0.2, reachable from the root namespace over a veth),
so every address a probe could reach is one the test created. Egress is never turned on; the
full egress matrix (NAT, internal ranges, rate limit) is in test_network.py with a simulated
guest.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from tests.integration.vm.conftest import open_runtime, sh

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nestbox.hostagent.settings import AgentSettings

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

DECOY_NET, DECOY_HOST, DECOY = "10.230.0.0/30", "10.230.0.1", "10.230.0.2"
PORT = 8000
LISTEN = "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, \
socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print('up', \
flush=True)\nwhile True: c,_=s.accept(); c.sendall(b'reached'); c.close()"
PROBE = "import socket,sys\ntry:\n c=socket.create_connection((sys.argv[1], {port}), \
timeout=2); print('REACHED', c.recv(16))\nexcept OSError as e: print('blocked', e)"


def listener(*prefix: str, address: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", LISTEN, address, str(PORT)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def decoy(vm: AgentSettings) -> Iterator[str]:
    """An "outside world" netns with a listener, reachable from the root namespace only."""
    ns, dev = f"nbvm-out-{secrets.token_hex(2)}", f"nbvmo{secrets.token_hex(2)}"
    procs: list[subprocess.Popen[str]] = []
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{DECOY_HOST}/30", "dev", dev)
        sh("ip", "link", "set", dev, "up")
        sh("ip", "-n", ns, "addr", "add", f"{DECOY}/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        procs.append(listener("ip", "netns", "exec", ns, address=DECOY))
        yield ns
    finally:
        for proc in procs:
            stop(proc)
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def test_guest_without_egress_reaches_nothing(vm: AgentSettings, decoy: str) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        assert capsule.run is not None
        net = capsule.run.network
        host_side = listener(address=net.veth_host_ip)  # the host end of the capsule's veth
        ns_side = listener("ip", "netns", "exec", net.netns, address="169.254.0.22")
        try:
            probe = PROBE.format(port=PORT)
            for target in (DECOY, net.veth_host_ip, "169.254.0.22", "10.230.0.1"):
                # The probe's own connect timeout (2 s) decides; `timeout` only bounds a hang
                # (a loaded TCG guest can take seconds just to start python3).
                result = await capsule.envd.exec(
                    "timeout", ["60", "python3", "-c", probe, target], timeout_s=None
                )
                out = result.stdout.decode()
                assert out.startswith("blocked"), (target, out, result.stderr)
            # ...while the host reaches the guest (envd), and the decoy is really up
            assert await capsule.envd.is_healthy()
            reach = await anyio.run_process([sys.executable, "-c", probe, DECOY])
            assert reach.stdout.startswith(b"REACHED"), reach
        finally:
            stop(host_side)
            stop(ns_side)
