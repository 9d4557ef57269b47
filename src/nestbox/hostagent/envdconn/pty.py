"""Terminals in a capsule: a PTY process is an envd process started with a size, addressed by
its tag so that a client can drop its stream and re-attach later (Wrenn's `PtyAttach` with
`cmd` set starts one, without `cmd` reconnects by tag)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from nestbox.hostagent.envdconn.errors import InvalidRequest
from nestbox.hostagent.envdconn.process import ProcessOps, process_input, selector_of, start_request
from nestbox.protocol.gen.process.process_pb import PTY, SendInputRequest, UpdateRequest

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from nestbox.hostagent.envdconn.events import EventStream

DEFAULT_COLS = 80
DEFAULT_ROWS = 24


class PtyOps(ProcessOps):
    """The PTY half of `CapsuleEnvd`."""

    def pty_attach(
        self,
        cmd: str | None,
        args: Sequence[str] = (),
        *,
        tag: str | None = None,
        cols: int = DEFAULT_COLS,
        rows: int = DEFAULT_ROWS,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AbstractAsyncContextManager[EventStream]:
        """`async with envd.pty_attach("/bin/bash") as term:` — a new terminal (tag defaults
        to `pty-<8 hex>`, see `term.tag`), or with `cmd=None` the running one tagged `tag`.

        Events: `Started`, `Output(stream="pty")`..., `Ended`.
        :raise InvalidRequest: no command and no tag, or a size below 1x1.
        :raise NotFound: reconnecting to a tag no running process has.
        """
        if cmd is None:
            if not tag:
                raise InvalidRequest("a tag is required to reconnect to a terminal")
            return self.connect_process(tag)
        if cols < 1 or rows < 1:
            raise InvalidRequest("a terminal needs at least 1 column and 1 row")
        pty = PTY(size=PTY.Size(cols=cols, rows=rows))
        tag = tag or f"pty-{secrets.token_hex(4)}"
        return self._open_start(start_request(cmd, args, envs, cwd, tag=tag, pty=pty), user)

    async def pty_input(self, tag: str, data: bytes) -> None:
        """Type `data` into the terminal. :raise NotFound: no such running terminal."""
        request = SendInputRequest(process=selector_of(tag), input=process_input("pty", data))
        await self._unary(self._conn.pools().process.send_input, request)

    async def pty_resize(self, tag: str, cols: int, rows: int) -> None:
        """:raise InvalidRequest: a size below 1x1, or the process has no terminal."""
        if cols < 1 or rows < 1:
            raise InvalidRequest("a terminal needs at least 1 column and 1 row")
        request = UpdateRequest(
            process=selector_of(tag), pty=PTY(size=PTY.Size(cols=cols, rows=rows))
        )
        await self._unary(self._conn.pools().process.update, request)

    async def pty_kill(self, tag: str) -> None:
        """SIGKILL the terminal's process. :raise NotFound: it is not running."""
        await self.kill_process(tag, "SIGKILL")
