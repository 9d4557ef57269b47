"""Failure paths with real QEMU guests: a create cancelled or failing at any of its steps, a
VM process killed from outside, leave no process, netns, link, route, rule, file or slot."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from tests.integration.vm.conftest import leftovers, open_runtime

if TYPE_CHECKING:
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


@pytest.mark.parametrize("step", CLONE_STEPS)
async def test_cancel_clone_at_each_step(vm: AgentSettings, step: str) -> None:
    async with open_runtime(vm) as runtime:
        before = leftovers(vm)
        with anyio.CancelScope() as scope:

            async def hook(name: str) -> None:
                if name == step:
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()

            await runtime.clone("minimal", hook=hook)
        assert scope.cancelled_caught
        assert runtime.capsules() == []
        assert runtime.slots.statistics().in_use == 0
        assert leftovers(vm) == before


@pytest.mark.parametrize("step", ["disk", "network", "restore", "envd"])
async def test_failure_at_a_step_removes_everything(vm: AgentSettings, step: str) -> None:
    async with open_runtime(vm) as runtime:
        before = leftovers(vm)

        async def hook(name: str) -> None:
            if name == step:
                raise Injected(name)

        with pytest.raises(Injected):
            await runtime.clone("minimal", hook=hook)
        assert runtime.capsules() == []
        assert leftovers(vm) == before


async def test_cancel_one_of_two_concurrent_clones(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        before = leftovers(vm)
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
        assert leftovers(vm) == before


async def test_killed_vm_process_is_detected_and_cleaned(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        before = leftovers(vm)
        [capsule] = await runtime.clone("minimal")
        assert capsule.pid is not None
        os.kill(capsule.pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while runtime.capsules():  # noqa: ASYNC110 (the runtime has no event to wait on)
                await anyio.sleep(0.05)
        assert leftovers(vm) == before


async def test_destroy_paused_capsule(vm: AgentSettings) -> None:
    async with open_runtime(vm) as runtime:
        before = leftovers(vm)
        [capsule] = await runtime.clone("minimal")
        await runtime.pause(capsule.id)
        await runtime.destroy(capsule.id)
        assert leftovers(vm) == before
