"""Non-blocking file-descriptor I/O on the event loop: the pumps behind process output and input.

`FdReader` watches a pipe or PTY master with `loop.add_reader` and hands every chunk to a
callback the moment it is readable, so nothing is buffered until exit and nothing ever waits for a
consumer. `FdWriter` writes all of a buffer, waiting for writability with `loop.add_writer` when
the pipe or terminal is full; writes are serialised by a lock. Neither blocks the loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


class InputClosed(Exception):
    """The input side is closed: CloseStdin was called, or the process closed its end."""


class FdReader:
    """Reads `fd` whenever it is readable and passes each chunk to `on_data`.

    `done` resolves at end of file, or at EIO (a PTY master whose slave side is all closed).
    The reader never closes `fd`: its owner does, after `stop()`.
    """

    def __init__(self, fd: int, on_data: Callable[[bytes], None]) -> None:
        self._fd = fd
        self._on_data = on_data
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as err:
            # EIO is a PTY's normal end; anything else also ends the stream rather than spin.
            if err.errno != errno.EIO:
                log.warning("reading fd %d failed: %s", self._fd, err)
            data = b""
        if not data:
            self.stop()
            return
        self._on_data(data)

    def stop(self) -> None:
        """Stop watching the fd (idempotent); `done` resolves."""
        if not self.done.done():
            self._loop.remove_reader(self._fd)
            self.done.set_result(None)


class FdWriter:
    """Writes whole buffers to a non-blocking fd.

    With `owns_fd` the writer closes the fd on `close()` (a stdin pipe); otherwise `close()` only
    stops further writes (a PTY master, which the process object closes).
    """

    def __init__(self, fd: int, *, owns_fd: bool) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self._loop = asyncio.get_running_loop()
        # Serialises writers so chunks from concurrent SendInput calls never interleave.
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[None] | None = None
        os.set_blocking(fd, False)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    async def write(self, data: bytes) -> None:
        """Write all of `data`, waiting while the pipe is full.

        :raise InputClosed: the input was closed before or during the write.
        """
        async with self._lock:
            view = memoryview(data)
            while view:
                if self._fd < 0:
                    raise InputClosed
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    await self._writable()
                    continue
                except OSError as err:  # EPIPE: the reader is gone; EIO: the terminal hung up
                    raise InputClosed from err
                view = view[written:]

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self._fd
        self._waiter = fut
        self._loop.add_writer(fd, resolve, fut)
        try:
            await fut
        finally:
            self._waiter = None
            if self._fd >= 0:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        """Refuse further writes, wake a blocked write with `InputClosed` (idempotent)."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        self._loop.remove_writer(fd)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(InputClosed())
        if self._owns_fd:
            os.close(fd)


def resolve(fut: asyncio.Future[None]) -> None:
    """Set `fut`'s result unless it is already done (a readiness callback)."""
    if not fut.done():
        fut.set_result(None)
