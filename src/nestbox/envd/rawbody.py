"""Bulk bodies straight between the connection and the file: `POST /files` uploads read off
the connection without h11, `GET /files` downloads sent with sendfile(2).

uvicorn's h11 path copies every body byte five times in Python (into h11's receive buffer, two
slices out of it, into the request cycle's bytearray, and `bytes()` of that for the ASGI
message) and runs h11's state machine per read. In a TCG guest that made an upload cost envd
about three times what receiving into a file costs (`make bench-files`). `RawBodyProtocol`
(`TrackingH11Protocol` plus this) hands h11 only a request's head; when the request is a `POST`
to one of its `paths` with a chunked body or a `Content-Length` of at least `MIN_LENGTH`, it
reads the body itself: the received bytes are sliced (memoryviews, no copy) out of its framing
and handed to the app in batches of about `CHUNK` bytes, through `scope["extensions"]
[EXTENSION]` (a `RawBody`). Everything else (heads, responses, other requests, pipelining,
keep-alive, connection tracking) stays uvicorn's and h11's.

Downloads: a `GET` to one of `paths` gets `scope["extensions"][SENDFILE]` (a `SendFile`). The app
sends its `http.response.start` as usual, then awaits `SendFile(fd, offset, count)` instead of
body messages, then sends the final (empty) body message. h11 counts the span's length (its
`send_with_data_passthrough`, made for this) and the kernel copies the file's pages to the
socket: no byte passes through Python. In a TCG guest a download through Python (`pread` into a
buffer, h11, the transport's buffer) cost envd about twice the guest CPU of a plain `send` from
memory (`make bench-files`). A file that ends before `count` bytes closes the connection (the
client sees a response shorter than its `Content-Length`).

How the request ends for h11, which never saw the body: a chunked body's last chunk and trailers
are given to h11 as received, so it completes the request as usual and the connection is kept
alive. h11 still waits for a `Content-Length` body's bytes, so that connection is closed after
the response (`Connection: close`). The rest of a body answered early (an error) is read and
dropped, as uvicorn does. Malformed framing answers 400 as uvicorn does for h11's errors.
"""

from __future__ import annotations

import asyncio
import re
import threading
import weakref
from typing import TYPE_CHECKING, ClassVar

import anyio
import h11
from starlette.requests import ClientDisconnect

from nestbox.envd import splice
from nestbox.envd.conntrack import ConnTracker, TrackingH11Protocol

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

    from nestbox.envd.splice import Collector

EXTENSION = "nestbox.raw_body"
"""The ASGI scope extension holding the request's `RawBody`."""
SENDFILE = "nestbox.sendfile"
"""The ASGI scope extension holding the request's `SendFile`."""
CHUNK = 1024 * 1024
"""Bytes gathered before the app is woken (and reading paused until it takes them)."""
MIN_LENGTH = 1024 * 1024
"""Smaller `Content-Length` bodies stay h11's, keeping their connection alive."""
LINE_LIMIT = 4096
"""The longest chunk-size line (with extensions) taken."""
HEAD_LIMIT = 16 * 1024
"""How far into a read a head's end is looked for (h11's limit on an incomplete head)."""
TRAILER_LIMIT = 16 * 1024
"""The most trailer bytes taken (as h11 takes for a head)."""
SPLICES_AT_ONCE = 4
"""Uploads spliced at once, each in a worker thread of its own pool: a client that stalls
mid-body holds one of these, never one of the threads the rest of envd needs."""
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head (its `blank_line_regex`)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})[ \t]*(?:;[^\r\n]*)?\r\n")
_BAD = "Invalid HTTP request received."  # uvicorn's answer to a malformed request


_splice_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


def _splice_limiter() -> anyio.CapacityLimiter:
    """The running loop's (a limiter's waiters belong to the loop they wait on)."""
    loop = asyncio.get_running_loop()
    limiter = _splice_limiters.get(loop)
    if limiter is None:
        limiter = _splice_limiters[loop] = anyio.CapacityLimiter(SPLICES_AT_ONCE)
    return limiter


class RawBody:
    """A request body as it arrives: `async for batch in body` gives lists of memoryviews,
    about `CHUNK` bytes each (the last may hold less). The next batch is read while the app
    handles one; reading is paused when it is full and the app has not asked for it yet.

    :raise ClientDisconnect: (from iterating) the connection closed or the framing was malformed.
    """

    def __init__(
        self,
        resume: Callable[[], None],
        first_read: Callable[[], None],
        splice: Callable[[list[memoryview], int], Awaitable[int]],
    ) -> None:
        self._resume = resume
        self._first_read: Callable[[], None] | None = first_read
        self._splice = splice
        self._pieces: list[memoryview] = []
        self._held = 0
        self._ended = False
        self._failed = False
        self._discard = False
        self._ready = asyncio.Event()

    @property
    def full(self) -> bool:
        return self._held >= CHUNK

    def add(self, piece: memoryview) -> None:
        if piece and not self._discard:
            self._pieces.append(piece)
            self._held += len(piece)
            if self._held >= CHUNK:
                self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    def discard(self) -> None:
        """Drop what is held and whatever is added from now on (nobody reads it any more)."""
        self._discard = True
        self._pieces, self._held = [], 0

    def fail(self) -> None:
        self._failed = True
        self._ready.set()

    @property
    def ended(self) -> bool:
        return self._ended

    def __aiter__(self) -> RawBody:
        return self

    async def write_to(self, fd: int) -> int:
        """The whole body (what is held, then the rest) written to `fd` by the kernel
        (`splice.splice_body`), instead of iterating; returns the bytes written.

        :raise ClientDisconnect: the connection closed or the framing was malformed.
        :raise OSError: writing `fd` failed (ENOSPC included).
        """
        if self._first_read is not None:
            first_read, self._first_read = self._first_read, None
            first_read()
        if self._failed:
            raise ClientDisconnect
        held, self._pieces, self._held = self._pieces, [], 0
        if self._ended:  # all of it had arrived already
            return await anyio.to_thread.run_sync(splice.write_all, fd, held)
        return await self._splice(held, fd)

    async def __anext__(self) -> list[memoryview]:
        if self._first_read is not None:  # `Expect: 100-continue`: the client waits for this
            first_read = self._first_read
            self._first_read = None
            first_read()
        while not (self._failed or self._ended or self._held >= CHUNK):
            self._ready.clear()
            self._resume()
            await self._ready.wait()
        if self._failed:
            raise ClientDisconnect
        if not self._held:
            raise StopAsyncIteration
        batch, self._pieces, self._held = self._pieces, [], 0
        if not self._ended:
            self._resume()
        return batch


class _FileSpan:
    """`count` bytes of a file, as h11's `Data`: h11 needs only its length, and hands it back."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


class SendFile:
    """`await send_file(fd, offset, count)`: `count` bytes of the open file `fd` from `offset` as
    (part of) the response body, after `http.response.start` and before the last body message.
    `fd` stays the caller's.

    :raise ClientDisconnect: the client went away (or the response cannot take the bytes); the
        connection is then closed.
    """

    def __init__(self, protocol: RawBodyProtocol, cycle: RequestResponseCycle) -> None:
        self._protocol = protocol
        self._cycle = cycle

    async def __call__(self, fd: int, offset: int, count: int) -> None:
        proto = self._protocol
        cycle = proto.cycle
        if cycle is not self._cycle or not cycle.response_started or cycle.response_complete:
            raise RuntimeError("SendFile outside its response's body")
        if proto.flow.write_paused and not cycle.disconnected:
            await proto.flow.drain()
        if cycle.disconnected or proto.transport.is_closing():
            raise ClientDisconnect
        if not count:
            return
        span = _FileSpan(count)
        parts: list[object] = list(
            proto.conn.send_with_data_passthrough(h11.Data(data=span)) or ()  # type: ignore[arg-type]
        )
        sent = 0
        try:
            for part in parts:
                if part is span:
                    # (where the kernel cannot, asyncio reads and writes the file itself)
                    with open(fd, "rb", closefd=False) as file:  # noqa: ASYNC230 (no I/O here)
                        sent = await asyncio.get_running_loop().sendfile(
                            proto.transport, file, offset, count, fallback=True
                        )
                else:
                    proto.transport.write(part)  # type: ignore[arg-type]
        except (OSError, RuntimeError):  # reset, or the transport closed meanwhile
            sent = -1
        if sent != count:
            cycle.disconnected = True
            proto.transport.close()
            raise ClientDisconnect


class _Framing:
    """A body's framing from its first byte: `Content-Length` or chunked."""

    def __init__(self, length: int | None) -> None:
        self.remaining = length or 0
        """Bytes of data left: of the body (`Content-Length`) or of the current chunk."""
        self.chunked = length is None
        self._line = bytearray()
        self._state = "size" if self.chunked else "data"  # size | data | crlf | trailer | done
        self.trailer = bytearray()
        """The last chunk and the trailers, as received (chunked; for h11)."""

    def done(self) -> bool:
        return self._state == "done"

    def in_data(self) -> bool:
        return self._state == "data"

    def took(self, n: int) -> None:
        """`n` bytes of the current run of data were moved past us (spliced)."""
        assert self._state == "data"
        assert 0 <= n <= self.remaining
        self.remaining -= n
        if not self.remaining:
            self._state = "crlf" if self.chunked else "done"

    def feed(self, data: memoryview, body: RawBody | Collector) -> int:
        """Hand `data`'s body bytes to `body`; returns how many bytes of `data` were used.

        :raise ValueError: malformed framing.
        """
        at, n = 0, len(data)
        while at < n and self._state != "done":
            if self._state == "data":
                take = min(self.remaining, n - at)
                body.add(data[at : at + take])
                at += take
                self.remaining -= take
                if not self.remaining:
                    self._state = "crlf" if self.chunked else "done"
            elif self._state == "crlf":
                need = 2 - len(self._line)
                self._line += data[at : at + need]
                at += min(need, n - at)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise ValueError("malformed chunk end")
                    self._line.clear()
                    self._state = "size"
            elif self._state == "size":
                at = self._size_line(data, at)
            else:
                at = self._trailer(data, at)
        return at

    def _size_line(self, data: memoryview, at: int) -> int:
        end = bytes(data[at : at + LINE_LIMIT]).find(b"\n")
        if end < 0:
            self._line += data[at:]
            if len(self._line) > LINE_LIMIT:
                raise ValueError("chunk size line too long")
            return len(data)
        self._line += data[at : at + end + 1]
        at += end + 1
        match = _CHUNK_SIZE.fullmatch(self._line)
        if match is None or len(self._line) > LINE_LIMIT:
            raise ValueError("malformed chunk size line")
        self.remaining = int(match[1], 16)
        if self.remaining:
            self._state = "data"
        else:
            self._state = "trailer"
            self.trailer += self._line
        self._line.clear()
        return at

    def _trailer(self, data: memoryview, at: int) -> int:
        before = len(self.trailer)
        self.trailer += data[at : at + TRAILER_LIMIT + 1]
        # The blank line may begin with the last-chunk line's "\n", or straddle two reads.
        match = _HEAD_END.search(self.trailer, max(0, before - 2))
        if match is None:
            if len(self.trailer) > TRAILER_LIMIT:
                raise ValueError("trailers too long")
            return len(data)
        used = match.end() - before
        del self.trailer[match.end() :]
        self._state = "done"
        return at + used


class RawBodyProtocol(TrackingH11Protocol):
    """`TrackingH11Protocol` that reads the bodies of bulk uploads itself (see the module's
    text). Use `raw_body_protocol(tracker, paths)` to get a class bound to both."""

    raw_paths: ClassVar[frozenset[str]] = frozenset()
    _body: RawBody | None = None
    _framing: _Framing | None = None
    """The body being read, from its head on; a `Content-Length` one stays until the end."""
    _tail = b""
    """The last bytes given to h11 while it waits for a head (a head's end may straddle reads)."""

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        cycle = self.cycle
        if cycle is not before and cycle is not None:
            scope = cycle.scope
            if scope["method"] == "GET" and scope["path"] in self.raw_paths:
                scope.setdefault("extensions", {})[SENDFILE] = {"send": SendFile(self, cycle)}

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        view = memoryview(data)
        while view and not self.transport.is_closing():
            if self._framing is not None:
                view = view[self._feed_body(view) :]
            elif self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                view = self._feed_head(view)
            else:
                self.conn.receive_data(bytes(view))
                self.handle_events()
                return

    def _feed_head(self, view: memoryview) -> memoryview:
        """Give h11 `view` up to the end of a head; start reading the body if it is ours.
        Returns what is left of `view`."""
        tail = self._tail
        match = _HEAD_END.search(tail + bytes(view[:HEAD_LIMIT]), max(0, len(tail) - 1))
        if match is None:  # no head ends here (or a huge one): all of it is h11's
            self.conn.receive_data(bytes(view))
            self.handle_events()
            waiting = self.conn.their_state is h11.IDLE
            self._tail = (tail + bytes(view[-2:]))[-2:] if waiting else b""
            return view[len(view) :]
        end = match.end() - len(tail)
        self._tail = b""
        before = self.cycle
        self.conn.receive_data(bytes(view[:end]))
        self.handle_events()
        if self.cycle is not before and self.conn.their_state is h11.SEND_BODY:
            self._maybe_take_body()
        return view[end:]

    def _maybe_take_body(self) -> None:
        cycle = self.cycle
        scope = cycle.scope
        if scope["method"] != "POST" or scope["path"] not in self.raw_paths or cycle.body:
            return
        headers = dict(scope["headers"])  # h11 has validated them: at most one length
        if b"transfer-encoding" in headers:  # h11 takes only `chunked`
            length = None
        else:
            length = int(headers.get(b"content-length", b"0"))
            if length < MIN_LENGTH:
                return
            self.end_keep_alive()  # h11 will never see this body end
        self._framing = _Framing(length)
        self._body = RawBody(self.flow.resume_reading, self._send_continue, self._splice_rest)
        scope.setdefault("extensions", {})[EXTENSION] = {"body": self._body}

    def _feed_body(self, view: memoryview) -> int:
        """Hand `view`'s body bytes to the app; returns how many bytes of `view` were used."""
        framing, body = self._framing, self._body
        assert framing is not None
        assert body is not None
        if framing.done():  # a Content-Length body read to its end: the connection closes
            return len(view)
        try:
            used = framing.feed(view, body)
        except ValueError:
            body.fail()
            self._bad_request()
            return len(view)
        if body.full:
            self.flow.pause_reading()
        if framing.done():
            body.end()
            if framing.chunked:  # h11 completes the request, and may take the next one
                self._framing = self._body = None
                self.conn.receive_data(bytes(framing.trailer))
                self.handle_events()
        return used

    async def _splice_rest(self, held: list[memoryview], fd: int) -> int:
        """`RawBody.write_to`: reading paused, `held` and the rest of the body go to `fd` from
        a worker thread (`splice.splice_body`); then the request ends for h11 as in
        `_feed_body`, and reading resumes."""
        framing, body = self._framing, self._body
        assert framing is not None
        assert body is not None
        self.flow.pause_reading()
        sock_fd = self.transport.get_extra_info("socket").fileno()
        stop, finished = threading.Event(), threading.Event()

        def work() -> int:
            try:
                return splice.splice_body(sock_fd, framing, held, fd, stop)
            finally:
                finished.set()

        try:
            written = await anyio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=_splice_limiter()
            )
        except OSError:  # the file's (ENOSPC, ...): the framing is whole, the rest can be
            raise  # read and dropped as for any early answer (reading resumes when it is)
        except BaseException as err:
            stop.set()  # a cancelled wait leaves the thread running: it must stop touching fd
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
            body.fail()
            if isinstance(err, ValueError):  # malformed framing
                self._bad_request()
                raise ClientDisconnect from err
            if isinstance(err, splice.ClientGone):
                self.transport.close()
                raise ClientDisconnect from err
            raise
        body.end()
        if framing.chunked:  # h11 completes the request, and may take the next one
            self._framing = self._body = None
            self.conn.receive_data(bytes(framing.trailer))
            self.handle_events()
        self.flow.resume_reading()
        return written

    def _bad_request(self) -> None:
        cycle = self.cycle
        if cycle.response_started:
            self.transport.close()
        else:
            cycle.disconnected = True  # the app's own answer goes nowhere
            self.send_400_response(_BAD)

    def _send_continue(self) -> None:
        """What uvicorn sends when an app first reads a body whose client expects it."""
        cycle = self.cycle
        if cycle.waiting_for_100_continue and not self.transport.is_closing():
            event = h11.InformationalResponse(status_code=100, headers=[], reason="Continue")
            self.transport.write(self.conn.send(event) or b"")
            cycle.waiting_for_100_continue = False

    def on_response_complete(self) -> None:
        body, framing = self._body, self._framing
        if body is not None and framing is not None and not body.ended:
            # Answered before the body was all read (an error): as uvicorn does, the rest is
            # read and dropped, and a chunked body's end then readies the connection for the
            # next request (a Content-Length one's connection is closing already).
            body.discard()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._body is not None:
            self._body.fail()
        super().connection_lost(exc)

    def resume_keep_alive(self) -> None:
        if self._framing is not None and not self._framing.chunked:
            return  # a Content-Length body h11 never saw the end of: the connection must close
        super().resume_keep_alive()


def raw_body_protocol(tracker: ConnTracker, paths: frozenset[str]) -> type[RawBodyProtocol]:
    """A `RawBodyProtocol` subclass reporting to `tracker` and reading the bodies of `POST`s to
    `paths`, for uvicorn's `Config(http=...)`."""
    return type(
        "BoundRawBodyProtocol", (RawBodyProtocol,), {"tracker": tracker, "raw_paths": paths}
    )
