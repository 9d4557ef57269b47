"""`FakeSyscalls`: the guest-machine seam of `nestbox.envd.guest`, recording or refusing calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


@dataclass
class FakeSyscalls:
    """Records every call; with `refuse=True` any call fails the test instead."""

    refuse: bool = False
    files: dict[str, str] = field(default_factory=dict)
    interfaces: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)

    def _record(self, name: str, arg: object) -> None:
        if self.refuse:
            raise AssertionError(f"outside a VM, guest.py must not call {name}({arg!r})")
        self.calls.append((name, arg))

    def clock_settime_ns(self, ns: int) -> None:
        self._record("clock_settime_ns", ns)

    def rng_ioctl(self, request: int, arg: bytes | None) -> None:
        self._record("rng_ioctl", (request, arg))

    def sync(self) -> None:
        self._record("sync", None)

    def read_text(self, path: Path) -> str:
        self._record("read_text", str(path))
        return self.files[str(path)]

    def interface_ipv4(self, name: str) -> str | None:
        self._record("interface_ipv4", name)
        return self.interfaces.get(name)

    def set_hostname(self, name: str) -> bool:
        self._record("set_hostname", name)
        return True

    def pin_in_hosts(self, name: str) -> None:
        self._record("pin_in_hosts", name)
