"""The egress DNS forwarder and the allow-list resolver, over loopback UDP against a fake
upstream (no namespace, no real resolver)."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from typing import TYPE_CHECKING

import pytest

from nestbox.hostagent.network import egress
from tests.conftest import eventually

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
        assert self.transport is not None
        self.transport.sendto(answer(data), addr)


def answer(data: bytes) -> bytes:
    """The fake upstream's answer to query `data`."""
    qid = data[:2]
    pos, labels = 12, []
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]].decode())
        pos += 1 + data[pos]
    question = data[12 : pos + 5]
    ip = NAMES.get(".".join(labels))
    if ip is None:
        return qid + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + question
    head = qid + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    return (
        head + question + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(ip)
    )


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


async def open_forwarder(upstream_port: int) -> tuple[egress.DnsForwarder, int]:
    """A forwarder on a free loopback port, UDP and TCP both (a port free for UDP may be taken
    for TCP, or taken by then: another port is tried); (it, its port)."""
    for _ in range(20):
        port = free_udp_port()
        try:
            forwarder = await egress.DnsForwarder.open("127.0.0.1", port, ["127.0.0.1"],
                                                       upstream_port)  # fmt: skip
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            continue
        return forwarder, port
    pytest.fail("no loopback port free for both UDP and TCP in 20 tries")


async def test_forwarder_relays_queries_and_answers(upstream: tuple[FakeUpstream, int]) -> None:
    fake, up_port = upstream
    forwarder, port = await open_forwarder(up_port)
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
    forwarder, port = await open_forwarder(free_udp_port())
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


# ── TCP ──


@pytest.fixture
async def tcp_upstream() -> AsyncIterator[tuple[list[bytes], int]]:
    """A fake upstream over TCP (length-prefixed, one query per connection); the queries it
    got and its port."""
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        query = await reader.readexactly(size)
        got.append(query)
        reply = answer(query)
        writer.write(struct.pack("!H", len(reply)) + reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield got, server.sockets[0].getsockname()[1]
    server.close()


async def tcp_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def tcp_ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, query: bytes
) -> bytes:
    writer.write(struct.pack("!H", len(query)) + query)
    await writer.drain()
    (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
    return await asyncio.wait_for(reader.readexactly(size), 5)


async def closed(reader: asyncio.StreamReader) -> bool:
    """The forwarder closed the connection (EOF or reset) rather than answering."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


async def test_forwarder_over_tcp(tcp_upstream: tuple[list[bytes], int]) -> None:
    got, up_port = tcp_upstream
    forwarder, port = await open_forwarder(up_port)
    try:
        # Several queries on one connection, each relayed over TCP, answered in turn.
        reader, writer = await tcp_connect(port)
        reply = await tcp_ask(reader, writer, egress.a_query("decoy.example", 0xBEEF))
        assert egress.parse_a_answers(reply, 0xBEEF) == ["198.51.100.7"]
        reply = await tcp_ask(reader, writer, egress.a_query("nowhere.example", 7))
        assert reply[:2] == b"\x00\x07"
        assert reply[3] & 0x0F == 3
        assert len(got) == 2
        # A query over MAX_QUERY bytes closes the connection, never sent upstream.
        writer.write(struct.pack("!H", egress.MAX_QUERY + 1) + b"\0" * (egress.MAX_QUERY + 1))
        assert await closed(reader)
        writer.close()
        assert len(got) == 2
        # At most MAX_TCP_CONNECTIONS at once: one more is closed at once, unanswered...
        held = [await tcp_connect(port) for _ in range(egress.MAX_TCP_CONNECTIONS)]
        extra_reader, extra_writer = await tcp_connect(port)
        extra_writer.write(b"\x00\x0c" + b"\0" * 12)
        assert await closed(extra_reader)
        extra_writer.close()
        # ...and room is made when one goes.
        held.pop()[1].close()

        async def answered() -> bool:
            r, w = await tcp_connect(port)
            try:
                return egress.parse_a_answers(
                    await tcp_ask(r, w, egress.a_query("decoy.example", 9)), 9
                ) == ["198.51.100.7"]
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return False
            finally:
                w.close()

        await eventually(answered, what="room for a new connection after one closed")
        for _, w in held:
            w.close()
    finally:
        forwarder.close()


async def test_tcp_connection_idle_too_long_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egress, "TCP_IDLE_S", 0.2)
    forwarder, port = await open_forwarder(free_udp_port())
    try:
        reader, writer = await tcp_connect(port)
        writer.write(b"\x00")  # half a length prefix, then nothing
        assert await closed(reader)
        writer.close()
    finally:
        forwarder.close()
