"""The host agent's settings: loaded once in `__main__` from `NESTBOX_AGENT_*` (plus the shared
`NESTBOX_DIR` and `NESTBOX_IMAGE_CACHE`) and passed down through constructors."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NESTBOX_AGENT_", frozen=True, extra="ignore")

    data_dir: Path = Field(
        default=Path("/var/lib/nestbox"),
        validation_alias=AliasChoices("NESTBOX_DIR", "data_dir"),
        description="Nestbox's data directory (images/, templates/, agents/)",
    )
    image_cache: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("NESTBOX_IMAGE_CACHE", "image_cache"),
        description="shared guest-image cache; default <data_dir>/images",
    )
    agent_id: str = Field(
        default="a0",
        pattern=r"^[a-z0-9]{1,8}$",
        description="names and tags every resource this agent makes",
    )
    listen: str = Field(default="127.0.0.1:9726", description="RPC and port-proxy address")
    accel: Literal["auto", "kvm", "tcg"] = Field(default="auto", description="QEMU accelerator")
    qemu_binary: str = Field(default="qemu-system-x86_64", description="QEMU executable")
    slot_cidr: str = Field(
        default="10.201.0.0/16",
        description="host-facing capsule addresses, one per slot; blackholed as a whole",
    )
    veth_cidr: str = Field(
        default="10.200.0.0/16", description="veth /30 links host<->capsule netns, one per slot"
    )
    slot_first: int = Field(default=1, ge=1, description="first slot index this agent uses")
    slot_count: int = Field(default=200, ge=1, le=16000, description="slots this agent may use")
    warm_slots: int = Field(
        default=2, ge=0, description="slot networks built ahead for new capsules; 0 = none"
    )
    restore_concurrency: int = Field(
        default=0,
        ge=0,
        description="clones from snapshot templates started at once (the rest wait their turn: "
        "each is CPU-bound under TCG, and twenty at once on two cores made every one of them "
        "as slow as the whole batch); 0 = two per host core",
    )
    tap_rate_mbytes: int = Field(default=200, description="guest egress rate limit, MB/s")
    tap_burst_mbytes: int = Field(default=100, description="guest egress burst, MB")
    default_vcpus: int = Field(default=1, ge=1)
    default_memory_mib: int = Field(default=256, ge=64)
    max_memory_mib: int = Field(
        default=4096,
        ge=128,
        description="largest memory_mb a capsule booted from a base template may ask for",
    )
    dns_upstream: list[str] = Field(
        default_factory=list,
        description="resolvers the egress DNS forwarder asks (IPv4 addresses); "
        "empty = the host's /etc/resolv.conf nameservers",
    )
    dns_port: int = Field(
        default=10053,
        ge=1,
        le=65535,
        description="port of the egress DNS forwarder on the host end of each egress slot's veth",
    )
    egress_forwarding: bool = Field(
        default=True,
        description="while a capsule has egress, turn IPv4 forwarding on for the uplinks whose "
        "forwarding is off, guarded so they forward only replies to capsules "
        "(network/uplink.py); off = the operator enables forwarding",
    )
    egress_uplinks: list[str] = Field(
        default_factory=list,
        description="interfaces capsule egress leaves by (replies come back in there); "
        "empty = the devices of the IPv4 default routes",
    )
    # ── VM confinement (vmm/confine.py) ──
    confine: bool = Field(
        default=True,
        description="confine every QEMU (seccomp, own uid, chroot, cgroup, rlimits); off = root",
    )
    vm_uid_base: int = Field(
        default=2_000_000_000,
        ge=1_000_000,
        description="QEMU runs as uid = gid = this + slot (above login.defs, subuid and systemd "
        "container ranges, below 2^31)",
    )
    vm_memory_overhead_mib: int = Field(
        default=192,
        ge=32,
        description="cgroup memory limit = guest RAM + this (QEMU itself, TCG code cache, cache)",
    )
    vm_tcg_tb_size_mib: int = Field(
        default=64,
        ge=0,
        description="TCG translation cache size (bounds QEMU's own memory); 0 = QEMU's default",
    )
    vm_pids_max: int = Field(
        default=128,
        ge=80,
        description="tasks (threads) per VM: cgroup pids.max and RLIMIT_NPROC of its uid",
    )
    vm_nofile_max: int = Field(default=256, ge=64, description="RLIMIT_NOFILE of each QEMU")
    serial_log_max_bytes: int = Field(
        default=1 << 20, ge=4096, description="a VM's serial console log on disk is kept under this"
    )
    cgroup_root: Path = Field(
        default=Path("/sys/fs/cgroup"), description="where the cgroup hierarchies are mounted"
    )
    cgroup_parent: str = Field(
        default="nestbox",
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$",
        description="each VM's cgroup is <cgroup_root>[/<controller>]/<this>/<agent_id>/<capsule>",
    )
    log_level: str = Field(default="INFO")
    # ── the agent service (RPC, proxy, background loops) ──
    cp_url: str = Field(default="", description="control plane URL; empty = run unregistered")
    registration_token: SecretStr | None = Field(
        default=None, description="one-time token for the first registration (or --register)"
    )
    address: str = Field(
        default="", description="host:port where the control plane reaches this agent"
    )
    secret: SecretStr | None = Field(
        default=None,
        description="RPC secret of an unregistered agent; default: <state_dir>/agent-secret",
    )
    proxy_secret: SecretStr | None = Field(
        default=None,
        description="port-proxy secret of an unregistered agent (must differ from the RPC "
        "secret); default: <state_dir>/proxy-secret",
    )
    heartbeat_interval_s: float = Field(default=30.0, gt=0, description="heartbeats to the CP")
    reap_interval_s: float = Field(default=2.0, gt=0, description="idle reaper period")
    drain_timeout_s: float = Field(
        default=2.0, ge=0, description="how long a pause waits for proxied requests"
    )
    metrics_interval_s: float = Field(default=1.0, gt=0, description="VM metrics sampling")
    pause_concurrency: int = Field(default=4, ge=1, description="pauses at once (shutdown)")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request head must arrive within this"
    )
    keepalive_idle_s: float = Field(
        default=620.0, gt=0, description="idle keep-alive connections close after this"
    )
    shutdown_timeout_s: float = Field(
        default=120.0, gt=0, description="SIGTERM: pausing every capsule must end within this"
    )

    @field_validator("data_dir", "image_cache")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Resolved once here, so the directories below are plain joins (they are on hot
        paths) and always absolute."""
        return None if path is None else path.resolve()

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        ipaddress.ip_network(self.slot_cidr)
        ipaddress.ip_network(self.veth_cidr)
        if self.vm_uid_base + self.slot_first + self.slot_count > 2**31 - 1:
            raise ValueError("vm_uid_base + slots must stay below 2^31 (uids above are unsafe)")
        return self

    @property
    def images_dir(self) -> Path:
        return self.image_cache or self.data_dir / "images"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def state_dir(self) -> Path:
        """This agent's own state: records, per-capsule disks, snapshots, sockets, logs."""
        return self.data_dir / "agents" / self.agent_id
