"""Directory watches on inotify (through ctypes), for WatchDir streams and polling watchers.

Each watch owns one non-blocking inotify fd, read by the event loop (`loop.add_reader`). Events
are mapped as fsnotify (which E2B's envd uses) maps them:

    IN_CREATE, IN_MOVED_TO        → CREATE        IN_MODIFY                  → WRITE
    IN_MOVED_FROM, IN_MOVE_SELF   → RENAME        IN_DELETE, IN_DELETE_SELF  → REMOVE
    IN_ATTRIB                     → CHMOD

Names are relative to the watched directory. A recursive watch adds a watch on every
subdirectory, including ones created (or moved in) later; entries already inside a directory
that appears are reported as CREATE, since they were made before its watch existed. Events on a
subdirectory itself are reported once, by its parent. Our own upload temp files are skipped, and
so is the rename of an upload over an existing file (see `atomic`): watchers see an upload as
E2B's in-place writes look, CREATE/CHMOD/WRITE for a new file and WRITE for a replaced one.

Consecutive identical events nobody has collected yet are merged (a burst of write() calls is
one WRITE). Buffers are bounded: a watch with more than `max_pending` uncollected events fails
with WatchOverflow (the client should watch again), so a slow client never grows envd's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import secrets
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from connectrpc.code import Code

from nestbox.envd.errors import EnvdError, NotFound, os_error
from nestbox.envd.filesystem.atomic import REPLACE_PREFIX, TEMP_PREFIX
from nestbox.envd.filesystem.entries import OwnerNames, entry_info
from nestbox.protocol.gen.filesystem.filesystem_pb import EventType, FilesystemEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nestbox.protocol.gen.filesystem.filesystem_pb import EntryInfo

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK
)  # fmt: skip
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_MAPPING = (  # in fsnotify's order, which E2B's envd keeps when one event has several ops
    (IN_CREATE | IN_MOVED_TO, EventType.CREATE),
    (IN_MOVED_FROM | IN_MOVE_SELF, EventType.RENAME),
    (IN_ATTRIB, EventType.CHMOD),
    (IN_MODIFY, EventType.WRITE),
    (IN_DELETE | IN_DELETE_SELF, EventType.REMOVE),
)
_READ_SIZE = 64 * 1024


class WatchLimitReached(EnvdError):
    """Too many watches: envd's own limit, or the kernel's inotify instance or watch limit."""

    code = Code.RESOURCE_EXHAUSTED
    http_status = 503
    http_code = "unavailable"


class WatchOverflow(EnvdError):
    """More events happened than the watch buffers; some were lost, so the client must re-list
    and watch again."""

    code = Code.RESOURCE_EXHAUSTED
    http_status = 503
    http_code = "unavailable"


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class DirWatch:
    """One watched directory (recursively or not) and the events nobody has collected yet.

    Lives on the event loop that called `attach()`; only `add_tree()` may run in a thread, and
    only before `attach()`.
    """

    def __init__(
        self, root: Path, *, recursive: bool, include_entry: bool, max_pending: int
    ) -> None:
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self.max_pending = max_pending
        self._dirs: dict[int, str] = {}  # watch descriptor → directory relative to root
        self._replacing: set[int] = set()  # rename cookies of uploads replacing a file
        self._pending: list[FilesystemEvent] = []
        self._names = OwnerNames()  # with include_entry: every event's owner and group names
        self._error: EnvdError | None = None
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._fd: int | None = _check(
                _libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1"
            )
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise WatchLimitReached("too many inotify instances") from err
            raise

    @property
    def closed(self) -> bool:
        return self._fd is None

    def add_tree(self) -> None:
        """Watch the root, and every directory below it when recursive. Blocking.

        :raise NotFound, InvalidArgument, WatchLimitReached: the root cannot be watched.
        """
        self._add(self.root, "", follow=True)
        if self.recursive:
            self._add_below(self.root, "", report=False)

    def attach(self) -> None:
        """Start delivering events on the running loop."""
        assert self._fd is not None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        """Stop watching; waiters wake up and see the watch closed. Idempotent."""
        if self._fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None
        self._wakeup.set()

    def take(self) -> list[FilesystemEvent]:
        """Every event collected so far, oldest first.

        :raise WatchOverflow, EnvdError: the watch failed; it is closed.
        """
        if self._error is not None:
            raise self._error
        events, self._pending = self._pending, []
        if not self.closed:
            self._wakeup.clear()
        return events

    async def next_batch(self, wait: float) -> list[FilesystemEvent] | None:
        """Wait up to `wait` seconds for events: [] if none came, None once closed.

        :raise WatchOverflow, EnvdError: the watch failed.
        """
        if not self._pending and self._error is None and not self.closed:
            with anyio.move_on_after(wait):
                await self._wakeup.wait()
        if self.closed and not self._pending and self._error is None:
            return None
        return self.take()

    # ---- inotify plumbing -------------------------------------------------------------------

    def _add(self, path: Path, rel: str, *, follow: bool = False) -> bool:
        """Watch one directory; False when it vanished or is not a directory any more."""
        assert self._fd is not None
        mask = WATCH_MASK if follow else WATCH_MASK | IN_DONT_FOLLOW
        try:
            wd = _check(_libc().inotify_add_watch(self._fd, os.fsencode(path), mask), "watch")
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise WatchLimitReached("the kernel's inotify watch limit is reached") from err
            if follow:  # the root: the caller checked it, so this is a race or a bad path
                raise os_error(err, path) from err
            return False
        self._dirs[wd] = rel
        return True

    def _add_below(self, directory: Path, rel: str, *, report: bool) -> None:
        """Watch every directory under `directory`; with `report`, emit CREATE for each entry
        found (they appeared before the watch could see them)."""
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        for child in children:
            child_rel = f"{rel}/{child.name}" if rel else child.name
            if report and not child.name.startswith(TEMP_PREFIX):
                self._emit(child_rel, EventType.CREATE)
            try:
                is_dir = child.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and self._add(Path(child.path), child_rel):
                self._add_below(Path(child.path), child_rel, report=report)

    def _on_readable(self) -> None:
        try:
            while self._fd is not None:
                try:
                    data = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    return
                self._dispatch(data)
                if len(self._pending) > self.max_pending:
                    self._fail(WatchOverflow(f"more than {self.max_pending} unread events"))
        except WatchLimitReached as err:
            self._fail(err)
        except Exception:
            log.exception("watch on %s failed", self.root)
            self._fail(EnvdError("the directory watch failed"))

    def _fail(self, error: EnvdError) -> None:
        self._error = error
        self._pending = []
        self.close()

    def _dispatch(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                self._fail(WatchOverflow("the kernel's inotify queue overflowed"))
                return
            self._handle(wd, mask, cookie, os.fsdecode(raw.rstrip(b"\0")))

    def _handle(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN_IGNORED:  # the watched directory is gone (or we removed the watch)
            self._dirs.pop(wd, None)
            return
        base = self._dirs.get(wd)
        if base is None:
            return
        if name.startswith(TEMP_PREFIX):
            if name.startswith(REPLACE_PREFIX) and mask & IN_MOVED_FROM:
                self._replacing.add(cookie)
            return
        if mask & IN_MOVED_TO and cookie in self._replacing:
            self._replacing.discard(cookie)  # an upload replacing a file: not a new file
            return
        if not name and base:  # a subdirectory's own event: its parent reports it too
            return
        rel = f"{base}/{name}" if base and name else (name or ".")
        for bits, kind in _MAPPING:
            if mask & bits:
                self._emit(rel, kind)
        if self.recursive and mask & IN_ISDIR and name:
            if mask & (IN_CREATE | IN_MOVED_TO):
                path = self.root / rel
                if self._add(path, rel):
                    self._add_below(path, rel, report=True)
            elif mask & IN_MOVED_FROM:
                self._forget(rel)

    def _forget(self, rel: str) -> None:
        """Drop the watches under a directory that moved away (it may come back as MOVED_TO)."""
        assert self._fd is not None
        prefix = rel + "/"
        for wd, path in list(self._dirs.items()):
            if path == rel or path.startswith(prefix):
                del self._dirs[wd]
                _libc().inotify_rm_watch(self._fd, wd)

    def _emit(self, rel: str, kind: EventType) -> None:
        last = self._pending[-1] if self._pending else None
        if last is not None and last.name == rel and last.type == kind and not self.include_entry:
            return  # one write() burst is one WRITE; keeps a busy writer from flooding us
        entry: EntryInfo | None = None
        if self.include_entry and kind not in (EventType.REMOVE, EventType.RENAME):
            with contextlib.suppress(OSError):
                entry = entry_info(self.root / rel, self._names)
        self._pending.append(FilesystemEvent(name=rel, type=kind, entry=entry))
        self._wakeup.set()


@dataclass(frozen=True, slots=True)
class WatcherStatistics:
    streams: int
    polling: int


class WatcherRegistry:
    """Every live watch: streaming ones (owned by their WatchDir call) and polling ones (owned
    here, by id, until RemoveWatcher or shutdown). All methods run on the event loop."""

    def __init__(self, *, max_watches: int = 256, max_pending: int = 10_000) -> None:
        self.max_watches = max_watches
        self.max_pending = max_pending
        self._streams: set[DirWatch] = set()
        self._polling: dict[str, DirWatch] = {}

    def statistics(self) -> WatcherStatistics:
        return WatcherStatistics(streams=len(self._streams), polling=len(self._polling))

    async def _open(self, root: Path, *, recursive: bool, include_entry: bool) -> DirWatch:
        if len(self._streams) + len(self._polling) >= self.max_watches:
            raise WatchLimitReached(f"at most {self.max_watches} directory watches")
        watch = DirWatch(
            root, recursive=recursive, include_entry=include_entry, max_pending=self.max_pending
        )
        try:
            await anyio.to_thread.run_sync(watch.add_tree)
            watch.attach()
        except BaseException:
            watch.close()
            raise
        return watch

    @asynccontextmanager
    async def stream(
        self, root: Path, *, recursive: bool, include_entry: bool
    ) -> AsyncIterator[DirWatch]:
        """A watch that lasts as long as the block (one WatchDir call)."""
        watch = await self._open(root, recursive=recursive, include_entry=include_entry)
        self._streams.add(watch)
        try:
            yield watch
        finally:
            self._streams.discard(watch)
            watch.close()

    async def create(self, root: Path, *, recursive: bool, include_entry: bool) -> str:
        """A polling watch; its events are collected with `events(id)`."""
        watch = await self._open(root, recursive=recursive, include_entry=include_entry)
        watcher_id = "w" + secrets.token_hex(8)
        self._polling[watcher_id] = watch
        return watcher_id

    def events(self, watcher_id: str) -> list[FilesystemEvent]:
        """:raise NotFound: no such watcher. :raise WatchOverflow: it overflowed."""
        return self._get(watcher_id).take()

    def remove(self, watcher_id: str) -> None:
        """:raise NotFound: no such watcher."""
        self._get(watcher_id).close()
        del self._polling[watcher_id]

    def _get(self, watcher_id: str) -> DirWatch:
        try:
            return self._polling[watcher_id]
        except KeyError:
            raise NotFound(f"watcher {watcher_id!r} not found") from None

    async def aclose(self) -> None:
        """Close every watch; open WatchDir streams end."""
        for watch in [*self._streams, *self._polling.values()]:
            watch.close()
        self._polling.clear()
