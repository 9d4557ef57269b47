"""`fake_host()`: a real `VmRuntime` (and, on request, `CapsuleManager`) over the fakes: no
QEMU, no root, no network. VMs are `FakeHypervisor`'s, privileged commands `FakeSystem`'s,
and each run's envd client is the agent's real `CapsuleEnvd`, pointed at a `FakeEnvd` on
loopback where the guest of the VM in that slot answers (`/slot<N>/...`).

Also: a fake guest image and hand-made templates on the tmp_path data directory, and what
"nothing is left" means for these tests (`leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.envdconn import CapsuleEnvd, PoolSettings
from nestbox.hostagent.image.layout import GuestImage
from nestbox.hostagent.lifecycle import Timeouts
from nestbox.hostagent.manager import CapsuleManager
from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage import templates as tpl
from nestbox.hostagent.vmm.accel import AccelChoice
from tests.fakes.envd import FakeEnvd
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.system import FakeSystem

if TYPE_CHECKING:
    from nestbox.hostagent.network import SlotNetwork

TIMEOUTS = Timeouts(
    boot=5, restore=5, envd_ready=5, init=1, prepare=1, save=5, teardown=5
)  # fmt: skip
AGENT = "ut"
POOL = PoolSettings(connect_timeout_s=1.0)
"""Loopback connects are instant; a hung `/init` then fails within 1 + `TIMEOUTS.init` s."""


@dataclass
class FakeHost:
    settings: AgentSettings
    runtime: VmRuntime
    hypervisor: FakeHypervisor
    envd: FakeEnvd
    system: FakeSystem
    clients: list[CapsuleEnvd] = field(default_factory=list)
    """Every envd client the runtime made, in order."""
    manager: CapsuleManager | None = None

    def open_envd(self, network: SlotNetwork, token: str | None) -> CapsuleEnvd:
        url = f"{self.envd.url}/slot{network.slot}"
        client = CapsuleEnvd(url, access_token=token, pool=POOL)
        self.clients.append(client)
        return client

    def image(self) -> GuestImage:
        """A fake guest image (a 1 MiB raw root file system; kernel files nothing reads)."""
        root = self.settings.data_dir / "image"
        if not root.exists():
            root.mkdir()
            for name in ("vmlinux", "initramfs.cpio.gz"):
                (root / name).write_bytes(b"")
            with (root / "rootfs.ext4").open("wb") as f:
                f.truncate(1 << 20)
        return GuestImage("fake-1", root / "vmlinux", root / "initramfs.cpio.gz",
                          root / "rootfs.ext4")  # fmt: skip

    async def template(self, template_id: str = "minimal", token: str | None = None) -> str:
        """Publish a template as a boot + snapshot would leave it: a disk overlay on the
        image, a state file whose guest holds `token` (a fresh one by default)."""
        token = token or secrets.token_urlsafe(8)
        image = self.image()
        staging = tpl.make_staging(self.settings.templates_dir, template_id)
        await cow.create_overlay(image.rootfs, "raw", staging.disk)
        staging.state.write_text(json.dumps({"token": token}))
        meta = tpl.TemplateMeta(
            template_id=template_id, created_at=datetime.now(UTC), source="image:fake-1",
            image_version=image.version, accel=self.hypervisor.accel, kernel=image.kernel,
            initrd=image.initrd, cmdline="quiet", vcpus=1, memory_mib=256, ram="state",
            state_bytes=1, access_token=token,
        )  # fmt: skip
        await tpl.publish(staging, self.settings.templates_dir, meta)
        return token

    def leftovers(self) -> dict[str, object]:
        """What exists besides the host's own directories and published templates: every
        entry is empty when nothing of a capsule is left."""
        records = cap.records_dir(self.settings.state_dir)
        return {
            "capsules": [c.id for c in self.runtime.capsules()],
            "files": sorted(p.name for p in records.iterdir()) if records.exists() else [],
            "vms": [vm.spec.name for vm in self.hypervisor.live()],
            "open clients": [c.base_url for c in self.clients if not c.is_closed],
            "slots in use": self.runtime.slots.in_use(),
            "netns": sorted(live_netns(self.system)),
            "staging": sorted(p.name for p in self.settings.templates_dir.glob(".*.build-*")),
        }


NOTHING: dict[str, object] = {
    "capsules": [], "files": [], "vms": [], "open clients": [], "slots in use": set(),
    "netns": [], "staging": [],
}  # fmt: skip


def live_netns(fake: FakeSystem) -> set[str]:
    """The slot namespaces the recorded commands leave behind."""
    live: set[str] = set()
    for argv in fake.commands:
        if argv[:3] == ("ip", "netns", "add"):
            live.add(argv[3])
        elif argv[:3] == ("ip", "netns", "del"):
            live.discard(argv[3])
    return live


def settings_for(tmp_path: Path) -> AgentSettings:
    return AgentSettings(
        data_dir=tmp_path / "nestbox", image_cache=tmp_path / "images", agent_id=AGENT,
        slot_count=8, warm_slots=0, cgroup_root=tmp_path / "no-cgroups",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def fake_host(
    tmp_path: Path,
    *,
    hypervisor: FakeHypervisor | None = None,
    with_manager: bool = False,
) -> AsyncIterator[FakeHost]:
    """The runtime over the fakes (and the manager when asked). Afterwards every capsule left
    is destroyed and the manager's runs closed; the fakes stay for the test to inspect."""
    settings = settings_for(tmp_path)
    hv = hypervisor or FakeHypervisor()
    system = FakeSystem()
    host: FakeHost | None = None

    def opener(network: SlotNetwork, token: str | None) -> CapsuleEnvd:
        assert host is not None
        return host.open_envd(network, token)

    async with FakeEnvd.serving(hv.guest_for) as envd, VmRuntime.open(
        settings, system, hypervisor=hv, accel=AccelChoice("tcg", "fake"),
        timeouts=TIMEOUTS, open_envd=opener,
    ) as runtime:  # fmt: skip
        host = FakeHost(settings, runtime, hv, envd, system)
        async with anyio.create_task_group() as tg:
            if with_manager:
                host.manager = CapsuleManager(settings, runtime, tg)
            try:
                yield host
            finally:
                with anyio.CancelScope(shield=True):
                    if host.manager is not None:
                        await host.manager.close()
                    await runtime.destroy_all()
                tg.cancel_scope.cancel()
