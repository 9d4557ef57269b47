"""`nestbox shell`: the local terminal joined to a terminal in the capsule.

The local terminal goes to raw mode (so Ctrl-C, Ctrl-D, arrows and the like are bytes for
the capsule's shell, not signals here), input is read as it comes and sent as it is,
output is written as it arrives, and a SIGWINCH sends the new size. Whatever ends the
session (the shell exits, the socket breaks, SIGTERM or SIGHUP here, an error), the local
terminal's settings are put back as they were.
"""

from __future__ import annotations

import os
import signal
import sys
import termios
import tty
from typing import TYPE_CHECKING

import anyio

from nestbox.sdk import AsyncNestbox

if TYPE_CHECKING:
    from nestbox.sdk import AsyncPtySession

READ_SIZE = 65536


def terminal_size(fd: int) -> tuple[int, int]:
    """(cols, rows) of the terminal on `fd`; 80x24 when it says none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


async def run_shell(api_url: str | None, api_key: str | None, capsule_id: str, cmd: str,
                    user: str | None) -> int:  # fmt: skip
    """The session; the exit code of the capsule's shell (-1 if unknown)."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    cols, rows = terminal_size(stdin)
    envs = {"TERM": os.environ.get("TERM", "xterm-256color")}
    async with AsyncNestbox(api_url, api_key) as nb:
        capsule = await nb.capsules.get(capsule_id)
        session = await capsule.pty.create(cmd, cols=cols, rows=rows, envs=envs, user=user)
        saved = termios.tcgetattr(stdin)
        try:
            tty.setraw(stdin, termios.TCSANOW)  # keep what was typed ahead
            async with session:
                await _relay(session, stdin, stdout)
        finally:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    return session.exit_code if session.exit_code is not None else -1


async def _relay(session: AsyncPtySession, stdin: int, stdout: int) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_keys, session, stdin)
        tg.start_soon(_signals, session, stdin, tg.cancel_scope)
        async for data in session:
            _write_all(stdout, data)
        tg.cancel_scope.cancel()


async def _keys(session: AsyncPtySession, fd: int) -> None:
    """What is typed, to the capsule, as it comes (EOF here ends nothing: the shell decides)."""
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, READ_SIZE)
        if not data:
            return
        await session.write(data)


async def _signals(session: AsyncPtySession, fd: int, scope: anyio.CancelScope) -> None:
    """SIGWINCH: send the new size. SIGTERM, SIGHUP: end the session (the terminal lives on)."""
    with anyio.open_signal_receiver(signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGWINCH:
                cols, rows = terminal_size(fd)
                await session.resize(cols, rows)
            else:
                scope.cancel()
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
