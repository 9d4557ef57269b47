"""The VM session fixtures, shared by the VM tier (`tests/integration/vm`) and the end-to-end
tier (`tests/e2e`): `tests/conftest.py` registers them, so one session builds one `minimal`
template (one cold boot) whichever tiers it runs.

- `vm_settings`: the session's agent settings over a temporary NESTBOX_DIR (test-only slot
  ranges, blackholed while the session runs; the session's band of slots is its own, see
  `tests/integration/vm/slot_band.py`); skips with `vm_skip_reason()` where QEMU
  microVMs cannot run. Afterwards every QEMU, network, cgroup and file of the session is gone.
- `guest_image`: the guest image of the current sources from the shared cache.
- `minimal_template`: the `minimal` snapshot template every capsule of the session is cloned
  from, with what its cold boot saw.

Every tier loads this module (through `tests/conftest.py`), so it imports the host agent and
the VM tier's helpers (`vm_skip_reason`, `leftovers`, … in `tests/integration/vm/conftest.py`)
only when a fixture runs: the unit tier never depends on them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nestbox.hostagent.image.layout import GuestImage
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.conftest import BootInfo


@pytest.fixture(scope="session")
def vm_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentSettings]:
    from nestbox.hostagent.network import cleanup_leftovers
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import RealSystem
    from tests.integration.vm.conftest import (
        AGENT_ID,
        SLOT_CIDR,
        SLOT_FIRST,
        VETH_CIDR,
        _kill_our_qemus,
        remove_cgroups,
        sh,
        vm_skip_reason,
    )
    from tests.integration.vm.slot_band import sole_session

    reason = vm_skip_reason()
    if reason:
        pytest.skip(reason)
    # A short path: QMP sockets live under it and unix socket paths max out at 107 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="nbvm-", dir="/tmp"))
    existing = sh("ip", "route", "show", "type", "blackhole")
    settings = AgentSettings(
        data_dir=data_dir,
        image_cache=AgentSettings().images_dir,
        agent_id=AGENT_ID,
        slot_cidr=SLOT_CIDR,
        veth_cidr=VETH_CIDR,
        slot_first=SLOT_FIRST,
        slot_count=40,
        accel="auto",
    )
    try:
        yield settings
    finally:
        _kill_our_qemus(data_dir)
        anyio.run(lambda: cleanup_leftovers(RealSystem(), settings, set()))
        remove_cgroups(settings)
        # The agents' logs outlive the data directory, beside the control planes' (pytest keeps
        # its last three base directories): a failure seen only in CI can be read afterwards.
        kept = tmp_path_factory.getbasetemp() / "agent-logs"
        kept.mkdir(exist_ok=True)
        for log in data_dir.glob("agent-*.log"):
            shutil.copy2(log, kept / log.name)
        shutil.rmtree(data_dir, ignore_errors=True)
        # Another session on this machine (its own slot band) may still need them.
        for cidr in (SLOT_CIDR, VETH_CIDR):
            if cidr not in existing and sole_session():
                subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True)


@pytest.fixture(scope="session")
def guest_image(vm_settings: AgentSettings) -> GuestImage:
    from nestbox.hostagent.image.cache import find_image
    from nestbox.hostagent.image.layout import GuestImage

    override = os.environ.get("NESTBOX_TEST_GUEST_DIR")
    if override:
        d = Path(override)
        return GuestImage(
            "test-" + d.name, d / "vmlinux", d / "initramfs.cpio.gz", d / "rootfs.ext4"
        )
    image = find_image(vm_settings)
    if image is None:
        pytest.fail(
            f"no guest image for the current sources in {vm_settings.images_dir}: "
            "run 'nestbox-agent image build' (or the image tests) first"
        )
    return image


@pytest.fixture(scope="session")
def minimal_template(
    vm_settings: AgentSettings, guest_image: GuestImage
) -> tuple[Template, BootInfo]:
    """The session's `minimal` template: one cold boot, `uname -a` through envd, snapshot."""
    from nestbox.hostagent.runtime import VmRuntime
    from nestbox.hostagent.system import RealSystem
    from tests.integration.vm.conftest import BootInfo

    async def build() -> tuple[Template, BootInfo]:
        async with VmRuntime.open(vm_settings, RealSystem()) as rt:
            try:
                started = anyio.current_time()
                capsule = await rt.boot(guest_image, template_id="minimal", ram_shared=True)
                boot_ms = round((anyio.current_time() - started) * 1000)
                uname = await capsule.envd.exec("uname", ["-a"], timeout_s=None)
                assert uname.exit_code == 0, uname
                template = await rt.snapshot_template(capsule.id, "minimal")
            finally:
                await rt.destroy_all()
        info = BootInfo(capsule.id, boot_ms, uname.stdout.decode())
        return template, info

    return anyio.run(build)
