"""The filesystem service called in-process: error codes, users, watches and keepalives."""

from __future__ import annotations

import base64
import os
import pwd
from typing import TYPE_CHECKING, Any, cast

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import Headers, RequestContext

from nestbox.envd.filesystem.service import FilesystemService, _keepalive_interval
from nestbox.envd.filesystem.watch import WatcherRegistry
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import Runtime
from nestbox.protocol.gen.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    EventType,
    FilesystemEvent,
    FileType,
    GetWatcherEventsRequest,
    ListDirRequest,
    MakeDirRequest,
    MoveRequest,
    RemoveRequest,
    RemoveWatcherRequest,
    StatRequest,
    WatchDirRequest,
)
from tests.conftest import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable
    from pathlib import Path

    from nestbox.protocol.gen.filesystem.filesystem_connect import Filesystem

ME = pwd.getpwuid(os.geteuid()).pw_name


def ctx(headers: dict[str, str] | None = None) -> Any:
    method = MethodInfo(name="Test", service_name="filesystem.Filesystem", input=object,
                        output=object, idempotency_level=IdempotencyLevel.UNKNOWN,
                        stream_type=StreamType.UNARY)  # fmt: skip
    return RequestContext(method=method, http_method="POST", request_headers=Headers(headers or {}))


def as_user(name: str) -> Any:
    return ctx({"Authorization": "Basic " + base64.b64encode(f"{name}:".encode()).decode()})


@pytest.fixture
async def service() -> AsyncIterator[FilesystemService]:
    none = cast(Any, None)
    rt = Runtime(settings=EnvdSettings(), in_vm=False, processes=none,
                 watchers=WatcherRegistry(), tracker=none, ports=none)  # fmt: skip
    rt.defaults.user = ME
    yield FilesystemService(rt)
    await rt.watchers.aclose()


async def code_of(call: Awaitable[object]) -> Code:
    with pytest.raises(ConnectError) as info:
        await call
    return info.value.code


def test_implements_the_generated_protocol() -> None:
    none = cast(Any, None)
    rt = Runtime(settings=EnvdSettings(), in_vm=False, processes=none, watchers=none,
                 tracker=none, ports=none)  # fmt: skip
    service: Filesystem = FilesystemService(rt)  # mypy checks the signatures
    assert service is not None


async def test_error_codes(service: FilesystemService, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    cases: list[tuple[Awaitable[object], Code]] = [
        (service.stat(StatRequest(path=str(tmp_path / "nope")), ctx()), Code.NOT_FOUND),
        (service.stat(StatRequest(path="a\x00b"), ctx()), Code.INVALID_ARGUMENT),
        (service.list_dir(ListDirRequest(path=str(tmp_path / "nope")), ctx()), Code.NOT_FOUND),
        (service.list_dir(ListDirRequest(path=str(tmp_path / "file")), ctx()),
         Code.INVALID_ARGUMENT),
        (service.make_dir(MakeDirRequest(path=str(tmp_path / "dir")), ctx()),
         Code.ALREADY_EXISTS),
        (service.make_dir(MakeDirRequest(path=str(tmp_path / "file")), ctx()),
         Code.INVALID_ARGUMENT),
        (service.make_dir(MakeDirRequest(path=str(tmp_path / "file" / "sub")), ctx()),
         Code.INVALID_ARGUMENT),
        (service.remove(RemoveRequest(path=str(tmp_path / "nope")), ctx()), Code.NOT_FOUND),
        (service.move(MoveRequest(source=str(tmp_path / "dir"),
                                  destination=str(tmp_path / "dir" / "inside")), ctx()),
         Code.INVALID_ARGUMENT),
        (service.stat(StatRequest(path="/"), as_user("no-such-user-xyz")), Code.UNAUTHENTICATED),
        (service.get_watcher_events(GetWatcherEventsRequest(watcher_id="w0"), ctx()),
         Code.NOT_FOUND),
        (service.remove_watcher(RemoveWatcherRequest(watcher_id="w0"), ctx()), Code.NOT_FOUND),
        (service.create_watcher(CreateWatcherRequest(path=str(tmp_path / "file")), ctx()),
         Code.INVALID_ARGUMENT),
    ]  # fmt: skip
    for call, code in cases:
        assert await code_of(call) == code


async def test_tilde_and_relative_paths_use_the_users_home(service: FilesystemService) -> None:
    home = pwd.getpwnam(ME).pw_dir
    for path in ("~", "", "."):
        entry = (await service.stat(StatRequest(path=path), ctx())).entry
        assert entry is not None
        assert (entry.path, entry.type) == (home, FileType.DIRECTORY)


async def test_remove_symlink_removes_the_link_only(
    service: FilesystemService, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").touch()
    (tmp_path / "ln").symlink_to(tmp_path / "d")
    await service.remove(RemoveRequest(path=str(tmp_path / "ln")), ctx())
    assert (tmp_path / "d" / "keep").exists()
    assert not (tmp_path / "ln").exists()


async def test_move_overwrites_a_file(service: FilesystemService, tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    request = MoveRequest(source=str(tmp_path / "a"), destination=str(tmp_path / "b"))
    entry = (await service.move(request, ctx())).entry
    assert entry is not None
    assert (entry.name, entry.size) == ("b", 1)
    assert (tmp_path / "b").read_text() == "a"


async def test_watch_dir_starts_then_keeps_alive(
    service: FilesystemService, tmp_path: Path
) -> None:
    stream = service.watch_dir(WatchDirRequest(path=str(tmp_path)),
                               ctx({"Keepalive-Ping-Interval": "0.05"}))  # fmt: skip
    first = await anext(stream)
    assert first.event is not None
    assert first.event.field == "start"
    second = await anext(stream)  # nothing happened: a keepalive
    assert second.event is not None
    assert second.event.field == "keepalive"
    (tmp_path / "x").touch()
    third = await anext(stream)
    assert third.event is not None
    assert third.event.field == "filesystem"
    assert isinstance(third.event.value, FilesystemEvent)
    assert (third.event.value.name, third.event.value.type) == ("x", EventType.CREATE)
    await stream.aclose()  # type: ignore[attr-defined]  # an async generator
    assert service._rt.watchers.statistics().streams == 0


async def test_polling_watcher_lifecycle(service: FilesystemService, tmp_path: Path) -> None:
    created = await service.create_watcher(CreateWatcherRequest(path=str(tmp_path)), ctx())
    (tmp_path / "x").touch()
    events: list[tuple[str, EventType]] = []

    async def got_some() -> bool:  # the loop reads inotify between the polls
        got = await service.get_watcher_events(
            GetWatcherEventsRequest(watcher_id=created.watcher_id), ctx()
        )
        events.extend((e.name, e.type) for e in got.events)
        return bool(events)

    await eventually(got_some, every=0.005, what="the watcher's event")
    assert events == [("x", EventType.CREATE)]
    await service.remove_watcher(RemoveWatcherRequest(watcher_id=created.watcher_id), ctx())


@pytest.mark.parametrize(
    ("header", "seconds"), [(None, 90.0), ("50", 50.0), ("0.5", 0.5), ("-1", 90.0), ("x", 90.0)]
)
def test_keepalive_interval(header: str | None, seconds: float) -> None:
    assert _keepalive_interval(header) == seconds


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
async def test_acting_as_nobody(service: FilesystemService, tmp_path: Path) -> None:
    (tmp_path / ".").chmod(0o755)
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "private" / "f").touch()
    nobody = as_user("nobody")
    listing = service.list_dir(ListDirRequest(path=str(tmp_path / "private")), nobody)
    assert await code_of(listing) == Code.PERMISSION_DENIED
    stat_inside = service.stat(StatRequest(path=str(tmp_path / "private" / "f")), nobody)
    assert await code_of(stat_inside) == Code.PERMISSION_DENIED
    # A recursive listing skips what nobody may not read.
    entries = (await service.list_dir(ListDirRequest(path=str(tmp_path), depth=3), nobody)).entries
    assert [e.name for e in entries] == ["private"]
