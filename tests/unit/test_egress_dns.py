"""The egress DNS forwarder and the allow-list resolver, over loopback UDP against a fake
upstream (no namespace, no real resolver)."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING

import pytest

from nestbox.hostagent.network import egress

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

NAMES = {"decoy.example": "198.51.100.7"}


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers A queries for `NAMES`; NXDOMAIN for the rest; counts what it got."""

    def __init__(self) -> None:
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.queries += 1
        qid = data[:2]
        pos, labels = 12, []
        while data[pos]:
            labels.append(data[pos + 1 : pos + 1 + data[pos]].decode())
            pos += 1 + data[pos]
        question = data[12 : pos + 5]
        ip = NAMES.get(".".join(labels))
        if ip is None:
            head = qid + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0)
            answer = b""
        else:
            head = qid + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
            answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(ip)
        assert self.transport is not None
        self.transport.sendto(head + question + answer, addr)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, int]]:
    loop = asyncio.get_running_loop()
    fake = FakeUpstream()
    transport, _ = await loop.create_datagram_endpoint(lambda: fake, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield fake, port
    transport.close()


async def ask(port: int, query: bytes, within: float = 5.0) -> bytes | None:
    """A guest's stub resolver: one datagram to the forwarder, its answer or None."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, query)
        try:
            return await asyncio.wait_for(loop.sock_recv(s, 4096), within)
        except TimeoutError:
            return None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_forwarder_relays_queries_and_answers(upstream: tuple[FakeUpstream, int]) -> None:
    fake, up_port = upstream
    port = free_udp_port()
    forwarder = await egress.DnsForwarder.open("127.0.0.1", port, ["127.0.0.1"], up_port)
    try:
        reply = await ask(port, egress.a_query("decoy.example", 0xBEEF))
        assert reply is not None
        assert egress.parse_a_answers(reply, 0xBEEF) == ["198.51.100.7"]
        # A name the upstream does not know: its NXDOMAIN comes back as is.
        reply = await ask(port, egress.a_query("nowhere.example", 7))
        assert reply is not None
        assert reply[:2] == b"\x00\x07"
        assert reply[3] & 0x0F == 3
        # Garbage (shorter than a DNS header) is dropped, never sent upstream.
        before = fake.queries
        assert await ask(port, b"\x01\x02", within=0.5) is None
        assert fake.queries == before
    finally:
        forwarder.close()


async def test_forwarder_without_a_live_upstream_stays_silent() -> None:
    port, dead = free_udp_port(), free_udp_port()
    forwarder = await egress.DnsForwarder.open("127.0.0.1", port, ["127.0.0.1"], dead)
    try:
        assert await ask(port, egress.a_query("decoy.example", 1), within=0.5) is None
    finally:
        forwarder.close()


async def test_resolve_allow(upstream: tuple[FakeUpstream, int]) -> None:
    _, up_port = upstream
    allow = egress.parse_allow(["decoy.example", "203.0.113.0/24"])
    cidrs = await egress.resolve_allow(allow, ["127.0.0.1"], port=up_port)
    assert cidrs == ["198.51.100.7/32", "203.0.113.0/24"]
    with pytest.raises(ValueError, match="does not resolve"):
        await egress.resolve_allow(egress.parse_allow(["nowhere.example"]), ["127.0.0.1"],
                                   port=up_port)  # fmt: skip
