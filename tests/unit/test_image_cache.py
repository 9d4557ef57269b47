"""The guest-image cache: stage keys, finding an image, and which stages a build reuses.

Nothing here runs debootstrap or apt: stage builders are replaced by fakes that write the
directory a real stage would publish.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import anyio
import pytest

from nestbox.hostagent.image import build, inputs, kernel, layout, pydeps, rootfs
from nestbox.hostagent.image.cache import find_image, find_in
from nestbox.hostagent.image.errors import ImageBuildError
from nestbox.hostagent.image.inputs import ImageInputs, KernelPackage, digest, stage_keys
from nestbox.hostagent.image.layout import CacheLayout, CacheLock
from nestbox.hostagent.image.progress import Progress, StageReport
from nestbox.hostagent.settings import AgentSettings

if TYPE_CHECKING:
    from pathlib import Path

INPUTS = ImageInputs(
    kernel_recipe="k1",
    tree_recipe="t1",
    deps_recipe="d1",
    init_script="i1",
    envd_source="e1",
    image_recipe="r1",
)
KERNEL = KernelPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")


def test_keys_are_stable_for_the_same_inputs() -> None:
    assert stage_keys(INPUTS, KERNEL) == stage_keys(dataclasses.replace(INPUTS), KERNEL)


def test_an_envd_change_only_changes_the_final_image() -> None:
    before = stage_keys(INPUTS, KERNEL)
    after = stage_keys(dataclasses.replace(INPUTS, envd_source="e2"), KERNEL)
    assert (after.kernel, after.tree, after.deps) == (before.kernel, before.tree, before.deps)
    assert after.version != before.version
    assert after.local != before.local


@pytest.mark.parametrize(
    ("field", "changed_stage"),
    [("kernel_recipe", "kernel"), ("tree_recipe", "tree"), ("deps_recipe", "deps")],
)
def test_each_recipe_changes_its_own_stage(field: str, changed_stage: str) -> None:
    before = stage_keys(INPUTS, KERNEL)
    after = stage_keys(dataclasses.replace(INPUTS, **{field: "other"}), KERNEL)
    for stage in ("kernel", "tree", "deps"):
        assert (getattr(after, stage) != getattr(before, stage)) == (stage == changed_stage)
    assert after.version != before.version


def test_a_new_kernel_version_keeps_the_local_key() -> None:
    newer = KernelPackage(KERNEL.name, "6.1.200-1")
    before, after = stage_keys(INPUTS, KERNEL), stage_keys(INPUTS, newer)
    assert after.local == before.local
    assert after.kernel != before.kernel
    assert after.version != before.version
    assert (after.tree, after.deps) == (before.tree, before.deps)


def test_digest_separates_its_parts() -> None:
    assert digest("ab", "c") != digest("a", "bc")
    assert len(digest("x")) == 16


def test_envd_code_layer_holds_only_what_envd_imports() -> None:
    names = [name for name, _ in inputs.envd_source_files()]
    tops = {n.split("/")[1] for n in names}
    assert tops <= {"__init__.py", "py.typed", "protocol", "common", "envd"}
    assert "nestbox/envd/__main__.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_envd_code_hash_follows_file_contents(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    first = inputs.hash_files([("nestbox/envd/a.py", a)])
    a.write_text("x = 2\n")
    assert inputs.hash_files([("nestbox/envd/a.py", a)]) != first


def test_envd_requirements_are_base_plus_envd_extra() -> None:
    reqs = inputs.envd_requirements()
    names = {r.split("==")[0] for r in reqs}
    assert {"pydantic", "anyio", "starlette", "uvicorn"} <= names
    assert not names & {"httpx", "sqlalchemy", "pytest"}  # other programs' dependencies
    assert list(reqs) == sorted(reqs)


def test_self_referencing_extras_are_expanded() -> None:
    project: dict[str, object] = {
        "optional-dependencies": {"a": ["x==1", "nestbox[b]"], "b": ["y==2", "nestbox[a]"]}
    }
    assert sorted(inputs._expand(project, ["z==3", "nestbox[a]"])) == ["x==1", "y==2", "z==3"]


def test_requirements_from_installed_metadata() -> None:
    requires = ["anyio==4", 'uvicorn==1; extra == "envd"', "httpx==2; extra == 'hostagent'"]
    assert inputs._from_metadata(requires, "envd") == ["anyio==4", "uvicorn==1"]


# --- finding an image ---------------------------------------------------------------------


def fake_image(cache: CacheLayout, version: str, key: str, built_at: float) -> Path:
    d = cache.guest(version)
    d.mkdir(parents=True)
    for name in (layout.VMLINUX, layout.INITRD, layout.ROOTFS):
        (d / name).write_bytes(b"x")
    layout.write_json(d / layout.MANIFEST, {"local_key": key, "built_at": built_at})
    return d


def test_find_returns_the_newest_complete_match(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    fake_image(cache, "old", "k", 1.0)
    fake_image(cache, "new", "k", 2.0)
    fake_image(cache, "other", "different", 3.0)
    (fake_image(cache, "broken", "k", 4.0) / layout.ROOTFS).unlink()
    no_manifest = fake_image(cache, "unfinished", "k", 5.0)
    (no_manifest / layout.MANIFEST).unlink()
    found = find_in(cache, "k")
    assert found is not None
    assert found.version == "new"
    assert found.rootfs == cache.guest("new") / layout.ROOTFS
    assert find_in(cache, "k") == found
    assert find_in(cache, "nothing") is None
    assert find_in(CacheLayout(tmp_path / "missing"), "k") is None


def test_find_image_uses_the_settings_cache(tmp_path: Path) -> None:
    settings = AgentSettings(data_dir=tmp_path, image_cache=tmp_path / "img")
    assert find_image(settings) is None
    key = inputs.local_key(build.current_inputs())
    fake_image(CacheLayout(tmp_path / "img"), "v1", key, 1.0)
    first, second = find_image(settings), find_image(settings)
    assert first is not None
    assert first == second
    assert first.version == "v1"


# --- which stages a build reuses ----------------------------------------------------------


class FakeStages:
    """Stage builders that publish marker-only directories and count their calls."""

    def __init__(self, cache: CacheLayout) -> None:
        self.cache = cache
        self.calls: list[str] = []

    async def resolve(self) -> KernelPackage:
        return KERNEL

    def _publish(self, stage: str, target: Path, marker: str) -> Path:
        self.calls.append(stage)
        work = layout.make_temp(self.cache, stage)
        (work / marker).write_text("{}")
        layout.publish(work, target)
        return target

    async def kernel(self, cache: CacheLayout, key: str, package: KernelPackage) -> Path:
        return self._publish("kernel", cache.kernel(key), layout.META)

    async def tree(self, cache: CacheLayout, key: str, mirror: str) -> Path:
        return self._publish("tree", cache.tree(key), layout.META)

    async def deps(self, cache: CacheLayout, key: str) -> Path:
        return self._publish("deps", cache.deps(key), layout.META)

    async def guest(self, cache: CacheLayout, keys: inputs.StageKeys, *_: object) -> Path:
        target = self._publish("image", cache.guest(keys.version), "placeholder")
        layout.write_json(target / layout.MANIFEST, {"local_key": keys.local, "built_at": 1.0})
        return target


@pytest.fixture
def fake_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeStages:
    fake = FakeStages(CacheLayout(tmp_path))
    monkeypatch.setattr(kernel, "resolve_package", fake.resolve)
    monkeypatch.setattr(kernel, "build_kernel", fake.kernel)
    monkeypatch.setattr(rootfs, "build_tree", fake.tree)
    monkeypatch.setattr(rootfs, "apt_mirror", lambda: "http://mirror.invalid/debian")
    monkeypatch.setattr(pydeps, "build_deps", fake.deps)
    monkeypatch.setattr(build, "_build_guest", fake.guest)
    return fake


async def test_envd_only_change_rebuilds_just_the_image(
    fake_stages: FakeStages, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = fake_stages.cache
    monkeypatch.setattr(build, "current_inputs", lambda: INPUTS)
    first = await build._build_stages(cache, Progress(None))
    assert fake_stages.calls == ["kernel", "tree", "deps", "image"]

    again = Progress(None)
    assert await build._build_stages(cache, again) == first
    assert fake_stages.calls == ["kernel", "tree", "deps", "image"]  # everything reused
    assert [r.status for r in again.reports] == ["resolved", "cached", "cached", "cached", "cached"]

    monkeypatch.setattr(
        build, "current_inputs", lambda: dataclasses.replace(INPUTS, envd_source="e2")
    )
    second = await build._build_stages(cache, Progress(None))
    assert fake_stages.calls == ["kernel", "tree", "deps", "image", "image"]
    assert second.version != first.version
    assert first.rootfs.parent.is_dir()  # the older image stays until garbage-collected


async def test_a_failed_stage_leaves_nothing_behind(
    fake_stages: FakeStages, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_tree(cache: CacheLayout, key: str, mirror: str) -> Path:
        work = layout.make_temp(cache, "tree")
        try:
            (work / "half-written").write_text("x")
            raise ImageBuildError("debootstrap exited with status 1")
        finally:
            layout.remove_tree(work)

    monkeypatch.setattr(build, "current_inputs", lambda: INPUTS)
    monkeypatch.setattr(rootfs, "build_tree", failing_tree)
    progress = Progress(None)
    with pytest.raises(ImageBuildError):
        await build._build_stages(fake_stages.cache, progress)
    assert progress.reports[-1].status == "failed"
    assert list(fake_stages.cache.tmp.iterdir()) == []
    assert not (fake_stages.cache.root / "trees").exists()


def test_publish_never_replaces_an_existing_stage(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    target = cache.kernel("k")
    first, second = layout.make_temp(cache, "kernel"), layout.make_temp(cache, "kernel")
    (first / "f").write_text("first")
    (second / "f").write_text("second")
    assert layout.publish(first, target)
    assert not layout.publish(second, target)
    assert (target / "f").read_text() == "first"
    assert not second.exists()
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_clear_temp_removes_leftovers(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    (layout.make_temp(cache, "tree") / "x").mkdir()
    layout.clear_temp(cache)
    assert list(cache.tmp.iterdir()) == []


def test_the_lock_is_exclusive(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    first, second = CacheLock(cache), CacheLock(cache)
    assert first.acquire(blocking=False)
    assert not second.acquire(blocking=False)
    first.release()
    assert second.acquire(blocking=False)
    second.release()


def test_manifest_json_is_readable(tmp_path: Path) -> None:
    layout.write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}
    (tmp_path / "bad.json").write_text("[")
    assert layout.read_json(tmp_path / "bad.json") is None
    assert layout.read_json(tmp_path / "none.json") is None


async def test_a_waiting_build_takes_the_lock_once_released(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    holder, waiter, report = CacheLock(cache), CacheLock(cache), StageReport("lock")
    assert holder.acquire(blocking=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(build._acquire, waiter, report)
        await anyio.wait_all_tasks_blocked()  # it tried, failed, and now waits to poll again
        assert report.status == "done"  # the default: still waiting
        holder.release()
    assert report.status == "waited"
    waiter.release()


async def test_a_cancelled_wait_leaves_the_lock_free(tmp_path: Path) -> None:
    cache = CacheLayout(tmp_path)
    holder = CacheLock(cache)
    assert holder.acquire(blocking=False)
    with anyio.move_on_after(0.1):
        await build._acquire(CacheLock(cache), StageReport("lock"))
    holder.release()
    after = CacheLock(cache)
    assert after.acquire(blocking=False)
    after.release()
