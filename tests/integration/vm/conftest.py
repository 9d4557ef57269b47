"""Fixtures for the VM runtime tests (root, real QEMU; TCG on machines whose /dev/kvm is PVM).

Cold boots stay out of the hot path: the session builds the `minimal` snapshot template once
(one cold boot, seconds under TCG) in its own temporary NESTBOX_DIR, and every test creates its
capsules as clones of it (a third of a second each). The guest image comes from the shared
image cache (`$NESTBOX_IMAGE_CACHE`, default /var/lib/nestbox/images), which
`tests/integration/vm/test_image.py` or `nestbox-agent image build` fills; these tests never
build it (the build downloads packages). `NESTBOX_TEST_GUEST_DIR` points the tests at another
directory holding vmlinux, initramfs.cpio.gz and rootfs.ext4 (for debugging a guest change).

Slots use test-only ranges (10.233/16 for veths, 10.234/16 for capsule addresses), blackholed
while the tests run and un-blackholed after, and an agent id unique to the session, so nothing
here can touch a real agent's capsules. Each session takes its own band of slots
(`slot_band.py`), so a second session on the machine plans other addresses; the network tests'
decoy ranges (`test_network.py`, `test_vm_egress_on.py`) are fixed, so those two modules are
not for two sessions at once. `leftovers()` lists everything of ours on the host.

The session fixtures themselves (`vm_settings`, `guest_image`, `minimal_template`) are in
`session.py`, registered by `tests/conftest.py`, so the VM tier and the end-to-end tier
(`tests/e2e`) share one template per session.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.system import RealSystem
from nestbox.hostagent.vmm import confine
from nestbox.hostagent.vmm.cgroups import Cgroups
from tests.integration.vm.slot_band import claim_slot_first

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.agent_process import AgentProcess

SLOT_CIDR, VETH_CIDR = "10.234.0.0/16", "10.233.0.0/16"
SLOT_FIRST = claim_slot_first()
"""The session's band (tests/integration/vm/slot_band.py): its first 40 slots go to the runtime
tests, the next 30 to the agent process, +80 to +89 to the warm-slot agent, +200 to +399 to the
end-to-end tier."""
AGENT_ID = "v" + secrets.token_hex(3)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The image tests first: they (re)build the guest image every other VM test boots, and
    `test_agent_*` would otherwise sort before them."""
    here = Path(__file__).parent
    vm = [i for i, item in enumerate(items) if item.path.parent == here]
    if vm:
        ours = [items[i] for i in vm]
        ours.sort(key=lambda item: item.path.name != "test_image.py")  # stable
        for i, item in zip(vm, ours, strict=True):
            items[i] = item


def vm_skip_reason() -> str | None:
    """Why QEMU microVMs cannot run here at all, or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, TAP devices and iptables rules per capsule"
    for tool in ("qemu-system-x86_64", "qemu-img", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run 'make system-deps')"
    probe = f"nbvm-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "`ip netns add` fails on this machine"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class BootInfo:
    """What the session's one cold boot saw, before it became the template."""

    capsule_id: str
    boot_ms: int
    uname: str


@pytest.fixture
def vm(vm_settings: AgentSettings, minimal_template: tuple[Template, BootInfo]) -> AgentSettings:
    """The session's settings, once the `minimal` template exists: `open_runtime(vm)`."""
    return vm_settings


@contextlib.asynccontextmanager
async def open_runtime(settings: AgentSettings) -> AsyncIterator[VmRuntime]:
    """A runtime for one test; afterwards every capsule is gone and nothing of ours is left
    (leaving the runtime waits for the slot networks being torn down and removes the warm
    ones).

    A context manager in the test's own task, not a fixture: the runtime's task group must be
    entered and left by the same task, which async fixtures do not guarantee.
    """
    before = leftovers(settings)
    async with VmRuntime.open(settings, RealSystem()) as rt:
        try:
            yield rt
        finally:
            await rt.destroy_all()
    assert leftovers(settings) == before


async def settled_leftovers(rt: VmRuntime) -> dict[str, list[str]]:
    """`leftovers` once the runtime's background network work (warm slot builds, teardowns
    after pause and destroy) has finished, without the warm slots waiting for a capsule."""
    await rt.networks.settle()
    return leftovers(rt.settings, skip_slots={lease.slot for lease in rt.networks.ready()})


def leftovers(settings: AgentSettings, skip_slots: set[int] | None = None) -> dict[str, list[str]]:
    """Everything on the host this session's capsules could have left: netns, links, routes,
    iptables rules, capsule files and QEMU processes (those of `skip_slots` not counted)."""
    agent = settings.agent_id
    skip = skip_slots or set()

    def ours(text: str) -> bool:
        """Names or tags one of this agent's slots not in `skip`."""
        slots = re.findall(rf"(?:nbx-{agent}-|nbh{agent}x|nestbox:{agent}:)(\d+)\b", text)
        return bool(slots) and not skip.issuperset(int(n) for n in slots)

    capsules = settings.state_dir / "capsules"
    return {
        "netns": [ln for ln in sh("ip", "netns", "list").splitlines()
                  if ln.startswith(f"nbx-{agent}-") and ours(ln)],
        "links": [ln.split(":")[1].strip() for ln in sh("ip", "-o", "link").splitlines()
                  if f"nbh{agent}x" in ln and ours(ln)],
        # Only this agent's routes: other agents (other test modules) may run at the same time.
        "routes": [ln for ln in sh("ip", "route").splitlines() if ours(ln)],
        "rules": sorted(ln for ln in sh("iptables-save").splitlines()
                        if f"nestbox:{agent}:" in ln and ours(ln)),
        "files": sorted(str(p) for p in capsules.rglob("*")) if capsules.exists() else [],
        "processes": [str(pid) for pid in qemu_pids(settings.data_dir)],
        "cgroups": vm_cgroups(settings),
    }  # fmt: skip


def vm_cgroups(settings: AgentSettings) -> list[str]:
    """This agent's VM cgroups (every hierarchy), as `<controller dir>/<capsule>`."""
    tree = Cgroups.detect(settings.cgroup_root, settings.cgroup_parent, settings.agent_id)
    return sorted(str(d) for name in tree.names() for d in tree.dirs(name))


def qemu_pids(data_dir: Path) -> list[int]:
    """QEMU processes whose command line mentions `data_dir` (ours, and only ours)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and b"qemu-system" in cmdline[0]
            and str(data_dir).encode() in b" ".join(cmdline)
        ):
            pids.append(int(proc.name))
    return pids


def _kill_our_qemus(data_dir: Path) -> None:
    for pid in qemu_pids(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.fixture(scope="module")
def agent(
    vm_settings: AgentSettings, minimal_template: tuple[Template, BootInfo]
) -> Iterator[AgentProcess]:
    """A real agent process for one test module, on the session's data directory (so the
    `minimal` template is there) with its own agent id and 30 slots of its own. Afterwards the agent
    is stopped and everything it made is removed, even if a test failed half-way."""
    from tests.integration.vm.agent_process import AgentProcess

    agent = AgentProcess.make(vm_settings, slot_first=SLOT_FIRST + 40, slot_count=30)
    agent.start()
    try:
        yield agent
    finally:
        agent.kill()
        remove_agent_leftovers(agent.settings)


def remove_agent_leftovers(settings: AgentSettings) -> None:
    """Kill the agent's QEMUs and remove its network and state directory."""
    from nestbox.hostagent.network import cleanup_leftovers

    for pid in qemu_pids(settings.state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    anyio.run(lambda: cleanup_leftovers(RealSystem(), settings, set()))
    remove_cgroups(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)


def remove_cgroups(settings: AgentSettings) -> None:
    """The agent's VM cgroups (killing what is left in them) and its cgroup directory."""
    confine.remove_leftover_cgroups(settings, set())
    confine.remove_agent_cgroups(settings)
