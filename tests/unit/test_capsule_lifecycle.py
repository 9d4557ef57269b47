"""The capsule lifecycle (`VmRuntime` over `lifecycle`) against the fakes, in seconds, without
QEMU or root: create (boot, clone), pause, resume, snapshot_template, destroy, a VM that dies,
cancellation at every step of create, resume and pause leaving nothing behind, and the per-VM
stats the metrics sampler uses.

VMs are `FakeHypervisor`'s; each run's envd client is the agent's real `CapsuleEnvd`, talking
HTTP to a tiny in-process fake envd (`tests/fakes/envd.py`) that keeps envd's token rules.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from nestbox.hostagent import capsule as cap
from nestbox.hostagent import lifecycle, views
from nestbox.hostagent.capsule import CapsuleState, GuestUnreachable
from nestbox.hostagent.envdconn.errors import EnvdCallError
from nestbox.hostagent.errors import CapsuleExists
from nestbox.hostagent.manager import CreateSpec
from nestbox.hostagent.metrics import MetricsRing, Sampler
from nestbox.hostagent.storage import cow
from nestbox.hostagent.storage import templates as tpl
from nestbox.hostagent.vmm.base import MigrationFailed, SaveResult, VmStats
from nestbox.hostagent.vmm.process import VmProcess
from tests.conftest import eventually
from tests.fakes.envd import FakeGuest
from tests.fakes.host import NOTHING, FakeHost, fake_host

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.managed import CapsuleView
    from nestbox.hostagent.manager import CapsuleManager

S = CapsuleState
BOOT_STEPS = ["dir", "disk", "record", "slot", "network", "vmm", "envd", "init"]
CLONE_STEPS = ["dir", "disk", "record", "slot", "network", "vmm", "restore", "envd", "init"]
RESUME_STEPS = ["slot", "network", "vmm", "restore", "envd", "init"]


def on_disk(host: FakeHost, capsule_id: str) -> dict[str, object]:
    path = cap.records_dir(host.settings.state_dir) / f"{capsule_id}.json"
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


async def leftovers(host: FakeHost) -> dict[str, object]:
    await host.runtime.networks.settle()  # slot networks go in the background
    return host.leftovers()


class CancelAt:
    """A `StepHook` that cancels `scope` right after `step` (and records every step)."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.scope = anyio.CancelScope()
        self.seen: list[str] = []

    async def __call__(self, step: str) -> None:
        self.seen.append(step)
        if step == self.step:
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()


# ── create ──────────────────────────────────────────────────────────────────────────────


async def test_boot_inits_envd_and_records_the_run(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        seen: list[str] = []

        async def hook(step: str) -> None:
            seen.append(step)

        capsule = await host.runtime.boot(host.image(), template_id="t", hook=hook)
        assert seen == BOOT_STEPS
        vm = host.hypervisor.vm(capsule.id)
        assert host.hypervisor.verbs() == ["launch"]
        assert not vm.spec.incoming
        record = on_disk(host, capsule.id)
        assert record["state"] == "running"
        assert (record["pid"], record["slot"]) == (vm.pid, vm.spec.slot)
        # A cold boot's envd is open: the /init carries no token and sets the capsule's.
        [init] = vm.guest.inits
        assert init.token is None
        assert isinstance(init.body, dict)
        assert init.body["capsuleId"] == capsule.id
        assert vm.guest.token == record["access_token"] == init.body["accessToken"]
        assert record["pending_token"] is None
        # One client per run: the one that sent /init is the capsule's, with the new token.
        [client] = host.clients
        assert capsule.envd is client
        assert client.access_token == vm.guest.token
        assert await client.health() == "fake"
        assert await client.metrics() == {"cpu_count": 1}


async def test_clone_presents_the_template_token_and_sets_its_own(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        template_token = await host.template("minimal")
        a, b = await host.runtime.clone("minimal", 2)
        for capsule in (a, b):
            vm = host.hypervisor.vm(capsule.id)
            assert host.hypervisor.verbs(capsule.id) == ["launch", "restore"]
            assert vm.spec.incoming
            [init] = vm.guest.inits
            assert init.token == template_token
            assert vm.guest.token == capsule.record.access_token != template_token
            assert capsule.envd.access_token == vm.guest.token
        assert a.record.access_token != b.record.access_token
        assert len(host.clients) == 2


async def test_a_refused_init_fails_the_create_and_leaves_nothing(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        await host.template("minimal", token="one")
        template = tpl.load_template(host.settings.templates_dir, "minimal")
        meta = template.meta.model_copy(update={"access_token": "another"})
        template.dir.meta_file.write_text(meta.model_dump_json())
        with pytest.raises(GuestUnreachable, match="init"):
            await host.runtime.clone("minimal")
        assert await leftovers(host) == NOTHING


@pytest.mark.parametrize("step", CLONE_STEPS)
async def test_cancel_at_each_clone_step_leaves_nothing(tmp_path: Path, step: str) -> None:
    async with fake_host(tmp_path) as host:
        await host.template("minimal")
        hook = CancelAt(step)
        with hook.scope:
            await host.runtime.clone("minimal", hook=hook)
        assert hook.scope.cancelled_caught
        assert hook.seen == CLONE_STEPS[: CLONE_STEPS.index(step) + 1]
        assert await leftovers(host) == NOTHING
        [capsule] = await host.runtime.clone("minimal")  # and the host is still usable
        assert capsule.state == S.RUNNING


@pytest.mark.parametrize("step", BOOT_STEPS)
async def test_cancel_at_each_boot_step_leaves_nothing(tmp_path: Path, step: str) -> None:
    async with fake_host(tmp_path) as host:
        hook = CancelAt(step)
        with hook.scope:
            await host.runtime.boot(host.image(), hook=hook)
        assert hook.scope.cancelled_caught
        assert await leftovers(host) == NOTHING


@pytest.mark.parametrize("verb", ["launch", "restore"])
async def test_a_hypervisor_step_that_hangs_is_cancelled_cleanly(tmp_path: Path, verb: str) -> None:
    async with fake_host(tmp_path) as host:
        await host.template("minimal")
        host.hypervisor.hang.add(verb)
        with anyio.move_on_after(0.2) as scope:
            await host.runtime.clone("minimal")
        assert scope.cancelled_caught
        assert await leftovers(host) == NOTHING


async def test_clones_past_the_restore_lanes_wait_their_turn(tmp_path: Path) -> None:
    """At most `restore_concurrency` clones start up at once (0: two per core): with every
    restore hanging, one clone more than that has run no step until a lane is freed."""
    lanes = 2 * (os.cpu_count() or 1)
    async with fake_host(tmp_path) as host:
        await host.template("minimal")
        host.hypervisor.hang.add("restore")
        steps: list[list[str]] = [[] for _ in range(lanes + 1)]
        scopes = [anyio.CancelScope() for _ in steps]

        async def clone(i: int) -> None:
            async def hook(step: str) -> None:
                steps[i].append(step)

            with scopes[i]:
                await host.runtime.clone("minimal", hook=hook)

        async def until(ready: Callable[[], bool]) -> None:
            with anyio.fail_after(10):
                while not ready():  # noqa: ASYNC110 (the hooks append to `steps`)
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for i in range(len(steps)):
                tg.start_soon(clone, i)
            await until(lambda: sum("vmm" in seen for seen in steps) == lanes)
            await anyio.sleep(0.1)  # time the one left out must not be able to use
            [waiting] = [i for i, seen in enumerate(steps) if not seen]
            scopes[next(i for i, seen in enumerate(steps) if seen)].cancel()
            await until(lambda: "vmm" in steps[waiting])  # the freed lane is its
            for scope in scopes:
                scope.cancel()
        assert await leftovers(host) == NOTHING


async def test_a_guest_whose_init_hangs_is_unreachable(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        await host.template("minimal")
        host.hypervisor.new_guest = lambda: FakeGuest(hang={"/init"})
        with pytest.raises(GuestUnreachable, match="during init"):
            await host.runtime.clone("minimal")
        assert await leftovers(host) == NOTHING


async def test_a_vm_that_dies_is_cleaned_up_and_left_in_error(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        await host.template("minimal")
        [capsule] = await host.runtime.clone("minimal")
        exited: list[tuple[str, int | None]] = []
        host.runtime.on_vm_exit = lambda cid, code: exited.append((cid, code))
        host.hypervisor.crash(host.hypervisor.vm(capsule.id), code=3)
        with anyio.fail_after(5):
            while not exited:  # noqa: ASYNC110 (the exit watcher has no event to wait on)
                await anyio.sleep(0.01)
        assert exited == [(capsule.id, 3)]
        # Everything of it is gone but its entry, listed in ERROR until it is destroyed.
        assert capsule.state == S.ERROR
        assert capsule.record.error == "the VM exited unexpectedly (exit code 3)"
        assert await leftovers(host) == {**NOTHING, "capsules": [capsule.id]}
        await host.runtime.destroy(capsule.id)
        assert await leftovers(host) == NOTHING


async def test_destroy_removes_everything(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        await host.template("minimal")
        [capsule] = await host.runtime.clone("minimal")
        await host.runtime.destroy(capsule.id)
        assert capsule.state == S.STOPPED
        assert host.hypervisor.verbs(capsule.id)[-1] == "kill"
        assert await leftovers(host) == NOTHING


# ── pause / resume ──────────────────────────────────────────────────────────────────────


async def running(host: FakeHost) -> Capsule:
    """A clone whose client holds idle keep-alive connections, as a session leaves them."""
    await host.template("minimal")
    [capsule] = await host.runtime.clone("minimal")
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(capsule.envd.health)
    return capsule


async def test_pause_then_resume(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        vm = host.hypervisor.vm(capsule.id)
        token = capsule.record.access_token
        client = capsule.envd
        await host.runtime.pause(capsule.id)
        assert host.hypervisor.verbs(capsule.id)[2:] == ["prepare_save", "pause", "save", "kill"]
        # /snapshot/prepare came on a keep-alive connection the client had already used (no
        # new handshake into the guest); envd closed the other idle ones before answering (the
        # seed's rule), so none was open when the vCPUs stopped.
        assert vm.guest.prepares == 1
        prepare = vm.guest.seen[-1]
        assert prepare.path == "/snapshot/prepare"
        assert prepare.connection in {s.connection for s in vm.guest.seen[:-1]}
        assert vm.guest.idle_closed_at_prepare[0] >= 1
        assert vm.guest.others_open_at_prepare == [0]
        assert vm.guest.open_at_pause == [0]
        assert client.is_closed
        record = on_disk(host, capsule.id)
        assert record["state"] == "paused"
        assert (record["pid"], record["slot"], record["access_token"]) == (None, None, token)
        snapshot = capsule.record.snapshot
        assert snapshot is not None
        assert snapshot.exists()
        assert not snapshot.with_name(snapshot.name + ".partial").exists()
        await host.runtime.networks.settle()
        assert host.leftovers()["vms"] == []
        assert host.leftovers()["slots in use"] == set()

        await host.runtime.resume(capsule.id)
        vm2 = host.hypervisor.vm(capsule.id)
        assert host.hypervisor.verbs(capsule.id)[-2:] == ["launch", "restore"]
        [init] = vm2.guest.inits  # the snapshot's envd held the old token...
        assert init.token == token
        assert vm2.guest.token == capsule.record.access_token != token  # ... and has a new one
        assert capsule.envd is host.clients[-1]
        assert capsule.envd.access_token == vm2.guest.token
        assert not snapshot.exists()
        assert on_disk(host, capsule.id)["state"] == "running"


@pytest.mark.parametrize("step", RESUME_STEPS)
async def test_cancel_at_each_resume_step_leaves_it_paused(tmp_path: Path, step: str) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        await host.runtime.pause(capsule.id)
        token = capsule.record.access_token
        hook = CancelAt(step)
        with hook.scope:
            await host.runtime.resume(capsule.id, hook=hook)
        assert hook.scope.cancelled_caught
        assert capsule.state == S.PAUSED
        record = on_disk(host, capsule.id)
        assert (record["state"], record["pid"], record["slot"]) == ("paused", None, None)
        assert (record["access_token"], record["pending_token"]) == (token, None)
        assert capsule.record.snapshot is not None
        assert capsule.record.snapshot.exists()
        left = await leftovers(host)
        assert (left["vms"], left["open clients"], left["slots in use"]) == ([], [], set())
        assert left["netns"] == []
        await host.runtime.resume(capsule.id)  # the snapshot still resumes
        assert capsule.envd.access_token == host.hypervisor.vm(capsule.id).guest.token


async def test_cancel_after_prepare_lets_the_guest_run_on(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        hook = CancelAt("prepare")
        with hook.scope:
            await host.runtime.pause(capsule.id, hook=hook)
        assert hook.scope.cancelled_caught
        await still_running(host, capsule)


async def test_the_pausing_record_is_on_disk_before_the_vm_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PAUSING record (naming the snapshot) is written while envd prepares, but always
    reaches the disk before the save; a failed write stops the pause, the guest runs on."""
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        seen: list[tuple[object, object]] = []
        fake_pause = host.hypervisor.pause

        async def pause(vm: object) -> None:
            record = on_disk(host, capsule.id)
            seen.append((record["state"], record["snapshot"]))
            await fake_pause(vm)  # type: ignore[arg-type]

        monkeypatch.setattr(host.hypervisor, "pause", pause)
        await host.runtime.pause(capsule.id)
        assert seen == [("pausing", str(capsule.record.pause_snapshot))]

        await host.runtime.resume(capsule.id)
        write = cap.write_record

        def failing(state_dir: Path, record: cap.CapsuleRecord) -> None:
            if record.state == S.PAUSING:
                raise OSError(28, "No space left on device")
            write(state_dir, record)

        monkeypatch.setattr(cap, "write_record", failing)
        with pytest.raises(OSError, match="No space"):
            await host.runtime.pause(capsule.id)
        assert len(seen) == 1  # never stopped
        monkeypatch.setattr(cap, "write_record", write)
        await still_running(host, capsule)


async def test_a_snapshot_is_sent_to_the_disk_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`save`'s final fsync waits only for the last pages: the earlier ones were handed to the
    disk while the VMM wrote (on the file the VMM writes); a failed write is raised as is."""
    path = tmp_path / "snapshot.state.partial"
    sent: list[int] = []

    def start_writeback(fd: int) -> None:
        assert os.fstat(fd).st_ino == path.stat().st_ino
        sent.append(path.stat().st_size)

    monkeypatch.setattr(lifecycle, "start_writeback", start_writeback)

    async def write() -> SaveResult:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # as the VMM does: the same file
        try:
            for _ in range(8):
                os.write(fd, b"x" * 4096)
                await anyio.sleep(lifecycle.WRITEBACK_S * 2)
        finally:
            os.close(fd)
        return SaveResult(state_bytes=8 * 4096)

    result = await lifecycle._written_back_meanwhile(path, write)
    assert result.state_bytes == 8 * 4096
    assert sent
    assert sent[-1] > 0  # sent while the VMM was still writing

    async def fails() -> SaveResult:
        await anyio.sleep(lifecycle.WRITEBACK_S * 2)
        raise MigrationFailed("save", "failed", "injected")

    with pytest.raises(MigrationFailed):
        await lifecycle._written_back_meanwhile(path, fails)


@pytest.mark.parametrize("how", ["fails", "hangs"])
async def test_a_failed_save_is_cancelled_and_the_guest_runs_on(tmp_path: Path, how: str) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        if how == "fails":
            host.hypervisor.fail["save"] = MigrationFailed("save", "failed", "injected")
            with pytest.raises(MigrationFailed):
                await host.runtime.pause(capsule.id)
        else:
            host.hypervisor.hang.add("save")
            with anyio.move_on_after(0.2):
                await host.runtime.pause(capsule.id)
        assert host.hypervisor.verbs(capsule.id)[-3:] == ["pause", "save", "cancel_save"]
        await still_running(host, capsule)


async def still_running(host: FakeHost, capsule: Capsule) -> None:
    """The capsule runs on after a pause that did not happen: same VM and client, no snapshot."""
    vm = host.hypervisor.vm(capsule.id)
    assert (vm.state, vm.saving) == ("running", False)
    assert capsule.state == S.RUNNING
    assert on_disk(host, capsule.id)["state"] == "running"
    assert capsule.record.snapshot is None
    assert not capsule.record.pause_snapshot.exists()
    assert not capsule.record.pause_snapshot.with_name("snapshot.state.partial").exists()
    assert await capsule.envd.health() == "fake"  # the run's client works on
    assert capsule.envd is host.clients[-1]
    host.hypervisor.fail.clear()
    host.hypervisor.hang.clear()
    await host.runtime.pause(capsule.id)  # and a later pause works
    assert on_disk(host, capsule.id)["state"] == "paused"


async def test_cancel_after_save_is_paused(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        hook = CancelAt("save")
        with hook.scope:
            await host.runtime.pause(capsule.id, hook=hook)
        assert capsule.state == S.PAUSED
        left = await leftovers(host)
        assert (left["vms"], left["open clients"], left["netns"]) == ([], [], [])


# ── templates ───────────────────────────────────────────────────────────────────────────


async def test_snapshot_template_then_clone_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def chain(path: Path) -> list[Path]:  # what qemu-img reports for an image overlay
        return [path, tmp_path / "nestbox" / "image" / "rootfs.ext4"]

    monkeypatch.setattr(cow, "backing_chain", chain)
    async with fake_host(tmp_path) as host:
        capsule = await host.runtime.boot(host.image())
        token = capsule.record.access_token
        template = await host.runtime.snapshot_template(capsule.id, "mine")
        assert host.hypervisor.verbs(capsule.id) == [
            "launch", "prepare_save", "pause", "save", "kill",
        ]  # fmt: skip
        assert template.meta.access_token == token
        assert template.meta.ram == "state"
        assert json.loads(template.dir.state.read_text())["token"] == token
        assert template.dir.disk.exists()
        assert await leftovers(host) == NOTHING  # the capsule was consumed
        [clone] = await host.runtime.clone("mine")
        [init] = host.hypervisor.vm(clone.id).guest.inits
        assert init.token == token
        assert clone.record.access_token != token


async def test_a_failed_template_snapshot_lets_the_capsule_run_on(tmp_path: Path) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        host.hypervisor.fail["save"] = MigrationFailed("save", "failed", "injected")
        with pytest.raises(MigrationFailed):
            await host.runtime.snapshot_template(capsule.id, "mine")
        assert host.leftovers()["staging"] == []
        with pytest.raises(tpl.TemplateNotFound):
            tpl.load_template(host.settings.templates_dir, "mine")
        await still_running(host, capsule)


async def test_a_template_is_not_made_from_a_guest_that_did_not_prepare(tmp_path: Path) -> None:
    """A pause snapshots a guest whose prepare failed anyway (best effort); a template must not:
    every clone would start from a guest caught mid-prepare."""
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        host.hypervisor.vm(capsule.id).guest.status["/snapshot/prepare"] = 500
        with pytest.raises(EnvdCallError, match="before a template snapshot"):
            await host.runtime.snapshot_template(capsule.id, "mine")
        assert "save" not in host.hypervisor.verbs(capsule.id)
        with pytest.raises(tpl.TemplateNotFound):
            tpl.load_template(host.settings.templates_dir, "mine")
        assert host.leftovers()["staging"] == []
        await still_running(host, capsule)


# ── per-VM stats ────────────────────────────────────────────────────────────────────────


async def test_the_sampler_turns_vm_stats_into_points_until_the_vm_is_gone(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"x" * 8192)
    stats = iter([VmStats(1.0, 100), VmStats(1.5, 200), VmStats(2.5, 300), None])
    ring = MetricsRing()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            sampler = Sampler(0.01, tg.start_soon)
            sampling = sampler.add("cl-a", ring, lambda: next(stats), disk, vcpus=2)
        # the task group ends when the loop does: the VM is gone, nothing is left to sample
    assert sampling.cancelled
    points = ring.since()
    assert [p.mem_bytes for p in points] == [200, 300]
    assert all(p.disk_bytes >= 8192 for p in points)
    assert all(p.cpu_pct > 0 for p in points)  # CPU time grew between the samples


async def test_one_sampler_pass_serves_every_capsule_and_a_cancelled_one_gets_no_more(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"x")
    used = {"a": 0.0, "b": 0.0}

    def stats(name: str) -> VmStats:
        used[name] += 0.5
        return VmStats(used[name], 100)

    def broken() -> VmStats:
        used["c"] = used.get("c", 0.0) + 1
        if used["c"] > 1:
            raise OSError("unreadable")  # the first reading works, every later one fails
        return VmStats(0.0, 100)

    rings = {"a": MetricsRing(), "b": MetricsRing(), "c": MetricsRing()}
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            sampler = Sampler(0.01, tg.start_soon)
            a = sampler.add("cl-a", rings["a"], lambda: stats("a"), disk, vcpus=1)
            b = sampler.add("cl-b", rings["b"], lambda: stats("b"), disk, vcpus=1)
            c = sampler.add("cl-c", rings["c"], broken, disk, vcpus=1)
            assert len(sampler) == 3
            await eventually(lambda: min(len(rings[k].since()) for k in "ab") >= 3)
            b.cancel()
            kept = len(rings["b"].since())
            await eventually(lambda: len(rings["a"].since()) >= kept + 3)
            assert len(rings["b"].since()) == kept
            a.cancel()
    assert c.cancelled  # its failure stopped only its own sampling
    assert rings["c"].since() == []


def test_a_vmm_process_stats_come_from_proc() -> None:
    me = VmProcess(os.getpid(), [], Path(os.devnull))
    try:
        stats = me.stats()
        assert stats is not None
        assert stats.cpu_s > 0
        assert stats.rss_bytes > 1 << 20
    finally:
        me.close()
    assert me.stats() is None  # no pidfd: not known to run


# ── the one registry: one entry, one lock, one state enum ───────────────────────────────


def test_every_state_of_the_one_enum_has_a_wire_value() -> None:
    assert set(views.STATES) == set(CapsuleState)


async def test_a_create_is_listed_starting_and_a_destroy_waits_for_it(tmp_path: Path) -> None:
    async with fake_host(tmp_path, with_manager=True) as host:
        assert host.manager is not None
        await host.template("minimal")
        at_vmm, go_on = anyio.Event(), anyio.Event()

        async def hook(step: str) -> None:
            if step == "vmm":
                at_vmm.set()
                await go_on.wait()

        cid = cap.new_capsule_id()
        destroyed = anyio.Event()

        async def destroy() -> None:
            await host.manager.destroy(cid)  # type: ignore[union-attr]
            destroyed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(host.runtime.clone, "minimal", capsule_id=cid,
                                            team_id="t1", hook=hook))  # fmt: skip
            await at_vmm.wait()
            [view], _ = host.manager.list_capsules()
            assert (view.capsule_id, view.state, view.team_id) == (cid, S.STARTING, "t1")
            with pytest.raises(CapsuleExists):
                await host.runtime.clone("minimal", capsule_id=cid)
            tg.start_soon(destroy)
            await anyio.wait_all_tasks_blocked()
            assert not destroyed.is_set()  # it waits for the create's hold of the one lock
            go_on.set()
        assert destroyed.is_set()
        assert await leftovers(host) == NOTHING


@contextlib.asynccontextmanager
async def capsule_for_a_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FakeHost, CapsuleManager, CapsuleView]]:
    """A host with a manager and one running capsule (team t1, idle timeout 60 s), its disk an
    overlay straight on the image (moved into a template as is)."""

    async def chain(path: Path) -> list[Path]:
        return [path, tmp_path / "nestbox" / "image" / "rootfs.ext4"]

    monkeypatch.setattr(cow, "backing_chain", chain)
    async with fake_host(tmp_path, with_manager=True) as host:
        manager = host.manager
        assert manager is not None
        await host.template("minimal")
        yield host, manager, await manager.create(CreateSpec(team_id="t1", idle_timeout_s=60))


async def test_a_template_comes_back_paused_with_the_capsule_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with capsule_for_a_template(tmp_path, monkeypatch) as (host, manager, view):
        before = host.runtime.get(view.capsule_id)
        template, back = await manager.create_template(view.capsule_id, "mine")
        assert back is not None
        assert (back.capsule_id, back.state, back.template_id) == (
            view.capsule_id,
            S.PAUSED,
            "mine",
        )
        assert (back.team_id, back.idle_timeout_s, back.created_at_unix_ms) == (
            "t1", 60, view.created_at_unix_ms,
        )  # fmt: skip
        assert host.runtime.get(view.capsule_id) is before  # the same entry, never forgotten
        record = on_disk(host, view.capsule_id)
        assert (record["state"], record["team_id"], record["idle_timeout_s"]) == (
            "paused", "t1", 60,
        )  # fmt: skip
        assert template.meta.template_id == "mine"
        await manager.resume(view.capsule_id)
        assert manager.state(view.capsule_id) == S.RUNNING


async def test_a_template_whose_caller_is_gone_is_not_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call is cancelled (its caller hung up) after the template was published, while the
    capsule is being made again from it: the caller never learns of the template, so neither
    it nor its versions are left (nor the note an agent crash would act on)."""
    async with capsule_for_a_template(tmp_path, monkeypatch) as (host, manager, view):
        host.hypervisor.hang.add("restore")  # the capsule made again from the new template
        with anyio.move_on_after(2) as scope:
            await manager.create_template(view.capsule_id, "mine")
        assert scope.cancelled_caught
        root = host.settings.templates_dir
        assert sorted(p.name for p in root.iterdir() if "mine" in p.name) == []


async def test_the_reaper_pause_is_skipped_when_activity_came_while_it_waited(
    tmp_path: Path,
) -> None:
    async with fake_host(tmp_path) as host:
        capsule = await running(host)
        capsule.record = capsule.record.model_copy(update={"idle_timeout_s": 1})
        assert not await host.runtime.pause(capsule.id, only_if_idle=True)  # just active
        assert capsule.state == S.RUNNING
