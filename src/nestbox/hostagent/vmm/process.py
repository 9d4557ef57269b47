"""VMM processes: launch detached, watch for exit through a pidfd, kill by pidfd.

A VMM is started in its own session (`start_new_session=True`), so a Ctrl-C or a crash of the
agent does not take the guests down with it, and it is *not* an asyncio subprocess: asyncio
kills its children when their transport is closed, which is exactly what must not happen.
Exit is observed through a pidfd (Linux >= 5.3), which works for our own children and for
processes adopted from an earlier agent run alike, and signals go through the same pidfd, so a
recycled pid can never be hit. What a VMM uses (CPU time, resident memory) is read from /proc
(`stats`), never asked of the VMM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.vmm.base import VmLaunchError, VmStats

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class VmProcess:
    """One VMM process. `popen` is set when this agent started it (then it can reap it and
    learn its exit status), None when it was adopted by pid."""

    def __init__(
        self,
        pid: int,
        command: list[str],
        output_log: Path,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.pid = pid
        self.command = command
        self.output_log = output_log
        self._popen = popen
        self._exit_code: int | None = None
        self._gone = False
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._gone = True

    @classmethod
    def adopt(cls, pid: int, command: list[str], output_log: Path) -> VmProcess:
        """Watch a VMM that an earlier agent run started (no exit status will be known)."""
        return cls(pid, command, output_log)

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def is_running(self) -> bool:
        """Instant check: the process has not exited (a zombie counts as exited)."""
        if self._gone or self._pidfd is None:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            self._reap()
            return False
        return True

    async def wait_exit(self) -> int | None:
        """Block until the process exits; return its exit status when it was our child.

        Any number of tasks may wait at once: each waits on its own duplicate of the pidfd,
        because the event loop allows one reader per file descriptor.
        """
        if self._gone or self._pidfd is None:
            return self._exit_code
        fd = os.dup(self._pidfd)
        try:
            await anyio.wait_readable(fd)
        finally:
            os.close(fd)
        self._reap()
        return self._exit_code

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the process through its pidfd; a no-op once it has exited."""
        if self._gone or self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def kill(self) -> int | None:
        """SIGKILL and wait for the exit. QEMU holds no state worth a graceful `quit` once
        its snapshot is written, and `quit` costs 1-2 s more."""
        self.send_signal(signal.SIGKILL)
        return await self.wait_exit()

    def stats(self) -> VmStats | None:
        """CPU time and resident memory from /proc, or None once the process has exited (its
        pid may then be another process's)."""
        if not self.is_running():
            return None
        ticks = cpu_ticks(self.pid)
        if ticks is None:
            return None
        return VmStats(cpu_s=ticks / CLOCK_TICKS, rss_bytes=rss_bytes(self.pid))

    def output_tail(self) -> str:
        """The last few KiB the VMM wrote to stdout/stderr, for error messages."""
        try:
            with self.output_log.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _reap(self) -> None:
        if self._gone:
            return
        if self._popen is not None:
            self._exit_code = self._popen.poll()
            if self._exit_code is None:  # pidfd readable means exited; poll() must succeed
                self._exit_code = self._popen.wait()
        self._gone = True
        self.close()


def launch(command: list[str], *, output_log: Path) -> VmProcess:
    """Start `command` detached (own session, stdin closed, output appended to `output_log`,
    umask 077 so whatever it creates is private).

    Deliberately synchronous: (v)fork+exec takes a millisecond, and doing it in a worker thread
    would let a cancellation land after the process exists but before anyone owns it. No
    `preexec_fn`: it would make Python fork (tens of ms for the agent) instead of vfork.

    :raise VmLaunchError: the executable could not be started.
    """
    try:
        fd = os.open(output_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with open(fd, "ab") as out:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                umask=0o077,
            )
    except OSError as err:
        raise VmLaunchError(
            "cannot start the VMM", command=command, exit_code=None, output_tail=str(err)
        ) from err
    log.debug("VMM started", extra={"pid": popen.pid})
    return VmProcess(popen.pid, command, output_log, popen)


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` (all its threads) in clock ticks, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def rss_bytes(pid: int) -> int:
    """`pid`'s resident set (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
