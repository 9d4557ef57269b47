"""Internet egress on a real guest, against a decoy "internet" made here: NAT out, DNS through
the agent's forwarder, the allow-list, and what stays blocked (private, link-local metadata,
the host's own addresses); egress off reaches none of it.

The decoy is a namespace (`nbvm-inet-*`) behind a veth whose root end is 198.19.250.1/29 and
whose far end holds the "public" 198.19.250.2 (web server + DNS server) and .3 (a second
web server), plus 172.31.250.2 (a "private" server) and 169.254.169.254 (a "metadata"
server). 198.19.250.0/24 and 172.31.250.0/24 are blackholed in the root namespace while the
test runs; the private and metadata addresses are routed to the decoy only for packets from
the capsule's slot (a policy rule on its veth address), so even a broken firewall would send
them to the decoy and never off the machine. The agent's DNS forwarder asks the decoy's DNS
server (`dns_upstream`), never a real resolver. The decoy's root end is the agent's only uplink
(`egress_uplinks`) and starts with forwarding off: the agent turns it on (guarded) for the
egress capsule, as it would the host's real uplink, and off again after.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.integration.vm.conftest import open_runtime, sh

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.settings import AgentSettings

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

PUBLIC, PUBLIC_2, ROOT_END = "198.19.250.2", "198.19.250.3", "198.19.250.1"
PRIVATE, METADATA = "172.31.250.2", "169.254.169.254"
BLACKHOLES = ("198.19.250.0/24", "172.31.250.0/24")
NAMES = {"decoy.example": PUBLIC, "second.example": PUBLIC_2}

WEB = """
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("decoy " + sys.argv[1]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
socketserver.TCPServer.allow_reuse_address = True
s = socketserver.TCPServer((sys.argv[1], 80), H); print("up", flush=True); s.serve_forever()
"""

DNS = """
import socket, struct, sys, json
names = json.loads(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
print("up", flush=True)
while True:
    q, addr = s.recvfrom(512)
    qid, = struct.unpack("!H", q[:2]); pos = 12; labels = []
    while q[pos]:
        labels.append(q[pos + 1:pos + 1 + q[pos]].decode()); pos += 1 + q[pos]
    question = q[12:pos + 5]; name = ".".join(labels).lower(); qtype = q[pos + 1:pos + 3]
    ip = names.get(name)
    if ip and qtype == b"\\x00\\x01":
        ans = b"\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04" + socket.inet_aton(ip)
        head = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    else:
        ans = b""; head = struct.pack("!HHHHHH", qid, 0x8183 if not ip else 0x8180, 1, 0, 0, 0)
    s.sendto(head + question + ans, addr)
"""

# Run in the guest, one interpreter for all probes (Python starts slowly under TCG), each in a
# thread: an argument `http://…` prints the body or "blocked <error>"; a host name prints its
# address or "unresolved <error>". One line per argument, in order.
PROBE = """
import socket, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
def one(arg):
    try:
        if arg.startswith("http://"):
            return urllib.request.urlopen(arg, timeout=3).read().decode()
        return socket.gethostbyname(arg)
    except Exception as e:
        return ("blocked " if arg.startswith("http://") else "unresolved ") + repr(e)
with ThreadPoolExecutor(16) as pool:
    print("\\n".join(pool.map(one, sys.argv[1:])))
"""


def _popen_up(*argv: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up", argv
    return proc


@pytest.fixture
def internet() -> Iterator[str]:
    """The decoy internet (see the module docstring); yields the root end's interface name."""
    import json

    tag = secrets.token_hex(2)
    ns, dev = f"nbvm-inet-{tag}", f"nbvmi{tag}"
    existing = sh("ip", "route", "show", "type", "blackhole")
    procs: list[subprocess.Popen[str]] = []
    try:
        for cidr in BLACKHOLES:
            sh("ip", "route", "replace", "blackhole", cidr)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{ROOT_END}/29", "dev", dev)
        sh("ip", "link", "set", dev, "up")
        sh("sysctl", "-q", "-w", f"net.ipv4.conf.{dev}.forwarding=0")  # the agent's to turn on
        for address in (f"{PUBLIC}/29", f"{PUBLIC_2}/29", f"{PRIVATE}/32", f"{METADATA}/32"):
            sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", ROOT_END)
        exec_ns = ("ip", "netns", "exec", ns, sys.executable, "-c")
        for address in (PUBLIC, PUBLIC_2, PRIVATE, METADATA):
            procs.append(_popen_up(*exec_ns, WEB, address))
        procs.append(_popen_up(*exec_ns, DNS, PUBLIC, json.dumps(NAMES)))
        yield dev
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        # The agent's uplink guards for `dev`, if an egress slot of another agent on this host
        # kept them (they go with the host's last egress slot) or the test failed half-way.
        for line in sh("iptables", "-w", "-S", "FORWARD").splitlines():
            if f"nestbox-uplink:{dev}" in line:
                args = line.replace('"', "").split()
                subprocess.run(["iptables", "-w", "-D", *args[1:]], capture_output=True)
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for cidr in BLACKHOLES:
            if cidr not in existing:
                subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True)


@contextlib.contextmanager
def private_routes_for(capsule: Capsule, dev: str) -> Iterator[None]:
    """Route the private and metadata decoys, for the capsule's slot only (see the module
    docstring), through a routing table and a policy rule of its own."""
    assert capsule.run is not None
    source = capsule.run.network.veth_ns_ip
    table = str(20000 + capsule.run.network.slot)
    try:
        for address in (PRIVATE, METADATA):
            sh("ip", "route", "add", f"{address}/32", "via", PUBLIC, "dev", dev, "table", table)
        sh("ip", "rule", "add", "from", f"{source}/32", "lookup", table, "priority", "100")
        yield
    finally:
        subprocess.run(["ip", "rule", "del", "from", f"{source}/32", "lookup", table,
                        "priority", "100"], capture_output=True)  # fmt: skip
        subprocess.run(["ip", "route", "flush", "table", table], capture_output=True)


async def probe(capsule: Capsule, *args: str) -> list[str]:
    """`PROBE` in the guest: one answer per argument."""
    result = await capsule.envd.exec(
        "timeout", ["120", "python3", "-c", PROBE, *args], timeout_s=None
    )
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(args), (result.stdout, result.stderr)
    return lines


def decoy_settings(vm: AgentSettings, uplink: str) -> AgentSettings:
    update = {"dns_upstream": [PUBLIC], "warm_slots": 0, "egress_uplinks": [uplink]}
    return vm.model_copy(update=update)


async def test_egress_on_reaches_the_decoy_internet_and_nothing_internal(
    vm: AgentSettings, internet: str
) -> None:
    async with open_runtime(decoy_settings(vm, internet)) as runtime:
        [online] = await runtime.clone("minimal", egress=True)
        [offline] = await runtime.clone("minimal")
        assert online.run is not None
        net = online.run.network
        # The decoy answers from the root namespace (positive control of the decoy itself).
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            assert (await client.get(f"http://{PUBLIC}/")).text == f"decoy {PUBLIC}"
        internal = (PRIVATE, METADATA, ROOT_END, net.veth_host_ip)
        with private_routes_for(online, internet):
            answers = await probe(
                online, f"http://{PUBLIC}/", "decoy.example", "http://second.example/",
                *(f"http://{target}/" for target in internal),
            )  # fmt: skip
        # NAT out, by address and by name (DNS through the agent's forwarder)...
        assert answers[:3] == [f"decoy {PUBLIC}", PUBLIC, f"decoy {PUBLIC_2}"]
        # ...never private, link-local metadata, nor the host's own addresses.
        for target, answer in zip(internal, answers[3:], strict=True):
            assert answer.startswith("blocked"), (target, answer)
        # Egress off: neither the internet nor DNS (refused at once, not left to time out).
        off = await probe(offline, f"http://{PUBLIC}/", "decoy.example")
        assert off[0].startswith("blocked"), off
        assert off[1].startswith("unresolved"), off
        # The setting is kept across a pause: the resumed capsule is online again.
        await runtime.pause(online.id)
        await runtime.resume(online.id)
        assert await probe(online, "http://decoy.example/") == [f"decoy {PUBLIC}"]


async def test_egress_allow_list_reaches_only_what_it_names(
    vm: AgentSettings, internet: str
) -> None:
    async with open_runtime(decoy_settings(vm, internet)) as runtime:
        [capsule] = await runtime.clone("minimal", egress=True, egress_allow=["decoy.example"])
        assert capsule.run is not None
        assert capsule.run.network.egress_allow == (f"{PUBLIC}/32",)
        allowed, other = await probe(capsule, "http://decoy.example/", f"http://{PUBLIC_2}/")
        assert allowed == f"decoy {PUBLIC}"
        assert other.startswith("blocked"), other
