"""Failure paths with real QEMU guests: a create cancelled or failing at any of its steps, a
VM process killed from outside, leave no process, netns, link, route, rule, file or slot
(the warm slots waiting for a capsule aside); the warm slot pool is used and refilled."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from nestbox.hostagent.capsule import CapsuleState
from tests.integration.vm.conftest import open_runtime, settled_leftovers

if TYPE_CHECKING:
    from nestbox.hostagent.runtime import VmRuntime
    from nestbox.hostagent.settings import AgentSettings

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

CLONE_STEPS = ["dir", "disk", "record", "slot", "network", "vmm", "restore", "envd", "init"]


class Injected(Exception):
    pass


async def test_clone_runs_every_step(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        seen: list[str] = []

        async def hook(step: str) -> None:
            seen.append(step)

        await runtime.clone("minimal", hook=hook)
        assert seen == CLONE_STEPS


async def clone_cancelled_at(runtime: VmRuntime, step: str) -> None:
    """A clone cancelled by its caller just after `step`; nothing of it is left registered."""
    with anyio.CancelScope() as scope:

        async def hook(name: str) -> None:
            if name == step:
                scope.cancel()
                await anyio.lowlevel.checkpoint()

        await runtime.clone("minimal", hook=hook)
    assert scope.cancelled_caught
    assert runtime.capsules() == []


@pytest.mark.parametrize("step", CLONE_STEPS)
async def test_cancel_clone_at_each_step(vm: AgentSettings, step: str) -> None:
    async with open_runtime(vm) as runtime:
        before = await settled_leftovers(runtime)
        await clone_cancelled_at(runtime, step)
        await runtime.networks.settle()
        assert runtime.networks.statistics().in_use == 0
        assert await settled_leftovers(runtime) == before


@pytest.mark.parametrize("step", ["disk", "network", "restore", "envd"])
async def test_failure_at_a_step_removes_everything(vm: AgentSettings, step: str) -> None:
    async with open_runtime(vm) as runtime:
        before = await settled_leftovers(runtime)

        async def hook(name: str) -> None:
            if name == step:
                raise Injected(name)

        with pytest.raises(Injected):
            await runtime.clone("minimal", hook=hook)
        assert runtime.capsules() == []
        assert await settled_leftovers(runtime) == before


async def test_cancel_one_of_two_concurrent_clones(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        before = await settled_leftovers(runtime)
        calls = 0

        async def hook(name: str) -> None:
            nonlocal calls
            if name == "envd":
                calls += 1
                if calls == 2:
                    raise Injected(name)

        with pytest.raises(ExceptionGroup):
            await runtime.clone("minimal", 2, hook=hook)
        assert runtime.capsules() == []
        assert await settled_leftovers(runtime) == before


async def test_killed_vm_process_is_detected_and_cleaned(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        before = await settled_leftovers(runtime)
        [capsule] = await runtime.clone("minimal")
        assert capsule.pid is not None
        os.kill(capsule.pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while capsule.state != CapsuleState.ERROR:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.05)
        # Its resources are gone; the entry stays listed in ERROR until it is destroyed.
        assert await settled_leftovers(runtime) == before
        assert runtime.capsules() == [capsule]
        await runtime.destroy(capsule.id)
        assert runtime.capsules() == []


async def test_destroy_paused_capsule(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        before = await settled_leftovers(runtime)
        [capsule] = await runtime.clone("minimal")
        await runtime.pause(capsule.id)
        await runtime.destroy(capsule.id)
        assert await settled_leftovers(runtime) == before


async def test_a_warm_slot_is_used_then_refilled(vm: AgentSettings) -> None:
    assert vm.warm_slots >= 1
    async with open_runtime(vm) as runtime:
        runtime.networks.start()
        await runtime.networks.settle()
        warm = [lease.slot for lease in runtime.networks.ready()]
        assert len(warm) == vm.warm_slots
        [capsule] = await runtime.clone("minimal")
        assert capsule.run is not None
        assert capsule.run.lease.warm
        assert capsule.record.slot == warm[0]
        await runtime.networks.settle()
        refilled = [lease.slot for lease in runtime.networks.ready()]
        assert len(refilled) == vm.warm_slots
        assert warm[0] not in refilled  # a warm slot serves one capsule and is never reused
        result = await capsule.envd.exec("true", timeout_s=None)
        assert result.exit_code == 0
        # Egress capsules never take a warm slot (theirs is built for them).
        [outgoing] = await runtime.clone("minimal", egress=True)
        assert outgoing.run is not None
        assert not outgoing.run.lease.warm
        assert [lease.slot for lease in runtime.networks.ready()] == refilled
        await runtime.destroy(outgoing.id)
        await runtime.pause(capsule.id)
        await runtime.resume(capsule.id)  # into a warm slot again
        assert capsule.run is not None
        assert capsule.run.lease.warm
        assert capsule.record.slot == refilled[0]


@pytest.mark.parametrize("step", ["slot", "vmm", "init"])
async def test_cancelled_create_on_a_warm_slot_leaves_nothing(vm: AgentSettings, step: str) -> None:
    async with open_runtime(vm) as runtime:
        runtime.networks.start()
        before = await settled_leftovers(runtime)
        warm = {lease.slot for lease in runtime.networks.ready()}
        await clone_cancelled_at(runtime, step)
        # The warm slot it had taken is gone (not handed back), and another took its place.
        assert await settled_leftovers(runtime) == before
        now = {lease.slot for lease in runtime.networks.ready()}
        assert len(now) == len(warm)
        assert now != warm
