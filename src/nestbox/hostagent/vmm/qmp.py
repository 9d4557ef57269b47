"""A small typed asyncio QMP client: one unix socket, one command at a time.

QEMU's own `qemu.qmp` is richer (reconnects, event listeners); we need `execute` and nothing
else, with anyio cancellation semantics, so this stays about a hundred lines. Asynchronous
events that arrive between replies are kept in a short ring (`events`) for diagnostics.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from nestbox.hostagent.vmm.base import UNIX_PATH_MAX, QmpError, SocketPathTooLong, VmError

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import UNIXSocketStream

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024 * 1024
"""A `query-*` reply is one JSON line; 16 MiB is far above anything QEMU sends."""


class QmpClient:
    """A connected, negotiated QMP session. Create it with `await QmpClient.connect(path)`."""

    def __init__(self, stream: UNIXSocketStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        # One command in flight at a time: QMP replies carry no id we rely on, so commands
        # from two tasks must not interleave on the socket.
        self._lock = anyio.Lock()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)

    @classmethod
    async def connect(cls, path: Path) -> QmpClient:
        """Connect once (no retry) and negotiate capabilities.

        :raise OSError: nothing listens on `path` yet.
        :raise SocketPathTooLong:
        """
        if len(str(path).encode()) > UNIX_PATH_MAX:
            raise SocketPathTooLong(path)
        stream = await anyio.connect_unix(path)
        client = cls(stream)
        try:
            greeting = await client._read()
            if "QMP" not in greeting:
                raise VmError(f"unexpected QMP greeting: {greeting!r}")
            await client.execute("qmp_capabilities")
        except BaseException:
            await stream.aclose()
            raise
        return client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its `return` value.

        :raise QmpError: QEMU answered with an error.
        :raise anyio.EndOfStream: QEMU closed the socket (it exited).
        """
        return await self._execute(command, arguments, None)

    async def execute_with_fd(self, command: str, arguments: dict[str, Any], fd: int) -> Any:
        """Run a command that takes a file descriptor (`getfd`, `add-fd`): the fd travels
        with the command's bytes as SCM_RIGHTS ancillary data. The caller keeps its own fd."""
        return await self._execute(command, arguments, fd)

    async def _execute(self, command: str, arguments: dict[str, Any] | None, fd: int | None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        async with self._lock:
            if fd is None:
                await self._stream.send(data)
            else:
                await self._stream.send_fds(data, [fd])
            while True:
                reply = await self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    err = reply["error"]
                    raise QmpError(command, str(err.get("class")), str(err.get("desc")))
                if "event" in reply:
                    self.events.append(reply)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.receive_until(b"\n", MAX_LINE)
        return cast(dict[str, Any], json.loads(line))
