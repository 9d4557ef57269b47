"""Pseudo-terminals for PTY processes: open a pair, size it, make it the child's terminal.

The child gets the slave side as stdin, stdout and stderr and, being a session leader
(`start_new_session=True`), takes it as its controlling terminal in `acquire_controlling_tty`,
so job control, `^C` and `/dev/tty` work. envd keeps the master: output is read from it and
input written to it (non-blocking, see `fdio`).
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from dataclasses import dataclass

EOF_CHAR = b"\x04"
"""What CloseStdin writes to a PTY: ^D, end of input for a terminal in canonical mode."""


@dataclass(frozen=True, slots=True)
class PtyPair:
    master: int
    slave: int


def open_pty(cols: int, rows: int, *, owner: int | None = None) -> PtyPair:
    """A new PTY pair sized `cols` x `rows`; both fds are close-on-exec.

    With `owner` (a uid) the slave device is handed to that user, as `login` does, so programs
    that reopen their terminal by name (`ttyname`) can.
    """
    master, slave = os.openpty()
    try:
        set_size(master, cols, rows)
        if owner is not None:
            os.fchown(slave, owner, -1)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return PtyPair(master=master, slave=slave)


def set_size(fd: int, cols: int, rows: int) -> None:
    """Set the window size (TIOCSWINSZ); the foreground process group gets SIGWINCH.

    This ioctl only updates a kernel struct and never blocks, so it runs on the loop.
    """
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def acquire_controlling_tty() -> None:
    """`preexec_fn` for PTY children: make stdin (the slave) the controlling terminal.

    Runs in the child after `setsid()` and the switch to the target user; TIOCSCTTY needs no
    privilege for a session leader without a terminal. It only makes a syscall, which is what a
    `preexec_fn` may safely do in a threaded parent.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
