"""An agent process with its warm slot pool on: capsules take warm slots, `kill -9` leaves the
pool behind for the next start to remove (and rebuild), SIGTERM removes it."""

from __future__ import annotations

import os
import subprocess
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.integration.vm.agent_process import AgentProcess, agent_leftovers
from tests.integration.vm.conftest import SLOT_FIRST, remove_agent_leftovers

if TYPE_CHECKING:
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.conftest import BootInfo

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

WARM = 2
MARK = "nbtestmark"


def netns_ids(agent: AgentProcess) -> dict[str, bool]:
    """The agent's network namespaces, each with whether it has a `mark` (`mark_netns`)."""
    prefix = f"nbx-{agent.settings.agent_id}-"
    found = {}
    for name in os.listdir("/run/netns"):
        if name.startswith(prefix):
            links = subprocess.run(["ip", "-n", name, "-o", "link"], capture_output=True,
                                   text=True, check=False).stdout  # fmt: skip
            found[name] = f" {MARK}@" in links  # "N: name@peer: <flags> ..."
    return found


def mark_netns(name: str) -> None:
    """A veth pair inside the namespace: gone when the namespace is removed and made again."""
    subprocess.run(["ip", "-n", name, "link", "add", MARK, "type", "veth", "peer", "name",
                    MARK + "p"], check=True)  # fmt: skip


def wait_for_netns(agent: AgentProcess, count: int, within: float = 30.0) -> dict[str, bool]:
    deadline = time.monotonic() + within
    while True:
        found = netns_ids(agent)
        if len(found) == count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


async def test_warm_slots_across_kill_restart_and_stop(
    vm_settings: AgentSettings, minimal_template: tuple[Template, BootInfo]
) -> None:
    agent = AgentProcess.make(vm_settings, slot_first=SLOT_FIRST + 80, slot_count=10)
    agent.settings = agent.settings.model_copy(update={"warm_slots": WARM})
    try:
        agent.start()
        warm = wait_for_netns(agent, WARM)
        assert len(warm) == WARM, warm

        async with agent.connect() as rpc:
            cid = (await rpc.create()).capsule_id
            assert await rpc.out(cid, "echo up") == "up\n"
            # The capsule took a warm slot (no new network for it) and the pool refilled.
            after = wait_for_netns(agent, WARM + 1)
            assert len(after) == WARM + 1, after
            assert set(warm) < set(after)

        agent.kill()  # the warm slots and the capsule's network stay behind
        assert set(netns_ids(agent)) == set(after)
        for name in after:
            mark_netns(name)
        agent.start()
        async with agent.connect() as rpc:
            # The capsule is re-adopted with its network; the crashed run's warm slots were
            # removed and new ones built (fresh namespaces, even where the name is the same).
            rebuilt = wait_for_netns(agent, WARM + 1)
            assert len(rebuilt) == WARM + 1, rebuilt
            assert sorted(rebuilt.values()) == [False] * WARM + [True], rebuilt
            assert (await rpc.capsules())[cid].state == pb.CapsuleState.RUNNING
            assert await rpc.out(cid, "echo still") == "still\n"
            await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))

        assert agent.stop() == 0
        left = agent_leftovers(agent.settings)
        assert left == {k: [] for k in left}, left
    finally:
        print(agent.log_tail(20000))  # shown when the test fails
        agent.kill()
        await anyio.to_thread.run_sync(remove_agent_leftovers, agent.settings)
