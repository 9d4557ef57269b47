"""Platform templates after an upgrade (issue 11): a `minimal` made from another guest image than
the agent's is remade on first use, and its old version is kept while capsules (running or
paused) still use it, then removed: nothing leaks. Against the fakes (`tests/fakes/host.py`),
in about a second, without QEMU or root.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent import manager as manager_module
from nestbox.hostagent.capsule import CapsuleState
from nestbox.hostagent.manager import CreateSpec
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage import templates as tpl
from tests.conftest import eventually
from tests.fakes.host import fake_host
from tests.fakes.hypervisor import FakeHypervisor

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from nestbox.hostagent.image.layout import GuestImage
    from nestbox.hostagent.vmm.base import LaunchHook, VmHandle, VmSpec

S = CapsuleState


class RamFileHypervisor(FakeHypervisor):
    """The fake, plus the RAM file a VM with shared file RAM (a template build) has."""

    async def launch(self, spec: VmSpec, *, on_launch: LaunchHook | None = None) -> VmHandle:
        if spec.ram.file is not None and spec.ram.share:
            await anyio.Path(spec.ram.file).write_bytes(b"\0" * 4096)
        return await super().launch(spec, on_launch=on_launch)


def versions(templates_dir: Path) -> set[str]:
    return {p.name for p in templates_dir.glob(".minimal.v-*")}


async def test_a_stale_platform_template_is_remade_and_its_old_version_removed_when_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def chain(path: Path) -> list[Path]:  # a boot's overlay straight on the image
        return [path, tmp_path / "nestbox" / "image" / "rootfs.ext4"]

    monkeypatch.setattr(cow, "backing_chain", chain)
    async with fake_host(tmp_path, hypervisor=RamFileHypervisor(), with_manager=True) as host:
        manager = host.manager
        assert manager is not None
        templates = host.settings.templates_dir
        current: list[GuestImage] = [host.image()]  # "fake-1", what `host.template` records
        monkeypatch.setattr(manager_module, "find_image", lambda _settings: current[0])
        await host.template("minimal")
        [old] = versions(templates)

        # Before the upgrade: clones of the old version, one left paused, one running.
        paused = (await manager.create(CreateSpec())).capsule_id
        await manager.pause(paused)
        running = (await manager.create(CreateSpec())).capsule_id
        assert host.runtime.get(running).record.template_dir == templates / old
        assert host.hypervisor.verbs().count("launch") == 2  # two clones: no rebuild

        # The upgrade: a new guest image key. A new agent run looks the image up again.
        current[0] = replace(current[0], version="fake-2")
        manager._image_versions.clear()
        fresh = (await manager.create(CreateSpec())).capsule_id
        template = tpl.load_template(templates, "minimal")
        assert template.meta.image_version == "fake-2"
        assert template.dir.root.name != old
        assert host.runtime.get(fresh).record.template_dir == template.dir.root
        assert host.runtime.get(fresh).record.machine.image_version == "fake-2"
        assert versions(templates) == {old, template.dir.root.name}  # the old one is in use

        # The old version stays until its last capsule (running or paused) is gone.
        await manager.destroy(running)
        await anyio.wait_all_tasks_blocked()
        assert (templates / old).is_dir()
        assert manager.state(paused) == S.PAUSED
        await manager.resume(paused)  # its disk still has its base
        await manager.destroy(paused)
        await eventually(lambda: old not in versions(templates), what="old version removed")
        assert versions(templates) == {template.dir.root.name}
        second = (await manager.create(CreateSpec())).capsule_id  # no rebuild any more
        assert host.runtime.get(second).record.template_dir == template.dir.root
        await manager.destroy(second)
        await manager.destroy(fresh)
        await anyio.wait_all_tasks_blocked()
        assert versions(templates) == {template.dir.root.name}  # the current one is kept


async def test_without_a_cached_image_the_platform_template_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_host(tmp_path, with_manager=True) as host:
        manager = host.manager
        assert manager is not None
        monkeypatch.setattr(manager_module, "find_image", lambda _settings: None)
        await host.template("minimal")
        view = await manager.create(CreateSpec())
        assert view.state == S.RUNNING
        assert host.hypervisor.verbs().count("launch") == 1  # a clone, no template build


async def test_start_up_prunes_versions_no_capsule_uses(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        templates = host.settings.templates_dir
        await host.template("minimal")
        [old] = versions(templates)
        [capsule] = await host.runtime.clone("minimal")
        await host.template("minimal")  # republished: `old` is no longer current
        assert len(versions(templates)) == 2
        await host.runtime.prune_templates()
        assert old in versions(templates)  # the clone still uses it
        await host.runtime.destroy(capsule.id)
        await eventually(lambda: old not in versions(templates), what="old version removed")
        (templates / f".minimal.v-{'0' * 8}").mkdir()  # one a crash left, no capsule uses it
        await host.runtime.prune_templates()
        assert len(versions(templates)) == 1
