"""The rest of an upload's body moved from the socket into the file by the kernel (splice(2)).

In a TCG guest every byte copied costs emulated instructions: receiving into a buffer and
writing it out (two copies, Python between them) got about a third of the TCP rate into the
guest, splicing socket -> pipe -> file about half (`make bench-files`). `splice_body` runs in a
worker thread, on a connection whose reading the event loop has paused: it polls the socket
(woken once `WAKE_AT` bytes are queued, `SO_RCVLOWAT`), splices each run of body bytes through a
pipe into the file, and reads the framing between runs (a chunked body's size lines, its
trailers) by peeking, taking from the socket exactly the bytes the framing used, so nothing after
the body (a pipelined request) is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import threading
    from collections.abc import Sequence

PIPE_SIZE = 1024 * 1024
"""The pipe's capacity asked for (the kernel's `pipe-max-size` default): one splice moves up to
this much."""
PEEK = 512
"""Bytes peeked at a time when the framing is not inside a run of data: enough for a chunk's
end and the next size line, so little data goes the slow way (peeked, read, written: three
copies); a longer size line or trailer takes a few more peeks."""
WAKE_AT = 256 * 1024
"""Inside a run of data, the thread wakes once this much is queued (`SO_RCVLOWAT`): fewer,
larger splices; each wake-up costs the guest the same whatever it moves."""
POLL_MS = 250
"""How often the thread looks at its stop flag while the client sends nothing."""
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Framing(Protocol):
    """What `splice_body` needs of the body's framing (`rawbody._Framing`)."""

    remaining: int

    def done(self) -> bool: ...

    def in_data(self) -> bool:
        """Inside a run of body bytes (`remaining` of them left)."""

    def took(self, n: int) -> None:
        """`n` bytes of the current run were moved."""

    def feed(self, data: memoryview, body: Collector) -> int: ...


class Collector:
    """Body bytes the framing handed over while it was parsed from peeked bytes."""

    def __init__(self) -> None:
        self.pieces: list[memoryview] = []

    def add(self, piece: memoryview) -> None:
        self.pieces.append(piece)


class ClientGone(Exception):
    """The connection ended (or the thread was told to stop) before the body did."""


def splice_body(
    sock_fd: int,
    framing: Framing,
    held: Sequence[memoryview],
    out_fd: int,
    stop: threading.Event,
) -> int:
    """Write `held` (body bytes already received), then the rest of the body from `sock_fd`,
    to `out_fd`; returns the bytes written. Blocking: run it in a worker thread.

    :raise ClientGone: end of stream, or `stop` was set. :raise ValueError: malformed framing.
    :raise OSError: from the file (ENOSPC included) or the socket.
    """
    written = write_all(out_fd, held)
    peeker = socket.socket(fileno=os.dup(sock_fd))  # for MSG_PEEK; closing it keeps sock_fd
    try:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    except OSError:
        peeker.close()
        raise
    try:
        with contextlib.suppress(OSError):  # a smaller pipe only means more splices
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        poller = select.poll()
        poller.register(sock_fd, select.POLLIN | select.POLLRDHUP)
        lowat = 1
        while not framing.done():
            if stop.is_set():
                raise ClientGone
            # Wake for a batch, not for every segment: at most what the current run still
            # needs, so the run's last bytes always wake us (the end of a body never waits).
            want = min(framing.remaining, WAKE_AT) if framing.in_data() else 1
            if want != lowat:
                try:
                    peeker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    lowat = want
                except OSError:  # a socket without it: a wake-up per segment, as before
                    pass
            if not poller.poll(POLL_MS):
                continue
            if framing.in_data():
                got = _splice_in(sock_fd, write_fd, framing.remaining)
                framing.took(got)  # taken off the socket, whatever happens to them next
                _splice_out(read_fd, out_fd, got)
                written += got
            else:
                written += _take_framing(peeker, framing, out_fd)
    finally:
        if lowat != 1:  # the socket is the connection's: leave it as the loop expects
            with contextlib.suppress(OSError):
                peeker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        peeker.close()  # the duplicate only: the connection stays open
        os.close(read_fd)
        os.close(write_fd)
    return written


def _splice_in(sock_fd: int, write_fd: int, most: int) -> int:
    """Up to `most` body bytes socket -> (empty) pipe; 0 if none were ready."""
    try:
        got = os.splice(sock_fd, write_fd, min(most, PIPE_SIZE),
                        flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)  # fmt: skip
    except BlockingIOError:
        return 0
    if not got:
        raise ClientGone
    return got


def _splice_out(read_fd: int, out_fd: int, n: int) -> None:
    """The `n` bytes in the pipe -> the file (its position)."""
    while n:
        n -= os.splice(read_fd, out_fd, n, flags=os.SPLICE_F_MOVE)


def _take_framing(peeker: socket.socket, framing: Framing, out_fd: int) -> int:
    """Parse framing from peeked bytes; take from the socket exactly what it used, and write
    the body bytes among them. Returns the body bytes written."""
    try:
        peeked = peeker.recv(PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    if not peeked:
        raise ClientGone
    collector = Collector()
    used = framing.feed(memoryview(peeked), collector)
    _discard(peeker, used)
    return write_all(out_fd, collector.pieces)


def _discard(peeker: socket.socket, n: int) -> None:
    """Read and drop `n` bytes already in the socket's receive queue (seen by a peek)."""
    buf = bytearray(min(n, PEEK))
    while n:
        try:
            got = peeker.recv_into(buf, min(n, len(buf)), socket.MSG_DONTWAIT)
        except BlockingIOError as err:  # they were queued: only a reset takes them away
            raise ClientGone from err
        if not got:
            raise ClientGone
        n -= got


def write_all(fd: int, pieces: Sequence[memoryview]) -> int:
    total = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            view = view[n:]
            total += n
    return total
