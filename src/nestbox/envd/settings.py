"""envd's settings: loaded once in `__main__` from `NESTBOX_ENVD_*` and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from nestbox.protocol.envd import ENVD_PORT


class EnvdSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NESTBOX_ENVD_", frozen=True, extra="ignore")

    port: int = Field(default=ENVD_PORT, description="TCP port for HTTP and Connect RPC")
    host: str = Field(default="::", description="listen address; '::' is every IPv4 and IPv6 one")
    mode: Literal["auto", "vm", "local"] = Field(
        default="auto",
        description="'vm' may change the machine (clock, RNG, caches); 'local' never does; "
        "'auto' picks 'vm' only when running as PID 1's child inside a Nestbox guest",
    )
    forward_address: str | None = Field(
        default=None,
        description="address that loopback-only guest servers are re-exposed on with socat; "
        "in a VM it defaults to the guest's eth0 address; outside a VM, unset means off",
    )
    keepalive_idle_s: float = Field(
        default=120.0,
        description="idle keep-alive connections are closed after this long: above the agent's "
        "pool expiry (90 s), so the agent always drops an idle connection first",
    )
    port_scan_interval_s: float = Field(default=1.0, description="loopback listener scan period")
    port_scan_idle_interval_s: float = Field(
        default=0.0,
        description="the scan period once envd has had no request for a while; 0: none (the "
        "next request, or the host's port proxy through `POST /ports/scan`, scans)",
    )
    port_scan_active_s: float = Field(
        default=60.0, description="how long after a request the scan keeps its short period"
    )
    stream_buffer: int = Field(default=256, description="events buffered per process stream")
    run_dir: Path = Field(
        default=Path("/run/nestbox"), description="where capsule identity files are written"
    )
    log_level: str = Field(default="INFO", description="logging level")


GUEST_MARKER = Path("/etc/nestbox-guest")
"""Written into the guest image; its presence is how envd knows it runs inside a capsule VM."""


def in_vm(settings: EnvdSettings) -> bool:
    """Whether envd may touch the machine it runs on (clock, RNG, disk sync, port forwarding)."""
    if settings.mode != "auto":
        return settings.mode == "vm"
    return GUEST_MARKER.exists()
