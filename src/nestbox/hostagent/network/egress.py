"""A capsule's internet egress: its allow-list and the DNS forwarder on its gateway.

Egress is off by default (the guest may only answer). With egress on, the slot gets a default
route and NAT (see `firewall`), and DNS works through a forwarder the agent runs for that slot:
the guest's resolv.conf names its gateway (169.254.0.22, tap0 in the slot's netns), which the
netns DNATs (port 53, UDP and TCP) to the host end of the slot's veth, `dns_port`, where this
module listens and relays each query to the upstream resolvers (`dns_upstream`, else the host's
/etc/resolv.conf), over the protocol it came by (a stub retries over TCP when a UDP answer is
truncated). So a guest needs no route to the host's resolver, which is often on a private or
loopback address the firewall denies it. The forwarder binds only that veth address (nothing
else on the host can reach it) and is bounded: at most `MAX_IN_FLIGHT` UDP queries, and
`MAX_TCP_CONNECTIONS` TCP connections, each closed after `TCP_IDLE_S` without a complete query,
after `MAX_TCP_QUERIES` queries, or on a query over `MAX_QUERY` bytes.

The allow-list (`allow`): CIDRs or host names. Names are resolved once, when the network is
built, through the same upstreams, into /32s; private, link-local, metadata and the host's own
addresses stay denied whatever is listed (the deny rules come first). The list rides along the
call that builds the network in a context variable (`egress_allow`), set by the manager around
create and resume, so the layers between (runtime, lifecycle, slot pool) need no new argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import logging
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
UPSTREAM_TIMEOUT_S = 3.0
MAX_QUERY = 4096
MAX_TCP_CONNECTIONS = 16
MAX_TCP_QUERIES = 64
TCP_IDLE_S = 10.0
MAX_ALLOW = 64
HOST_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)

_ALLOW: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "nestbox_egress_allow", default=()
)


@contextlib.contextmanager
def egress_allow(allow: Sequence[str]) -> Iterator[None]:
    """Slot networks built inside this block (in this task) restrict egress to `allow`."""
    token = _ALLOW.set(tuple(allow))
    try:
        yield
    finally:
        _ALLOW.reset(token)


def current_allow() -> tuple[str, ...]:
    return _ALLOW.get()


class BadEgress(ValueError):
    """An allow-list entry that is neither a CIDR nor a host name, or a name that does not
    resolve (the capsule would silently reach nothing): a client error."""


@dataclass(frozen=True, slots=True)
class AllowList:
    cidrs: tuple[str, ...]
    names: tuple[str, ...]


def parse_allow(entries: Sequence[str]) -> AllowList:
    """Split and check an allow-list: IPv4 CIDRs or addresses, and host names.

    :raise BadEgress: an entry is neither, or there are more than `MAX_ALLOW`.
    """
    if len(entries) > MAX_ALLOW:
        raise BadEgress(f"at most {MAX_ALLOW} egress allow entries")
    cidrs: list[str] = []
    names: list[str] = []
    for entry in entries:
        text = entry.strip()
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not HOST_NAME.match(text) or text.replace(".", "").isdigit():
                raise BadEgress(
                    f"egress allow entry {entry!r} is not a CIDR or host name"
                ) from None
            names.append(text.rstrip(".").lower())
            continue
        if net.version != 4:
            raise BadEgress(f"egress allow entry {entry!r}: only IPv4 (guests have no IPv6)")
        cidrs.append(str(net))
    return AllowList(tuple(cidrs), tuple(names))


def host_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The IPv4 nameservers of the host's resolv.conf (a small file, read at start-up)."""
    found: list[str] = []
    try:
        text = resolv_conf.read_text()
    except OSError:
        return found
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(words[1]).version == 4:
                    found.append(words[1])
    return found


# ── a minimal DNS client (A records), for allow-list names ───────────────────────────────


def a_query(name: str, query_id: int) -> bytes:
    """A standard recursive query for `name`'s A records."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split(".") if p)
    return header + labels + b"\x00" + struct.pack("!HH", 1, 1)


def parse_a_answers(packet: bytes, query_id: int) -> list[str]:
    """The A records of a response to `query_id` (empty on any mismatch or error)."""
    if len(packet) < 12:
        return []
    qid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", packet[:12])
    if qid != query_id or not flags & 0x8000 or flags & 0x000F:
        return []
    pos = 12
    try:
        for _ in range(qd):
            pos = _skip_name(packet, pos) + 4
        found: list[str] = []
        for _ in range(an):
            pos = _skip_name(packet, pos)
            rtype, rclass, _ttl, rdlen = struct.unpack("!HHIH", packet[pos : pos + 10])
            pos += 10
            if rtype == 1 and rclass == 1 and rdlen == 4:
                found.append(str(ipaddress.IPv4Address(packet[pos : pos + 4])))
            pos += rdlen
        return found
    except (struct.error, IndexError, ValueError):
        return []


def _skip_name(packet: bytes, pos: int) -> int:
    while True:
        length = packet[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + length


async def resolve_a(name: str, upstreams: Sequence[str], *, port: int = 53) -> list[str]:
    """`name`'s IPv4 addresses from the first upstream that answers (empty if none does)."""
    for upstream in upstreams:
        query_id = secrets.randbelow(1 << 16)
        reply = await _exchange(a_query(name, query_id), upstream, port)
        if reply is not None and (found := parse_a_answers(reply, query_id)):
            return found
    return []


async def resolve_allow(allow: AllowList, upstreams: Sequence[str], *, port: int = 53) -> list[str]:
    """The allow-list as CIDRs: its own, and a /32 per address of each name.

    :raise BadEgress: a name did not resolve (the capsule would silently reach nothing).
    """
    cidrs = list(allow.cidrs)
    for name in allow.names:
        found = await resolve_a(name, upstreams, port=port)
        if not found:
            raise BadEgress(f"egress allow entry {name!r} does not resolve")
        cidrs += [f"{a}/32" for a in found]
    return sorted(set(cidrs))


async def _exchange(query: bytes, upstream: str, port: int) -> bytes | None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    class _Reply(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
            if not done.done():
                done.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not done.done():
                done.set_exception(exc)

    try:
        transport, _ = await loop.create_datagram_endpoint(_Reply, remote_addr=(upstream, port))
    except OSError as err:
        log.debug("DNS upstream %s unreachable: %s", upstream, err)
        return None
    try:
        transport.sendto(query)
        return await asyncio.wait_for(done, UPSTREAM_TIMEOUT_S)
    except (TimeoutError, OSError):
        return None
    finally:
        transport.close()


async def _tcp_exchange(query: bytes, upstream: str, port: int) -> bytes | None:
    """One query over TCP (two-byte length prefix, RFC 1035 4.2.2); the answer or None."""
    try:
        async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(upstream, port)
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(size)
            finally:
                writer.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
        log.debug("DNS upstream %s (TCP) did not answer: %r", upstream, err)
        return None


# ── the forwarder ────────────────────────────────────────────────────────────────────────


async def upstreams_for(settings: AgentSettings) -> list[str]:
    """`dns_upstream`, else the host's resolv.conf nameservers."""
    if settings.dns_upstream:
        return list(settings.dns_upstream)
    return await anyio.to_thread.run_sync(host_upstreams)


async def open_forwarder(settings: AgentSettings, veth_host_ip: str) -> DnsForwarder:
    """The DNS forwarder of an egress slot (also for a slot recovery takes back: the
    forwarder lives in the agent, the slot's network outlives an agent restart).

    :raise OSError: the address cannot be bound.
    """
    return await DnsForwarder.open(veth_host_ip, settings.dns_port, await upstreams_for(settings))


class DnsForwarder(asyncio.DatagramProtocol):
    """Relays the guest's DNS queries (UDP and TCP) to the upstreams; one per egress slot."""

    def __init__(self, upstreams: Sequence[str], upstream_port: int = 53) -> None:
        self.upstreams = tuple(upstreams)
        self.upstream_port = upstream_port
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[Any]] = set()

    @classmethod
    async def open(
        cls, bind_ip: str, port: int, upstreams: Sequence[str], upstream_port: int = 53
    ) -> DnsForwarder:
        """Listening on `bind_ip:port`, UDP and TCP. :raise OSError: the address cannot be
        bound (nothing is left listening then)."""
        loop = asyncio.get_running_loop()
        forwarder = cls(upstreams, upstream_port)
        await loop.create_datagram_endpoint(lambda: forwarder, local_addr=(bind_ip, port))
        try:
            forwarder._server = await asyncio.start_server(
                forwarder._serve_tcp, bind_ip, port, reuse_address=True
            )
        except BaseException:
            forwarder.close()
            raise
        return forwarder

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One guest connection: length-prefixed queries, each relayed over TCP, in turn."""
        task = asyncio.current_task()
        if len(self._connections) >= MAX_TCP_CONNECTIONS or task is None:
            writer.close()  # the stub sees a reset connection and tries again later
            return
        self._connections.add(task)
        try:
            for _ in range(MAX_TCP_QUERIES):
                async with asyncio.timeout(TCP_IDLE_S):
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    if not 12 <= size <= MAX_QUERY:
                        return
                    query = await reader.readexactly(size)
                reply = await self._ask_tcp(query)
                if reply is None:
                    return  # closing tells the stub at once; silence would cost it a timeout
                writer.write(struct.pack("!H", len(reply)) + reply)
                async with asyncio.timeout(TCP_IDLE_S):
                    await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _ask_tcp(self, query: bytes) -> bytes | None:
        for upstream in self.upstreams:
            reply = await _tcp_exchange(query, upstream, self.upstream_port)
            if reply is not None and reply[:2] == query[:2]:
                return reply
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if len(self._tasks) >= MAX_IN_FLIGHT or len(data) < 12 or len(data) > 4096:
            return  # a resolver that does not answer: the guest's stub retries
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, query: bytes, addr: tuple[str | object, int]) -> None:
        for upstream in self.upstreams:
            reply = await _exchange(query, upstream, self.upstream_port)
            # The upstream's answer goes back as is: it carries the guest's own query id.
            if reply is not None and reply[:2] == query[:2]:
                if self._transport is not None and not self._transport.is_closing():
                    self._transport.sendto(reply, addr)
                return

    def close(self) -> None:
        for task in (*self._tasks, *self._connections):
            task.cancel()
        if self._transport is not None:
            self._transport.close()
        if self._server is not None:
            self._server.close()
