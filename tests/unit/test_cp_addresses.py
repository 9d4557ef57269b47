"""Host addresses the control plane will send traffic to (`AddressPolicy`), with name
resolution and "is this machine's address" replaced by tables (nothing is resolved or sent)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import pytest

from nestbox.controlplane.errors import InvalidRequest
from nestbox.controlplane.services.addresses import IP, AddressPolicy, is_local

NAMES = {
    "localhost": ["127.0.0.1", "::1"],
    "meta.internal": ["169.254.169.254"],
    "good.example": ["203.0.113.5", "2001:db8::5"],
    "mixed.example": ["203.0.113.5", "127.0.0.1"],  # one bad answer spoils the name
    "mapped.example": ["::ffff:127.0.0.1"],
    "scoped.example": ["fe80::1%eth0"],
    "nowhere.example": ["0.0.0.0"],
    "cp.example": ["198.51.100.1"],
}
LOCAL = {"127.0.0.1", "::1", "198.51.100.1", "198.51.100.2"}
"""Addresses of "this machine" (the control plane's)."""


def resolver(host: str, port: int) -> Sequence[str]:
    if host not in NAMES:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return NAMES[host]


def local(ip: IP) -> bool:
    return str(ip) in LOCAL


def policy(listen: str = "127.0.0.1:9725") -> AddressPolicy:
    return AddressPolicy(listen, resolver=resolver, local=local)


MALFORMED = [
    "127.0.0.1:9725/v1?",
    "user@host:1",
    "host:0",
    "host:70000",
    "http://host:1",
    "host",
    "host:80#x",
    "ho st:80",
    "[::1]",
    "127.1:80",
]
FORBIDDEN_FOR_ALL = [
    "169.254.169.254:80",
    "meta.internal:80",
    "[fe80::1]:80",
    "scoped.example:80",
    "0.0.0.0:80",
    "0.1.2.3:80",
    "nowhere.example:80",
    "[::]:80",
    "224.0.0.1:80",
    "[ff02::1]:80",
    "255.255.255.255:80",
    "240.0.0.1:80",
    "127.0.0.1:9725",  # the control plane itself
    "localhost:9725",
    "[::ffff:169.254.169.254]:80",
    "unknown.example:80",  # does not resolve
]
FORBIDDEN_FOR_BYOC = [
    "localhost:22",
    "127.0.0.1:9726",
    "127.8.9.10:80",
    "[::1]:80",
    "[::ffff:127.0.0.1]:80",
    "mapped.example:80",
    "mixed.example:80",
    "198.51.100.2:80",  # another address of the control plane's machine
    "cp.example:22",
]


@pytest.mark.parametrize("address", MALFORMED + FORBIDDEN_FOR_ALL + FORBIDDEN_FOR_BYOC)
async def test_byoc_refusals(address: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await policy().check(address, byoc=True)
    assert address in caught.value.message


@pytest.mark.parametrize("address", MALFORMED + FORBIDDEN_FOR_ALL)
async def test_regular_refusals(address: str) -> None:
    with pytest.raises(InvalidRequest):
        await policy().check(address, byoc=False)


@pytest.mark.parametrize("address", FORBIDDEN_FOR_BYOC)
async def test_regular_hosts_may_be_local(address: str) -> None:
    await policy().check(address, byoc=False)  # `make run`: an agent on loopback


@pytest.mark.parametrize(
    "address", ["203.0.113.5:9726", "good.example:9726", "[2001:db8::5]:1", "10.1.2.3:65535"]
)
async def test_remote_addresses_are_fine_for_both(address: str) -> None:
    await policy().check(address, byoc=True)
    await policy().check(address, byoc=False)


async def test_a_control_plane_listening_everywhere() -> None:
    everywhere = policy("0.0.0.0:9725")
    for address in ("198.51.100.2:9725", "127.0.0.1:9725", "cp.example:9725"):
        with pytest.raises(InvalidRequest, match="control plane's own address"):
            await everywhere.check(address, byoc=False)
    await everywhere.check("198.51.100.2:9726", byoc=False)
    await everywhere.check("203.0.113.5:9725", byoc=True)  # another machine's port 9725


async def test_messages_say_why() -> None:
    cases = {
        "169.254.169.254:80": "link-local",
        "[::1]:80": "loopback",
        "198.51.100.2:80": "control plane's machine",
        "host:70000": "port must be 1-65535",
        "unknown.example:80": "does not resolve",
    }
    for address, words in cases.items():
        with pytest.raises(InvalidRequest, match=words):
            await policy().check(address, byoc=True)


def test_is_local_binds_without_sending() -> None:
    assert is_local(ipaddress.ip_address("127.0.0.1"))
    assert not is_local(ipaddress.ip_address("203.0.113.77"))
