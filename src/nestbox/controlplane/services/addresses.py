"""Which host addresses the control plane will send traffic to (RPCs and proxied requests).

An address is `host:port` (`protocol.hosts.split_host_address`). Its host is resolved (in a
worker thread, never on the loop; nothing is sent to it) and every address it resolves to is
checked; one forbidden result refuses the whole address, so a name cannot smuggle a forbidden
address in beside a good one.

Refused for every host: unspecified (`0.0.0.0/8`, `::`), link-local (`169.254.0.0/16`, which
holds cloud metadata at 169.254.169.254, and `fe80::/10`), multicast, broadcast and reserved
addresses, and the control plane's own listen address (itself).

Refused for BYOC hosts (a team's own machine, registered by a team admin) as well: loopback
and any other address of the control plane's own machine (checked by binding a socket to it,
which succeeds only for local addresses and sends nothing), so a team cannot point the control
plane at services on its machine. Platform admins' regular hosts may be local (`make run`).

IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are judged as the IPv4 address they map.
Known limit: a name is resolved when the address is registered; DNS that changes afterwards
(rebinding) is not re-checked.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import TypeAlias

import anyio

from nestbox.controlplane.errors import InvalidRequest
from nestbox.controlplane.settings import split_listen
from nestbox.protocol.hosts import split_host_address

IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver: TypeAlias = Callable[[str, int], Sequence[str]]
RESOLVE_TIMEOUT_S = 10.0
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_UNSPECIFIED_LISTEN = ("", "0.0.0.0", "::")


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (blocking). :raise OSError:"""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve_ips(host: str, port: int, resolver: Resolver = resolve) -> list[IP]:
    """`host` itself if it is an address, else every address `resolver` gives for it (in a
    worker thread, at most `RESOLVE_TIMEOUT_S`), IPv4-mapped IPv6 addresses as their IPv4
    address. :raise InvalidRequest: it does not resolve (the message names `host`)."""
    try:
        return [unmapped(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found: list[str] = []
    with anyio.move_on_after(RESOLVE_TIMEOUT_S):
        try:
            found = list(await anyio.to_thread.run_sync(
                resolver, host, port, abandon_on_cancel=True))  # fmt: skip
        except OSError as err:
            raise InvalidRequest(f"{host!r} does not resolve: {err}") from None
    if not found:
        raise InvalidRequest(f"{host!r} does not resolve")
    # getaddrinfo may add a scope to IPv6 link-local results ("fe80::1%eth0")
    return [unmapped(ipaddress.ip_address(a.split("%", 1)[0])) for a in found]


def is_local(ip: IP) -> bool:
    """`ip` is an address of this machine: a socket binds to it, and not to an address of the
    documentation ranges (where `ip_nonlocal_bind` lets sockets bind anything, the probe says
    nothing and only the loopback rule holds). Sends nothing."""
    nowhere = ipaddress.ip_address("2001:db8::1" if ip.version == 6 else "192.0.2.1")
    return _binds(ip) and not _binds(nowhere)


def _binds(ip: IP) -> bool:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:  # no IPv6 on this machine: none of its addresses is local
        return False
    with probe:
        try:
            probe.bind((str(ip), 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


class AddressPolicy:
    """Checks host addresses against the rules above. `listen`: the control plane's own
    `host:port`; `resolver` and `local` (tests) replace name resolution and `is_local`."""

    def __init__(
        self,
        listen: str,
        *,
        resolver: Resolver = resolve,
        local: Callable[[IP], bool] = is_local,
    ) -> None:
        host, self._listen_port = split_listen(listen)
        self._listen_any = host in _UNSPECIFIED_LISTEN
        self._listen_host = host
        self._resolver = resolver
        self._local = local

    async def check(self, address: str, *, byoc: bool) -> None:
        """:raise InvalidRequest: `address` is malformed, does not resolve, or may not be used
        by this kind of host."""
        try:
            host, port = split_host_address(address)
        except ValueError as err:
            raise InvalidRequest(f"address {address!r}: {err}") from None
        listen: list[IP] = []
        if not self._listen_any:
            listen = await resolve_ips(self._listen_host, self._listen_port, self._resolver)
        try:
            ips = await resolve_ips(host, port, self._resolver)
        except InvalidRequest as err:
            raise InvalidRequest(f"address {address!r}: {err.message}") from None
        for ip in ips:
            problem = self._problem(ip, port, byoc=byoc, listen=listen)
            if problem is not None:
                raise InvalidRequest(f"address {address!r} ({ip}) is {problem}")

    def _problem(self, ip: IP, port: int, *, byoc: bool, listen: list[IP]) -> str | None:
        if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
            return "unspecified"
        if ip.is_link_local:
            return "link-local"
        if ip.is_multicast:
            return "multicast"
        if ip.version == 4 and ip.is_reserved:  # IPv6's reserved ::/8 holds loopback ::1
            return "reserved"
        if port == self._listen_port and (ip in listen or (self._listen_any and self._local(ip))):
            return "the control plane's own address"
        if byoc and ip.is_loopback:
            return "loopback, which a BYOC host may not use"
        if byoc and self._local(ip):
            return "an address of the control plane's machine, which a BYOC host may not use"
        return None


def unmapped(ip: IP) -> IP:
    """An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) as the IPv4 address it maps."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
