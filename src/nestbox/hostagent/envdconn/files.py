"""Files in a capsule: whole or streamed reads and writes over envd's `GET/POST /files`, and the
`filesystem.Filesystem` RPCs (stat, list, mkdir, remove, move).

Streamed transfers use the streaming pool (no overall timeout) and move `CHUNK` (1 MiB) at a
time in both directions, so no file is ever held whole in the agent's memory, and a transfer
is few messages (each costs about the same on every hop whatever its size). Whole-file reads
and writes and the filesystem RPCs use the unary pool (2-minute bound).
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import anyio
from connectrpc.errors import ConnectError
from protobuf import Oneof
from pyqwest import ReadError, RemoteProtocolError, WriteError

from nestbox.hostagent.envdconn.errors import (
    DeadlineExceeded,
    TooLarge,
    Unavailable,
    from_connect,
    from_http,
    from_transport,
)
from nestbox.hostagent.envdconn.events import aclose_quietly
from nestbox.hostagent.envdconn.transport import OpsBase
from nestbox.protocol.gen.filesystem.filesystem_pb import (
    EntryInfo,
    EventType,
    FilesystemEvent,
    FileType,
    ListDirRequest,
    MakeDirRequest,
    MoveRequest,
    RemoveRequest,
    StatRequest,
    WatchDirRequest,
    WatchDirResponse,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator

    from pyqwest import Client, Response

CHUNK = 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024
TRANSPORT_ERRORS = (OSError, ReadError, WriteError, RemoteProtocolError)
KEEPALIVE_HEADER = "Keepalive-Ping-Interval"
WATCH_KEEPALIVE_S = 15
_TYPES = {FileType.FILE: "file", FileType.DIRECTORY: "directory", FileType.SYMLINK: "symlink"}
_EVENTS = {
    EventType.CREATE: "create", EventType.WRITE: "write", EventType.REMOVE: "remove",
    EventType.RENAME: "rename", EventType.CHMOD: "chmod",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a directory watch: `start` (the watch is set; `name` empty), then
    `create`, `write`, `remove`, `rename` or `chmod` of `name` (relative to the directory), and
    `keepalive` after every `WATCH_KEEPALIVE_S` of quiet (so relays can keep their clients'
    connections alive without timers of their own)."""

    type: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file system entry, in Wrenn's `FileEntry` shape."""

    name: str
    path: str
    type: str
    """`file`, `directory`, `symlink` or `unknown`."""
    size: int
    mode: int
    permissions: str
    """As `ls -l` shows them, e.g. `-rwxr-xr-x`."""
    owner: str
    group: str
    modified_at: int
    """Unix seconds."""
    symlink_target: str | None = None


class FileOps(OpsBase):
    """The file half of `CapsuleEnvd`."""

    async def read_file_stream(self, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
        """The file's bytes in `CHUNK`-sized pieces (the last may be shorter).

        :raise NotFound: no such file. :raise InvalidRequest: not a regular file.
        :raise Unavailable: the transfer broke.
        """
        async with _request(self._conn.pools().stream, "GET", self._files_url(path, user),
                           self._conn.headers(), None, "download") as response:  # fmt: skip
            try:
                async for chunk in _rechunk(response.content):
                    yield chunk
            except TRANSPORT_ERRORS as err:
                raise from_transport(err, "download") from err

    async def write_file_stream(
        self, path: str, chunks: AsyncIterable[bytes], *, user: str | None = None
    ) -> str:
        """Write `chunks` to `path` (parents are created; an existing file is replaced once the
        upload is complete). Returns the path envd wrote.

        :raise Forbidden, NotEnoughSpace, InvalidRequest, Unavailable:
        """
        sent = anyio.Event()
        content = _then_set(_split(chunks), sent)
        headers = {**self._conn.headers(), "Content-Type": "application/octet-stream"}
        url = self._files_url(path, user)
        with anyio.CancelScope() as deadline:
            async with anyio.create_task_group() as tg:
                # A slow upload may take minutes; only the wait for the answer once the body
                # is all sent is bounded (by the response-head timeout, as for other calls).
                tg.start_soon(_cancel_after, sent, self._conn.pool.response_header_timeout_s,
                              deadline)  # fmt: skip
                async with _request(self._conn.pools().upload, "POST", url, headers, content,
                                   "upload") as response:  # fmt: skip
                    body = await _read_limited(response, ERROR_BODY_LIMIT, "upload")
                tg.cancel_scope.cancel()
        if deadline.cancelled_caught:
            raise DeadlineExceeded("envd upload: no answer after the body was sent")
        return _written_path(body, path)

    async def write_file(self, path: str, data: bytes, *, user: str | None = None) -> str:
        """Write `data` to `path` in one request. Returns the path envd wrote."""
        headers = {**self._conn.headers(), "Content-Type": "application/octet-stream"}
        url = self._files_url(path, user)
        async with _request(self._conn.pools().unary, "POST", url, headers, data,
                           "upload") as response:  # fmt: skip
            body = await _read_limited(response, ERROR_BODY_LIMIT, "upload")
        return _written_path(body, path)

    async def read_file(
        self, path: str, *, user: str | None = None, max_bytes: int | None = None
    ) -> bytes:
        """The whole file. :raise TooLarge: it has more than `max_bytes` bytes."""
        async with _request(self._conn.pools().unary, "GET", self._files_url(path, user),
                           self._conn.headers(), None, "download") as response:  # fmt: skip
            return await _read_limited(response, max_bytes, "download")

    async def stat(self, path: str, *, user: str | None = None) -> FileEntry:
        response = await self._unary(
            self._conn.pools().filesystem.stat, StatRequest(path=path), user=user
        )
        return _entry(response.entry)

    async def list_dir(
        self, path: str, depth: int = 1, *, user: str | None = None
    ) -> list[FileEntry]:
        """Entries under `path`, `depth` levels down (1: the directory's own entries)."""
        request = ListDirRequest(path=path, depth=depth)
        response = await self._unary(self._conn.pools().filesystem.list_dir, request, user=user)
        return [_entry(e) for e in response.entries]

    async def make_dir(self, path: str, *, user: str | None = None) -> FileEntry:
        """Create `path` and its parents. :raise Conflict: it exists already."""
        request = MakeDirRequest(path=path)
        response = await self._unary(self._conn.pools().filesystem.make_dir, request, user=user)
        return _entry(response.entry)

    async def remove(self, path: str, *, user: str | None = None) -> None:
        """Remove a file, or a directory with everything in it."""
        request = RemoveRequest(path=path)
        await self._unary(self._conn.pools().filesystem.remove, request, user=user)

    async def move(self, source: str, destination: str, *, user: str | None = None) -> FileEntry:
        request = MoveRequest(source=source, destination=destination)
        response = await self._unary(self._conn.pools().filesystem.move, request, user=user)
        return _entry(response.entry)

    async def watch_dir(
        self, path: str, *, recursive: bool = False, user: str | None = None
    ) -> AsyncIterator[WatchEvent]:
        """The events under `path` (envd's inotify watch) until the caller stops iterating:
        `start` first, once the watch is set. :raise EnvdCallError: (e.g. `NotFound`)"""
        headers = {**self._conn.headers(user), KEEPALIVE_HEADER: str(WATCH_KEEPALIVE_S)}
        responses = self._conn.pools().filesystem_stream.watch_dir(
            WatchDirRequest(path=path, recursive=recursive), headers=headers
        )
        try:
            async for response in responses:
                event = _watch_event(response)
                if event is not None:
                    yield event
        except ConnectError as err:
            raise from_connect(err) from err
        finally:
            await aclose_quietly(responses)

    def _files_url(self, path: str, user: str | None) -> str:
        query = {"path": path, **({"username": user} if user else {})}
        return self._conn.url("/files?" + urlencode(query))


@asynccontextmanager
async def _request(
    client: Client,
    method: str,
    url: str,
    headers: dict[str, str],
    content: bytes | AsyncIterator[bytes] | None,
    what: str,
) -> AsyncIterator[Response]:
    """Send a request and check its status; a non-2xx answer raises its `EnvdCallError`."""
    async with AsyncExitStack() as stack:
        try:
            cm = client.stream(method, url, headers=headers, content=content)
            response = await stack.enter_async_context(cm)
        except TRANSPORT_ERRORS as err:
            raise from_transport(err, what) from err
        if response.status >= 300:
            body = await _read_limited(response, ERROR_BODY_LIMIT, what, cut=True)
            raise from_http(response.status, body, what)
        yield response


async def _then_set(chunks: AsyncIterable[bytes], done: anyio.Event) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk
    done.set()


async def _cancel_after(event: anyio.Event, seconds: float, scope: anyio.CancelScope) -> None:
    await event.wait()
    await anyio.sleep(seconds)
    scope.cancel()


async def _read_limited(
    response: Response, limit: int | None, what: str, *, cut: bool = False
) -> bytes:
    """The body, up to `limit` bytes. :raise TooLarge: more than that (unless `cut`)."""
    data = bytearray()
    try:
        async for piece in response.content:
            data += piece
            if limit is not None and len(data) > limit:
                if cut:
                    return bytes(data[:limit])
                raise TooLarge(f"the file has more than {limit} bytes")
    except TRANSPORT_ERRORS as err:
        raise from_transport(err, what) from err
    return bytes(data)


async def _rechunk(pieces: AsyncIterator[bytes | bytearray | memoryview]) -> AsyncIterator[bytes]:
    buffer = bytearray()
    async for piece in pieces:
        buffer += piece
        while len(buffer) >= CHUNK:
            yield bytes(buffer[:CHUNK])
            del buffer[:CHUNK]
    if buffer:
        yield bytes(buffer)


async def _split(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The caller's chunks, none larger than `CHUNK`."""
    async for chunk in chunks:
        if len(chunk) <= CHUNK:
            yield chunk
            continue
        view = memoryview(chunk)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])


def _written_path(body: bytes, fallback: str) -> str:
    try:
        written = json.loads(body)
        return str(written[0]["path"])
    except (ValueError, LookupError, TypeError):
        return fallback


def _entry(info: EntryInfo | None) -> FileEntry:
    if info is None:
        raise Unavailable("envd answered without the entry")
    modified = info.modified_time
    return FileEntry(
        name=info.name,
        path=info.path,
        type=_TYPES.get(info.type, "unknown"),
        size=info.size,
        mode=info.mode,
        permissions=info.permissions,
        owner=info.owner,
        group=info.group,
        modified_at=modified.seconds if modified is not None else 0,
        symlink_target=info.symlink_target if info.has_field("symlink_target") else None,
    )


def _watch_event(response: WatchDirResponse) -> WatchEvent | None:
    """The event of one WatchDir message; None for keepalives."""
    match response.event:
        case Oneof("start", _):
            return WatchEvent("start")
        case Oneof("filesystem", FilesystemEvent() as fs):
            return WatchEvent(_EVENTS.get(fs.type, "unknown") if fs.type else "unknown", fs.name)
        case Oneof("keepalive", _):
            return WatchEvent("keepalive")
    return None
