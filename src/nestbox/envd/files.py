"""`GET /files` (download) and `POST /files` (upload), streamed both ways.

Neither direction holds a file in memory: downloads are sent by the kernel (sendfile(2), under
envd's server: `rawbody.SendFile`) or else read `CHUNK` (1 MiB) at a time in a worker thread;
uploads (multipart/form-data parts named `file`, or a raw `application/octet-stream`
body, optionally `Content-Encoding: gzip`) are decoded and written as they arrive, up to `CHUNK`
per worker-thread hop, to a hidden temporary file that is renamed over the target only when
complete (see `filesystem.atomic`). Under envd's server a bulk body comes straight off the
connection (`rawbody`: no copy in Python); elsewhere (in-process tests) from the ASGI messages.
Errors answer `{"error": {"code", "message"}}` with E2B's statuses: 400 bad request or not a
regular file, 401 unknown user, 403 not allowed, 404 missing, 507 disk full.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import urllib.parse
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from nestbox.common.batches import batches
from nestbox.envd.errors import EnvdError, InvalidArgument, os_error
from nestbox.envd.filesystem.atomic import AtomicFile
from nestbox.envd.filesystem.paths import ensure_dirs, requested_user, resolve
from nestbox.envd.rawbody import EXTENSION as RAW_BODY
from nestbox.envd.rawbody import SENDFILE, RawBody, SendFile
from nestbox.envd.users import check_access
from nestbox.protocol.envd import FileEntryView
from nestbox.protocol.errors import ErrorBody, ErrorCode

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

    from starlette.requests import Request
    from starlette.types import Receive, Scope, Send

    from nestbox.envd.state import Runtime
    from nestbox.envd.users import User

log = logging.getLogger(__name__)

Chunk: TypeAlias = bytes | memoryview
"""Body bytes: a memoryview when they come straight off the connection (`rawbody`)."""

CHUNK = 1024 * 1024
"""Bytes per worker-thread hop, both ways (a download's `pread`, an upload's gathered chunks).
Each hop and each body message costs the same whatever its size: with 64 KiB a download cost
envd 5-10x the CPU it does with 1 MiB (`make bench-files`); memory stays about one CHUNK each."""
GZIP_PIECE = 1024 * 1024  # the most one gzip step may inflate to, against decompression bombs
DRAIN_LIMIT = 64 * 1024 * 1024
"""After a failed upload, read (and drop) up to this much of the rest of the body, so that
clients that send the whole body before reading the answer (httpx, Go) see our error instead
of a reset connection."""


def error_response(err: EnvdError) -> JSONResponse:
    body = ErrorBody.of(ErrorCode(err.http_code), err.message)
    return JSONResponse(body.model_dump(mode="json"), status_code=err.http_status)


async def _user(request: Request) -> tuple[Runtime, User]:
    runtime: Runtime = request.app.state.runtime
    user = await requested_user(
        runtime,
        authorization=request.headers.get("authorization"),
        username=request.query_params.get("username"),
    )
    return runtime, user


# ---- download -------------------------------------------------------------------------------


async def download(request: Request) -> Response:
    """`GET /files?path=&username=`: the file's bytes."""
    try:
        runtime, user = await _user(request)
        path = resolve(runtime, user, request.query_params.get("path", ""))
        fd, size = await anyio.to_thread.run_sync(_open_regular, user, path)
    except EnvdError as err:
        return error_response(err)
    except OSError as err:
        return error_response(os_error(err, "download"))
    headers = {"Content-Length": str(size), "Content-Disposition": _attachment(path.name)}
    sendfile = request.scope.get("extensions", {}).get(SENDFILE)
    if sendfile is not None:
        return _SentFile(fd, size, sendfile["send"], headers)
    return StreamingResponse(
        _read_chunks(fd, size), media_type="application/octet-stream", headers=headers
    )


class _SentFile(Response):
    """The first `size` bytes of `fd` (closed once sent), sent by the kernel."""

    media_type = "application/octet-stream"

    def __init__(self, fd: int, size: int, send_file: SendFile, headers: dict[str, str]) -> None:
        super().__init__(headers=headers)
        self._fd, self._size, self._send_file = fd, size, send_file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})  # fmt: skip
            await self._send_file(self._fd, 0, self._size)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientDisconnect:
            return  # the connection is closed; nobody is listening
        finally:
            os.close(self._fd)


def _open_regular(user: User, path: Path) -> tuple[int, int]:
    """An fd on the regular file at `path` (missing: 404 before any permission question)."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang the thread; it is refused below anyway.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise os_error(err, path) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InvalidArgument(f"{path} is {what}")
        check_access(user, path, write=False)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


async def _read_chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """The first `size` bytes (the advertised Content-Length). A file that shrinks meanwhile
    ends the body early, which the HTTP layer reports to the client as a broken response."""
    try:
        offset = 0
        while offset < size:
            chunk = await anyio.to_thread.run_sync(os.pread, fd, min(CHUNK, size - offset), offset)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


def _attachment(name: str) -> str:
    quoted = urllib.parse.quote(name)
    if quoted != name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'


# ---- upload ---------------------------------------------------------------------------------


async def upload(request: Request) -> Response:
    """`POST /files?path=&username=`: write one or more files, answer `[{name, type, path}]`."""
    body = _body(request)
    sink: _Sink | None = None
    done = False
    try:
        runtime, user = await _user(request)
        sink = _sink_for(request, runtime, user)
        decoder = _Decoder(request.headers.get("content-encoding", ""))
        if isinstance(body, RawBody) and isinstance(sink, _RawSink) and decoder.identity:
            await sink.take(body)  # the kernel moves the bytes (`splice`)
        else:
            await _pump(body, sink, decoder)
        done = True
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening any more
    except EnvdError as err:
        error = err
    except OSError as err:
        error = os_error(err, "upload")
    except Exception:
        log.exception("upload failed")
        error = EnvdError("upload failed")
    finally:
        if not done and sink is not None:  # also on cancellation: drop the temporary file
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sink.abort)
    if not done:
        await _drain(body)
        return error_response(error)
    assert sink is not None
    views = [FileEntryView(name=p.name, type="file", path=str(p)) for p in sink.written]
    return JSONResponse([v.model_dump() for v in views])


def _body(request: Request) -> AsyncIterator[Sequence[Chunk]]:
    """The request body in batches of about `CHUNK` bytes, gathered without copying: each batch
    is handed to one worker-thread hop."""
    raw = request.scope.get("extensions", {}).get(RAW_BODY)
    if raw is not None:
        body: AsyncIterator[Sequence[Chunk]] = raw["body"]
        return body
    return batches(request.stream(), CHUNK)


async def _pump(body: AsyncIterator[Sequence[Chunk]], sink: _Sink, decoder: _Decoder) -> None:
    """Feed the body through the decoder into the sink."""

    def feed(chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            for piece in decoder.feed(chunk):
                sink.write(piece)

    def finish() -> None:
        for piece in decoder.finish():
            sink.write(piece)
        sink.finish()

    async for batch in body:
        await anyio.to_thread.run_sync(feed, batch)
    await anyio.to_thread.run_sync(finish)


async def _drain(body: AsyncIterator[Sequence[Chunk]]) -> None:
    seen = 0
    try:
        async for batch in body:
            seen += sum(len(chunk) for chunk in batch)
            if seen > DRAIN_LIMIT:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or the stream already ended
        return


class _Decoder:
    """`Content-Encoding` of the request body: identity or gzip, decoded incrementally."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip"):
            raise InvalidArgument(f"unsupported Content-Encoding {encoding!r}")
        self._gzip = encoding in ("gzip", "x-gzip")
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in_member = False  # inside a gzip member whose end we have not seen

    @property
    def identity(self) -> bool:
        """Bytes pass as they are (they may go to the file without Python: `splice`)."""
        return not self._gzip

    def feed(self, data: Chunk) -> Iterator[Chunk]:
        if not self._gzip:
            yield data
            return
        try:
            more = bool(data)
            while more:
                self._in_member = True
                piece = self._inflate.decompress(data, GZIP_PIECE)
                if piece:
                    yield piece
                if self._inflate.eof:  # another member may follow (`cat a.gz b.gz`)
                    data = self._inflate.unused_data
                    self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._in_member = False
                    more = bool(data)
                else:
                    data = self._inflate.unconsumed_tail
                    # A full piece may leave output pending even with all input consumed.
                    more = bool(data) or len(piece) == GZIP_PIECE
        except zlib.error:
            raise InvalidArgument("the request body is not valid gzip") from None

    def finish(self) -> Iterator[bytes]:
        if self._in_member:
            raise InvalidArgument("the gzip request body is truncated")
        return iter(())


class _Sink(Protocol):
    """Where decoded body bytes go (blocking calls, made in a worker thread)."""

    written: list[Path]
    """The files committed so far, as the client named them."""

    def write(self, data: Chunk) -> None: ...

    def finish(self) -> None:
        """The body ended: commit, or raise if it was incomplete."""

    def abort(self) -> None:
        """Drop what is not committed; never raises."""


def _sink_for(request: Request, runtime: Runtime, user: User) -> _Sink:
    raw_path = request.query_params.get("path") or None
    ctype, params = parse_options_header(request.headers.get("content-type"))

    def open_target(raw: str) -> AtomicFile:
        return _open_target(resolve(runtime, user, raw), user)

    if ctype == b"application/octet-stream":
        if raw_path is None:
            raise InvalidArgument("the path query parameter is required for a raw upload")
        return _RawSink(lambda: open_target(raw_path))
    if ctype.startswith(b"multipart/"):
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidArgument("multipart body without a boundary")
        return _MultipartSink(boundary, raw_path, open_target)
    raise InvalidArgument(
        "unsupported Content-Type: expected multipart/form-data or application/octet-stream"
    )


def _open_target(requested: Path, user: User) -> AtomicFile:
    """Check the user may write `requested`, create its parents, start its temporary file.
    A symlink is written through, as `open(2)` would: its target is replaced."""
    target = Path(os.path.realpath(requested)) if os.path.islink(requested) else requested
    check_access(user, target, write=True)
    if os.path.isdir(target):
        raise InvalidArgument(f"{requested} is a directory")
    try:
        ensure_dirs(target.parent, user)
        return AtomicFile(target, user, requested=requested)
    except OSError as err:
        raise os_error(err, requested) from err


class _RawSink:
    """An `application/octet-stream` body: the whole body is the file."""

    def __init__(self, open_file: Callable[[], AtomicFile]) -> None:
        self.written: list[Path] = []
        self._open = open_file
        self._file: AtomicFile | None = None

    def write(self, data: Chunk) -> None:
        if self._file is None:
            self._file = self._open()
        _write(self._file, data)

    async def take(self, body: RawBody) -> None:
        """The whole body into the file by the kernel, then `finish`."""
        self._file = await anyio.to_thread.run_sync(self._open)
        try:
            self._file.grew(await body.write_to(self._file.fileno()))
        except OSError as err:
            raise os_error(err, self._file.requested) from err
        await anyio.to_thread.run_sync(self.finish)

    def finish(self) -> None:
        if self._file is None:  # an empty body is an empty file
            self._file = self._open()
        _commit(self._file)
        self.written.append(self._file.requested)
        self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()


class _MultipartSink:
    """A multipart/form-data body, parsed as it streams. Each part named `file` becomes one
    file: at `path` when the query names one, else at the part's filename (E2B's `write_files`
    puts each file's path there). Other parts are skipped."""

    def __init__(
        self, boundary: bytes, raw_path: str | None, open_target: Callable[[str], AtomicFile]
    ) -> None:
        self.written: list[Path] = []
        self._raw_path = raw_path
        self._open = open_target
        self._file: AtomicFile | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._ended = False
        try:
            self._parser = MultipartParser(
                boundary,
                callbacks={
                    "on_part_begin": self._headers.clear,
                    "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                    "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._part_start,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
            )
        except FormParserError:
            raise InvalidArgument("invalid multipart boundary") from None

    def write(self, data: Chunk) -> None:
        try:
            self._parser.write(bytes(data) if isinstance(data, memoryview) else data)
        except FormParserError:
            raise InvalidArgument("malformed multipart body") from None

    def finish(self) -> None:
        if not self._ended:
            raise InvalidArgument("the multipart body ended early")
        if not self.written:
            raise InvalidArgument("no part named 'file' in the multipart body")

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _part_start(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if options.get(b"name") != b"file":
            return
        raw = self._raw_path or _form_filename(options.get(b"filename", b""))
        if not raw:
            raise InvalidArgument("a file part needs a filename when the query has no path")
        self._file = self._open(raw)
        if any(self._file.requested == done for done in self.written):
            target = self._file.requested
            self._file.abort()
            self._file = None
            raise InvalidArgument(f"{target} appears twice in one upload")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            _write(self._file, memoryview(data)[start:end])

    def _part_end(self) -> None:
        if self._file is not None:
            _commit(self._file)
            self.written.append(self._file.requested)
            self._file = None

    def _end(self) -> None:
        self._ended = True


_FORM_ESCAPE = re.compile(r"%(22|0[0-9A-Fa-f]|1[0-9A-Fa-f])")


def _form_filename(raw: bytes) -> str:
    """A part's filename: UTF-8 bytes (the header arrives decoded as latin-1), with the HTML5
    form escapes browsers and httpx apply (`"` → %22, control characters → %XX) undone."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return _FORM_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _write(file: AtomicFile, data: bytes | memoryview) -> None:
    try:
        file.write(data)
    except OSError as err:
        raise os_error(err, file.requested) from err


def _commit(file: AtomicFile) -> None:
    try:
        file.commit()
    except OSError as err:
        file.abort()
        raise os_error(err, file.requested) from err
