"""Fork on the agent (`hostagent/fork.py`) against the fakes, without QEMU: copies that run with
their own tokens and the source's settings, the source running on, the hidden template
unpublished at once and its version removed with the last copy; refusals; a failed copy leaves
nothing but the source. The real thing (memory, processes, files, host names) is
`tests/e2e/test_lifetime.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from nestbox.hostagent import fork
from nestbox.hostagent.capsule import CapsuleState, InvalidState, new_capsule_id
from nestbox.hostagent.errors import BadRequest, CapsuleExists
from nestbox.hostagent.manager import CapsuleManager, CreateSpec
from nestbox.hostagent.storage import cow
from tests.fakes.host import fake_host

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.hostagent.managed import CapsuleView

S = CapsuleState


def forks_on_disk(templates: Path) -> list[str]:
    return sorted(p.name for p in templates.iterdir() if "fork-" in p.name)


@pytest.fixture(autouse=True)
def flat_overlays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def chain(path: Path) -> list[Path]:  # an overlay straight on the image: moved as is
        return [path, tmp_path / "nestbox" / "image" / "rootfs.ext4"]

    monkeypatch.setattr(cow, "backing_chain", chain)


async def test_fork_copies_run_on_their_own(tmp_path: Path) -> None:
    async with fake_host(tmp_path, with_manager=True) as host:
        manager = host.manager
        assert manager is not None
        await host.template("minimal")
        source = await manager.create(CreateSpec(team_id="t1", idle_timeout_s=90))
        ids = [new_capsule_id(), new_capsule_id()]
        result = await fork.fork(manager, source.capsule_id, 2, ids)
        assert [c.capsule_id for c in result.copies] == ids
        assert result.paused_ms >= 0
        every = [source.capsule_id, *ids]
        assert [manager.state(c) for c in every] == [S.RUNNING] * 3
        tokens = {host.runtime.get(c).record.access_token for c in every}
        assert len(tokens) == 3  # each copy set its own at /init
        for cid in ids:
            record = host.runtime.get(cid).record
            assert (record.team_id, record.idle_timeout_s) == ("t1", 90)
        templates = host.settings.templates_dir
        [version] = forks_on_disk(templates)  # unpublished: only the version is left
        assert version.startswith(".fork-")

        await manager.destroy(source.capsule_id)  # the copies do not need the source
        assert forks_on_disk(templates) == [version]
        await manager.destroy(ids[0])
        await fork.prune(manager)
        assert forks_on_disk(templates) == [version]  # a copy is still based on it
        await manager.destroy(ids[1])
        await fork.prune(manager)
        assert forks_on_disk(templates) == []


async def test_fork_refusals_and_a_failed_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_host(tmp_path, with_manager=True) as host:
        manager = host.manager
        assert manager is not None
        await host.template("minimal")
        source = (await manager.create(CreateSpec())).capsule_id
        for count, ids in ((0, None), (11, None), (2, [new_capsule_id()]), (1, ["cl-bad"])):
            with pytest.raises(BadRequest):
                await fork.fork(manager, source, count, ids)
        with pytest.raises(CapsuleExists):
            await fork.fork(manager, source, 1, [(await manager.create(CreateSpec())).capsule_id])

        calls = 0
        create = CapsuleManager.create

        async def second_fails(self: CapsuleManager, spec: CreateSpec) -> CapsuleView:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("no room")
            return await create(self, spec)

        monkeypatch.setattr(CapsuleManager, "create", second_fails)
        before = {c.id for c in host.runtime.capsules()}
        with pytest.raises(RuntimeError, match="no room"):
            await fork.fork(manager, source, 2)
        assert {c.id for c in host.runtime.capsules()} == before  # no copy is left
        assert manager.state(source) == S.RUNNING  # the source runs on
        await fork.prune(manager)
        assert forks_on_disk(host.settings.templates_dir) == []

        await manager.pause(source)
        with pytest.raises(InvalidState):
            await fork.fork(manager, source, 1)
