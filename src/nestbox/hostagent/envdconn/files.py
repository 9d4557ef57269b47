"""Files in a capsule: whole or streamed reads and writes over envd's `GET/POST /files`, and the
`filesystem.Filesystem` RPCs (stat, list, mkdir, remove, move).

Streamed transfers use the streaming pool (no overall timeout) and move `CHUNK` (64 KiB) at a
time in both directions, so no file is ever held whole in the agent's memory. Whole-file reads
and writes and the filesystem RPCs use the unary pool (2-minute bound).
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from pyqwest import ReadError, RemoteProtocolError, WriteError

from nestbox.hostagent.envdconn.errors import TooLarge, Unavailable, from_http, from_transport
from nestbox.hostagent.envdconn.transport import OpsBase
from nestbox.protocol.gen.filesystem.filesystem_pb import (
    EntryInfo,
    FileType,
    ListDirRequest,
    MakeDirRequest,
    MoveRequest,
    RemoveRequest,
    StatRequest,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator

    from pyqwest import Client, Response

CHUNK = 64 * 1024
ERROR_BODY_LIMIT = 64 * 1024
TRANSPORT_ERRORS = (OSError, ReadError, WriteError, RemoteProtocolError)
_TYPES = {FileType.FILE: "file", FileType.DIRECTORY: "directory", FileType.SYMLINK: "symlink"}


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
        content = _split(chunks)
        headers = {**self._conn.headers(), "Content-Type": "application/octet-stream"}
        url = self._files_url(path, user)
        async with _request(self._conn.pools().stream, "POST", url, headers, content,
                           "upload") as response:  # fmt: skip
            body = await _read_limited(response, ERROR_BODY_LIMIT, "upload")
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
