"""The `filesystem.Filesystem` Connect service: stat, list, make, move, remove and watch paths.

Every call acts for one guest user (see `paths.requested_user`) and checks that user's access by
the mode bits before touching anything: read for Stat (on the parent, as `ls` needs), ListDir and
watches; write for MakeDir, Move and Remove. Blocking filesystem work runs in worker threads.
Errors reach the client as Connect codes with messages written for it, never raw exception text.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
from typing import TYPE_CHECKING, Literal

import anyio
from protobuf import Oneof

from nestbox.envd.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    connect_errors,
    os_error,
)
from nestbox.envd.filesystem.entries import entry_info, walk
from nestbox.envd.filesystem.paths import check_may_unlink, ensure_dirs, requested_user, resolve
from nestbox.envd.users import check_access, may_access
from nestbox.protocol.gen.filesystem.filesystem_connect import Filesystem
from nestbox.protocol.gen.filesystem.filesystem_pb import (
    CreateWatcherResponse,
    GetWatcherEventsResponse,
    ListDirResponse,
    MakeDirResponse,
    MoveResponse,
    RemoveResponse,
    RemoveWatcherResponse,
    StatResponse,
    WatchDirResponse,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from connectrpc.request import Headers, RequestContext

    from nestbox.envd.state import Runtime
    from nestbox.envd.users import User
    from nestbox.protocol.gen.filesystem.filesystem_pb import (
        CreateWatcherRequest,
        EntryInfo,
        FilesystemEvent,
        GetWatcherEventsRequest,
        ListDirRequest,
        MakeDirRequest,
        MoveRequest,
        RemoveRequest,
        RemoveWatcherRequest,
        StatRequest,
        WatchDirRequest,
    )

log = logging.getLogger(__name__)

KEEPALIVE_HEADER = "Keepalive-Ping-Interval"
DEFAULT_KEEPALIVE_S = 90.0  # E2B's envd default; its SDK asks for 50 s


class FilesystemService(Filesystem):
    """The generated `Filesystem` protocol, implemented."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def _target(self, headers: Headers, raw: str) -> tuple[User, Path]:
        user = await requested_user(self._rt, authorization=headers.get("authorization"))
        return user, resolve(self._rt, user, raw)

    async def stat(
        self, request: StatRequest, ctx: RequestContext[StatRequest, StatResponse]
    ) -> StatResponse:
        with connect_errors():
            user, path = await self._target(ctx.request_headers, request.path)
            return StatResponse(entry=await anyio.to_thread.run_sync(_stat, user, path))

    async def list_dir(
        self, request: ListDirRequest, ctx: RequestContext[ListDirRequest, ListDirResponse]
    ) -> ListDirResponse:
        with connect_errors():
            user, path = await self._target(ctx.request_headers, request.path)
            depth = max(request.depth, 1)
            entries = await anyio.to_thread.run_sync(_list_dir, user, path, depth)
            return ListDirResponse(entries=entries)

    async def make_dir(
        self, request: MakeDirRequest, ctx: RequestContext[MakeDirRequest, MakeDirResponse]
    ) -> MakeDirResponse:
        with connect_errors():
            user, path = await self._target(ctx.request_headers, request.path)
            return MakeDirResponse(entry=await anyio.to_thread.run_sync(_make_dir, user, path))

    async def move(
        self, request: MoveRequest, ctx: RequestContext[MoveRequest, MoveResponse]
    ) -> MoveResponse:
        with connect_errors():
            user, source = await self._target(ctx.request_headers, request.source)
            destination = resolve(self._rt, user, request.destination)
            entry = await anyio.to_thread.run_sync(_move, user, source, destination)
            return MoveResponse(entry=entry)

    async def remove(
        self, request: RemoveRequest, ctx: RequestContext[RemoveRequest, RemoveResponse]
    ) -> RemoveResponse:
        with connect_errors():
            user, path = await self._target(ctx.request_headers, request.path)
            await anyio.to_thread.run_sync(_remove, user, path)
            return RemoveResponse()

    async def watch_dir(
        self, request: WatchDirRequest, ctx: RequestContext[WatchDirRequest, WatchDirResponse]
    ) -> AsyncIterator[WatchDirResponse]:
        """A `start` event once the watch is in place, then filesystem events, with a
        keepalive after every quiet interval (`Keepalive-Ping-Interval` seconds)."""
        with connect_errors():
            user, path = await self._target(ctx.request_headers, request.path)
            await anyio.to_thread.run_sync(_check_watchable, user, path)
            interval = _keepalive_interval(ctx.request_headers.get(KEEPALIVE_HEADER))
            async with self._rt.watchers.stream(
                path, recursive=request.recursive, include_entry=request.include_entry
            ) as watch:
                yield _start_event()
                while (batch := await watch.next_batch(interval)) is not None:
                    if not batch:
                        yield _keepalive_event()
                    for event in batch:
                        yield _filesystem_event(event)

    async def create_watcher(
        self,
        request: CreateWatcherRequest,
        ctx: RequestContext[CreateWatcherRequest, CreateWatcherResponse],
    ) -> CreateWatcherResponse:
        with connect_errors():
            user, path = await self._target(ctx.request_headers, request.path)
            await anyio.to_thread.run_sync(_check_watchable, user, path)
            watcher_id = await self._rt.watchers.create(
                path, recursive=request.recursive, include_entry=request.include_entry
            )
            return CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self,
        request: GetWatcherEventsRequest,
        ctx: RequestContext[GetWatcherEventsRequest, GetWatcherEventsResponse],
    ) -> GetWatcherEventsResponse:
        with connect_errors():
            return GetWatcherEventsResponse(events=self._rt.watchers.events(request.watcher_id))

    async def remove_watcher(
        self,
        request: RemoveWatcherRequest,
        ctx: RequestContext[RemoveWatcherRequest, RemoveWatcherResponse],
    ) -> RemoveWatcherResponse:
        with connect_errors():
            self._rt.watchers.remove(request.watcher_id)
            return RemoveWatcherResponse()


def _start_event() -> WatchDirResponse:
    start: Oneof[Literal["start"], WatchDirResponse.StartEvent]
    start = Oneof("start", WatchDirResponse.StartEvent())
    return WatchDirResponse(event=start)


def _keepalive_event() -> WatchDirResponse:
    keepalive: Oneof[Literal["keepalive"], WatchDirResponse.KeepAlive]
    keepalive = Oneof("keepalive", WatchDirResponse.KeepAlive())
    return WatchDirResponse(event=keepalive)


def _filesystem_event(event: FilesystemEvent) -> WatchDirResponse:
    filesystem: Oneof[Literal["filesystem"], FilesystemEvent] = Oneof("filesystem", event)
    return WatchDirResponse(event=filesystem)


def _keepalive_interval(header: str | None) -> float:
    try:
        seconds = float(header) if header else DEFAULT_KEEPALIVE_S
    except ValueError:
        return DEFAULT_KEEPALIVE_S
    return seconds if 0 < seconds < 86_400 else DEFAULT_KEEPALIVE_S


# ---- blocking bodies, run in worker threads -------------------------------------------------


def _stat(user: User, path: Path) -> EntryInfo:
    try:
        entry = entry_info(path)
    except OSError as err:
        raise os_error(err, path) from err
    check_access(user, path.parent, write=False)
    return entry


def _list_dir(user: User, path: Path, depth: int) -> list[EntryInfo]:
    try:
        real = path.resolve(strict=True)
    except OSError as err:
        raise os_error(err, path) from err
    if not real.is_dir():
        raise InvalidArgument(f"{path} is not a directory")
    check_access(user, real, write=False)
    try:
        return walk(real, path, depth, lambda sub: may_access(user, sub, write=False))
    except OSError as err:
        raise os_error(err, path) from err


def _make_dir(user: User, path: Path) -> EntryInfo:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise os_error(err, path) from err
    else:
        if stat.S_ISDIR(st.st_mode):
            raise AlreadyExists(f"directory {path} already exists")
        raise InvalidArgument(f"{path} already exists and is not a directory")
    check_access(user, path, write=True)
    try:
        ensure_dirs(path, user)
        return entry_info(path)
    except OSError as err:
        raise os_error(err, path) from err


def _move(user: User, source: Path, destination: Path) -> EntryInfo:
    if not os.path.lexists(source):
        raise NotFound(f"{source}: no such file or directory")
    check_may_unlink(user, source)
    check_access(user, destination.parent, write=True)
    if os.path.lexists(destination):
        check_may_unlink(user, destination)
    try:
        ensure_dirs(destination.parent, user)
        try:
            os.rename(source, destination)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            _move_across_filesystems(source, destination)
        return entry_info(destination)
    except OSError as err:
        raise os_error(err, source) from err


def _move_across_filesystems(source: Path, destination: Path) -> None:
    """What rename(2) would do, where it cannot: GNU `mv -T` copies (keeping owners, modes,
    times and links) and then deletes, replacing a file or empty directory at `destination`."""
    done = subprocess.run(
        ["mv", "-T", "--", str(source), str(destination)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        log.warning("mv %s %s failed: %s", source, destination, done.stderr.strip())
        raise InvalidArgument(f"cannot move {source} to {destination} across filesystems")


def _remove(user: User, path: Path) -> None:
    if not os.path.lexists(path):
        raise NotFound(f"{path}: no such file or directory")
    check_may_unlink(user, path)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass  # removed concurrently: the caller's wish came true
    except OSError as err:
        raise os_error(err, path) from err


def _check_watchable(user: User, path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as err:
        raise os_error(err, path) from err
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{path} is not a directory")
    check_access(user, path, write=False)
