"""The VM runtime with real QEMU guests: boot, exec, clones, pause/resume, templates.

Every capsule is a clone of the session's `minimal` template (see conftest.py), except the one
cold boot that made the template. Egress stays off throughout; the egress and isolation tests
with a decoy "outside" namespace live in test_network.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from nestbox.hostagent.capsule import CapsuleState, InvalidState
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage.templates import load_template
from tests.integration.vm.conftest import open_runtime

if TYPE_CHECKING:
    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.conftest import BootInfo

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


async def sh(capsule: Capsule, script: str) -> str:
    """Run `sh -c script` in the guest through envd; return stdout (exit 0 asserted)."""
    result = await capsule.envd.exec("sh", ["-c", script], timeout_s=None)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def test_cold_boot_reached_envd(minimal_template: tuple[Template, BootInfo]) -> None:
    template, boot = minimal_template
    assert boot.uname.startswith("Linux ")
    assert template.meta.ram == "file"
    assert template.meta.state_bytes < 1_000_000  # x-ignore-shared: the RAM stayed in `mem`
    assert template.dir.mem.stat().st_size == template.meta.memory_mib << 20


async def test_exec_uname(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        result = await capsule.envd.exec("uname", ["-a"], timeout_s=None)
        assert result.exit_code == 0
        assert result.stdout.startswith(b"Linux ")
        assert result.pid > 0


async def test_record_follows_the_state(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        path = vm.state_dir / "capsules" / f"{capsule.id}.json"
        record = json.loads(path.read_text())
        assert record["state"] == "running"
        assert record["pid"] == capsule.pid
        assert record["template_id"] == "minimal"
        await runtime.pause(capsule.id)
        record = json.loads(path.read_text())
        assert (record["state"], record["pid"], record["slot"]) == ("paused", None, None)
        assert (capsule.record.dir / "snapshot.state").exists()
        with pytest.raises(InvalidState):
            await runtime.pause(capsule.id)
        await runtime.destroy(capsule.id)
        assert not path.exists()
        assert not capsule.record.dir.exists()


async def test_pause_resume_keeps_files_processes_and_clock(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        pid = (await sh(capsule, "echo kept > /root/before-pause; "
                        "sleep 1000 < /dev/null > /dev/null 2>&1 & echo $!")).strip()  # fmt: skip
        await runtime.pause(capsule.id)
        assert capsule.state == CapsuleState.PAUSED
        await anyio.sleep(10)
        await runtime.resume(capsule.id)
        assert capsule.record.state == CapsuleState.RUNNING
        script = f"cat /root/before-pause; kill -0 {pid} && cat /proc/{pid}/cmdline; echo"
        # The guest read its clock between these two host times, whatever the exec took; the
        # 2 s of slack is for setting the clock, far less than the 10 s it lost while paused.
        before = time.time()
        out = await sh(capsule, script + "; date +%s.%N")
        after = time.time()
        lines = out.splitlines()
        assert lines[0] == "kept"
        assert lines[1].replace("\0", " ").strip() == "sleep 1000"
        assert before - 2.0 < float(lines[2]) < after + 2.0, (before, lines[2], after)


async def test_two_clones_differ_in_identity_and_randomness(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        clones = await runtime.clone("minimal", 2)
        assert len({c.id for c in clones}) == 2
        assert len({c.host_address for c in clones}) == 2
        script = (
            "echo $NESTBOX_CAPSULE_ID $NESTBOX_TEMPLATE_ID; "
            "cat /run/nestbox/NESTBOX_CAPSULE_ID; echo; "
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
        )
        seen = []
        for capsule in clones:
            lines = [ln for ln in (await sh(capsule, script)).splitlines() if ln]
            env_ids, file_id, random = lines
            assert env_ids == f"{capsule.id} minimal"
            assert file_id == capsule.id
            seen.append(random)
        assert seen[0] != seen[1]


async def test_template_ram_file_unchanged_by_clones(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        mem = load_template(vm.templates_dir, "minimal").dir.mem
        before = await anyio.to_thread.run_sync(_sha256, mem)
        clones = await runtime.clone("minimal", 2)
        for capsule in clones:  # dirty lots of guest RAM (tmpfs pages) in each clone
            await sh(capsule, "head -c 33554432 /dev/urandom > /dev/shm/fill && sync")
        await runtime.destroy_all()
        assert await anyio.to_thread.run_sync(_sha256, mem) == before


async def test_template_from_a_clone_is_flattened(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [capsule] = await runtime.clone("minimal")
        await sh(capsule, "echo derived > /root/marker && sync")
        template = await runtime.snapshot_template(capsule.id, "derived")
        assert template.meta.ram == "state"  # the clone's RAM was private: it is in the state file
        chain = await cow.backing_chain(template.dir.disk)
        assert len(chain) == 2  # template disk -> raw image, not clone -> minimal -> raw
        [child] = await runtime.clone("derived")
        assert (await sh(child, "cat /root/marker")).strip() == "derived"
        assert (await sh(child, "cat /run/nestbox/NESTBOX_TEMPLATE_ID")).strip() == "derived"


def _sha256(path: object) -> str:
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def test_replacing_a_template_keeps_versions_in_use(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        [source] = await runtime.clone("minimal")
        old = await runtime.snapshot_template(source.id, "replaced")
        [user] = await runtime.clone("replaced")
        await sh(user, "echo mine > /root/mine && sync")
        await runtime.pause(user.id)
        [source] = await runtime.clone("minimal")
        new = await runtime.snapshot_template(source.id, "replaced")
        assert new.dir.root != old.dir.root
        assert old.dir.root.exists()  # the paused capsule's disk is based on it
        assert load_template(vm.templates_dir, "replaced").dir.root == new.dir.root
        await runtime.resume(user.id)
        assert (await sh(user, "cat /root/mine")).strip() == "mine"
        await runtime.destroy(user.id)
        [source] = await runtime.clone("minimal")
        await runtime.snapshot_template(source.id, "replaced")
        assert not old.dir.root.exists()  # nobody uses it any more
        assert not new.dir.root.exists()
