"""Directory watches on real inotify: event mapping, recursion, uploads, limits, the registry.

Waits use `next_batch` with a deadline, never a fixed sleep: inotify delivers events as soon as
the loop reads its fd.
"""

from __future__ import annotations

import os
import pwd
from typing import TYPE_CHECKING

import pytest

from nestbox.envd.errors import NotFound
from nestbox.envd.filesystem.atomic import AtomicFile
from nestbox.envd.filesystem.watch import (
    DirWatch,
    WatcherRegistry,
    WatchLimitReached,
    WatchOverflow,
)
from nestbox.envd.users import User, lookup_user
from nestbox.protocol.gen.filesystem.filesystem_pb import EventType, FilesystemEvent
from tests.conftest import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

C, W, RM, MV, CH = (EventType.CREATE, EventType.WRITE, EventType.REMOVE, EventType.RENAME,
                    EventType.CHMOD)  # fmt: skip


@pytest.fixture
async def registry() -> AsyncIterator[WatcherRegistry]:
    reg = WatcherRegistry(max_watches=4, max_pending=50)
    yield reg
    await reg.aclose()


async def collect(watch: DirWatch, until: tuple[str, EventType]) -> list[tuple[str, EventType]]:
    """Events until `until` arrives (or 5 s pass)."""
    seen: list[tuple[str, EventType]] = []
    for _ in range(50):
        batch = await watch.next_batch(0.1)
        assert batch is not None
        seen += [(e.name, e.type) for e in batch]
        if until in seen:
            return seen
    raise AssertionError(f"no {until} in {seen}")


async def test_event_mapping(registry: WatcherRegistry, tmp_path: Path) -> None:
    async with registry.stream(tmp_path, recursive=False, include_entry=False) as watch:
        f = tmp_path / "f"
        with f.open("wb") as fh:
            fh.write(b"x")
        f.chmod(0o600)
        f.rename(tmp_path / "g")
        (tmp_path / "g").unlink()
        seen = await collect(watch, ("g", RM))
    assert seen == [("f", C), ("f", W), ("f", CH), ("f", MV), ("g", C), ("g", RM)]
    assert registry.statistics().streams == 0


async def test_recursive_watch_follows_new_directories(
    registry: WatcherRegistry, tmp_path: Path
) -> None:
    (tmp_path / "old").mkdir()
    async with registry.stream(tmp_path, recursive=True, include_entry=True) as watch:
        (tmp_path / "old" / "a").write_text("1")
        assert ("old/a", W) in await collect(watch, ("old/a", W))
        # A directory tree that appears at once: what it already holds is reported as CREATE.
        (tmp_path / "staging" / "inner").mkdir(parents=True)
        (tmp_path / "staging" / "inner" / "b").write_text("2")
        (tmp_path / "staging").rename(tmp_path / "new")
        seen = await collect(watch, ("new/inner/b", C))
        assert ("new", C) in seen
        (tmp_path / "new" / "inner" / "c").write_text("3")
        assert ("new/inner/c", W) in await collect(watch, ("new/inner/c", W))


async def test_non_recursive_ignores_subdirectories(
    registry: WatcherRegistry, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    async with registry.stream(tmp_path, recursive=False, include_entry=False) as watch:
        (tmp_path / "sub" / "x").write_text("x")
        (tmp_path / "marker").touch()
        assert await collect(watch, ("marker", C)) == [("marker", C)]


async def test_include_entry(registry: WatcherRegistry, tmp_path: Path) -> None:
    async with registry.stream(tmp_path, recursive=False, include_entry=True) as watch:
        (tmp_path / "e").write_text("abc")
        (tmp_path / "e").unlink()
        await collect(watch, ("e", RM))
    # collect() dropped the messages: watch again and look at them.
    async with registry.stream(tmp_path, recursive=False, include_entry=True) as watch:
        (tmp_path / "e2").write_text("abc")
        batch: list[FilesystemEvent] = []
        while not any(e.type == W for e in batch):
            got = await watch.next_batch(1)
            assert got
            batch += got
        write = next(e for e in batch if e.type == W)
        assert write.entry is not None
        assert (write.entry.name, write.entry.size) == ("e2", 3)


async def test_uploads_look_like_in_place_writes(registry: WatcherRegistry, tmp_path: Path) -> None:
    me = lookup_user(pwd.getpwuid(os.geteuid()).pw_name)
    async with registry.stream(tmp_path, recursive=False, include_entry=False) as watch:
        upload(tmp_path / "up", b"new", me)
        new = await collect(watch, ("up", W))
        upload(tmp_path / "up", b"replacement", me)
        (tmp_path / "done").touch()
        replaced = await collect(watch, ("done", C))
    # Envd as root chowns the new file to the user: CHMOD (as E2B's envd does).
    assert new == (
        [("up", C), ("up", CH), ("up", W)] if os.geteuid() == 0 else [("up", C), ("up", W)]
    )
    assert replaced == [("up", W), ("done", C)]  # the rename over the old file is not reported


async def test_consecutive_duplicates_merge(registry: WatcherRegistry, tmp_path: Path) -> None:
    async with registry.stream(tmp_path, recursive=False, include_entry=False) as watch:
        with (tmp_path / "f").open("wb", buffering=0) as fh:
            for _ in range(100):
                fh.write(b"x")
        (tmp_path / "done").touch()
        assert await collect(watch, ("done", C)) == [("f", C), ("f", W), ("done", C)]


def upload(target: Path, data: bytes, user: User) -> None:
    f = AtomicFile(target, user)
    f.write(data)
    f.commit()


async def test_overflow_fails_the_watch(registry: WatcherRegistry, tmp_path: Path) -> None:
    watcher_id = await registry.create(tmp_path, recursive=False, include_entry=False)
    for i in range(60):  # more than max_pending, and nobody collects them
        (tmp_path / f"f{i}").touch()
    await until(lambda: registry._polling[watcher_id].closed)
    with pytest.raises(WatchOverflow):
        registry.events(watcher_id)
    registry.remove(watcher_id)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run (and read inotify) until `condition` holds (at most 30 s: a hang)."""
    await eventually(condition, every=0.005)


async def test_polling_registry(registry: WatcherRegistry, tmp_path: Path) -> None:
    watcher_id = await registry.create(tmp_path, recursive=False, include_entry=False)
    assert registry.statistics().polling == 1
    (tmp_path / "p").touch()
    await until(lambda: bool(registry._polling[watcher_id]._pending))
    assert [(e.name, e.type) for e in registry.events(watcher_id)] == [("p", C)]
    assert registry.events(watcher_id) == []
    registry.remove(watcher_id)
    with pytest.raises(NotFound):
        registry.events(watcher_id)
    with pytest.raises(NotFound):
        registry.remove(watcher_id)


async def test_limits_and_shutdown(registry: WatcherRegistry, tmp_path: Path) -> None:
    ids = [await registry.create(tmp_path, recursive=False, include_entry=False) for _ in range(4)]
    with pytest.raises(WatchLimitReached):
        await registry.create(tmp_path, recursive=False, include_entry=False)
    with pytest.raises(WatchLimitReached):
        async with registry.stream(tmp_path, recursive=False, include_entry=False):
            pass
    await registry.aclose()
    assert registry.statistics().polling == 0
    with pytest.raises(NotFound):
        registry.events(ids[0])


async def test_closing_ends_a_stream(tmp_path: Path) -> None:
    reg = WatcherRegistry()
    async with reg.stream(tmp_path, recursive=False, include_entry=False) as watch:
        await reg.aclose()
        assert await watch.next_batch(5) is None


async def test_missing_root(registry: WatcherRegistry, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await registry.create(tmp_path / "missing", recursive=True, include_entry=False)
    assert registry.statistics().polling == 0
