"""One process envd started: spawn, output pump, input, signals, and fan-out of its events.

Lifetime: the process leads its own session and process group and belongs to the registry, not
to the stream that started it. connectrpc cancels a handler the moment its client disconnects;
that only drops the handler's subscription, while the process and its pump (`run`, a task the
registry owns) go on until the process exits or envd shuts down.

Output is read from pipes (or the PTY master) with `loop.add_reader` as it is produced and
published to the `Fanout` without ever waiting for a subscriber (see `fanout` for the slow-reader
policy). The end event is published after the process has been reaped and its output drained.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nestbox.envd.errors import InvalidArgument
from nestbox.envd.process import pty
from nestbox.envd.process.fanout import EndInfo, Fanout, Output, StreamName, Subscription
from nestbox.envd.process.fdio import FdReader, FdWriter, InputClosed, resolve
from nestbox.envd.process.signals import describe_exit, signal_group

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.envd.users import User

DRAIN_GRACE_S = 1.0
"""After the process exits, how long to wait for its pipes to reach end of file. A background
child that inherited them can keep them open forever; the end event must not wait for it."""

SHUTDOWN_END = EndInfo(exit_code=-1, exited=False, status="signal: killed", error="envd shut down")


@dataclass(frozen=True, slots=True)
class PtySize:
    cols: int
    rows: int


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """Everything needed to start a process, already validated and resolved."""

    cmd: str
    args: tuple[str, ...]
    envs: dict[str, str]  # as requested; List reports these
    env: dict[str, str]  # the full environment the process gets
    cwd: str
    user: User
    tag: str | None = None
    stdin: bool = False
    pty: PtySize | None = None


@dataclass
class _Fds:
    """The parent's ends (pumped and written by envd) and the child's ends (closed after spawn)."""

    child: list[int] = field(default_factory=list)
    child_io: tuple[int, int, int] = (subprocess.DEVNULL, subprocess.DEVNULL, subprocess.DEVNULL)
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    master: int | None = None

    def parent(self) -> list[int]:
        return [fd for fd in (self.stdin, self.stdout, self.stderr, self.master) if fd is not None]


def _open_fds(spec: ProcessSpec) -> _Fds:
    """Pipes for stdout and stderr (and stdin if asked; else /dev/null), or one PTY for all."""
    if spec.pty is not None:
        owner = spec.user.uid if os.geteuid() == 0 else None
        pair = pty.open_pty(spec.pty.cols, spec.pty.rows, owner=owner)
        slave = pair.slave
        return _Fds(child=[slave], child_io=(slave, slave, slave), master=pair.master)
    fds = _Fds()
    try:
        fds.stdout, out_w = os.pipe()
        fds.child.append(out_w)
        fds.stderr, err_w = os.pipe()
        fds.child.append(err_w)
        in_r = subprocess.DEVNULL
        if spec.stdin:
            in_r, fds.stdin = os.pipe()
            fds.child.append(in_r)
    except OSError:
        _close_all(fds.child + fds.parent())
        raise
    fds.child_io = (in_r, out_w, err_w)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            continue


def identity_args(user: User) -> dict[str, Any]:
    """`Popen` arguments that switch to `user`; none when envd is not root (it then runs only as
    itself, which `users.lookup_user` enforces) or already has `user`'s ids and access rights
    (root starting a root process, the default). Without a switch CPython starts the child with
    `vfork`; a uid, gid or group change forces a full `fork`, which copies envd's page tables
    while the event loop stands still (a spawn took 0.18-0.29 s in an idle TCG guest that way,
    with asyncio's transport; 0.01-0.2 s with `vfork` beside 50 busy streams)."""
    if os.geteuid() != 0:
        return {}
    same_groups = {user.gid, *user.groups} == {os.getegid(), *os.getgroups()}
    if user.uid == os.geteuid() and user.gid == os.getegid() and same_groups:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


def _popen(spec: ProcessSpec, fds: _Fds) -> subprocess.Popen[bytes]:
    """Start the child, on the event loop (see `identity_args` for what that costs).

    Not `asyncio.create_subprocess_exec`: on Python 3.11 its child watcher starts a thread per
    process and its transport a task, which under TCG with 50 Starts at once kept every Start
    waiting for tens of seconds; the exit is watched through a pidfd instead (`_exited`)."""
    stdin, stdout, stderr = fds.child_io
    return subprocess.Popen(
        [spec.cmd, *spec.args],
        stdin=stdin, stdout=stdout, stderr=stderr,
        env=spec.env, cwd=spec.cwd,
        start_new_session=True,
        preexec_fn=pty.acquire_controlling_tty if spec.pty is not None else None,
        **identity_args(spec.user),
    )  # fmt: skip


async def _exited(popen: subprocess.Popen[bytes], pidfd: int) -> int:
    """Wait for the child to exit (its pidfd turns readable), reap it, return its status."""
    loop = asyncio.get_running_loop()
    while (returncode := popen.poll()) is None:
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(pidfd)
    return returncode


class ManagedProcess:
    """A running (or recently ended) process and its subscribers."""

    def __init__(
        self,
        spec: ProcessSpec,
        popen: subprocess.Popen[bytes],
        pidfd: int,
        fds: _Fds,
        buffer: int,
    ) -> None:
        self.spec = spec
        self.pid = popen.pid
        self._pidfd = pidfd
        self.end: EndInfo | None = None
        self.ended_at: float | None = None
        self._popen = popen
        self._fds = fds
        self._fanout = Fanout(buffer)
        # The writer owns a stdin pipe (CloseStdin closes it); the PTY master stays in `fds`.
        self._writer: FdWriter | None = None
        if fds.master is not None:
            self._writer = FdWriter(fds.master, owns_fd=False)
        elif fds.stdin is not None:
            self._writer = FdWriter(fds.stdin, owns_fd=True)
            fds.stdin = None

    @classmethod
    async def spawn(cls, spec: ProcessSpec, *, buffer: int) -> ManagedProcess:
        """Start the process; output is not read until `run()`.

        :raise OSError: it could not start (no such executable, permission denied, ...).
        """
        fds = _open_fds(spec)
        try:
            popen = _popen(spec, fds)
        except BaseException:
            _close_all(fds.parent())
            raise
        finally:
            _close_all(fds.child)
        try:
            # Opened before anything reaps the child, so it always refers to this process.
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            signal_group(popen.pid, signal.SIGKILL)
            popen.wait()  # at once: it was just killed
            _close_all(fds.parent())
            raise
        return cls(spec, popen, pidfd, fds, buffer)

    @property
    def tag(self) -> str | None:
        return self.spec.tag

    @property
    def is_pty(self) -> bool:
        return self._fds.master is not None

    @property
    def running(self) -> bool:
        """Until the end event is published (the process exited and its output drained)."""
        return self.end is None

    @property
    def leader_alive(self) -> bool:
        """Whether the process itself is not reaped yet, so its pid is still surely ours."""
        return self._popen.returncode is None

    def subscribe(self) -> Subscription:
        """A new subscription to this process's future events (none once it has ended)."""
        return self._fanout.subscribe()

    def unsubscribe(self, sub: Subscription) -> None:
        self._fanout.unsubscribe(sub)

    async def run(self) -> EndInfo:
        """Pump output until the process exits and its output is drained; publish the end.

        If cancelled (envd shutting down), subscribers still get an end event.
        """
        readers = self._start_readers()
        end = SHUTDOWN_END
        try:
            returncode = await _exited(self._popen, self._pidfd)
            if readers:
                await asyncio.wait([r.done for r in readers], timeout=DRAIN_GRACE_S)
            end = describe_exit(returncode)
        finally:
            for reader in readers:
                reader.stop()
            if self._writer is not None:
                self._writer.close()
            self._popen.poll()  # cancelled: reaps it if it has exited meanwhile (never waits)
            _close_all([*self._fds.parent(), self._pidfd])
            self._finish(end)
        return end

    def _start_readers(self) -> list[FdReader]:
        streams: list[tuple[int | None, StreamName]] = [
            (self._fds.stdout, "stdout"),
            (self._fds.stderr, "stderr"),
            (self._fds.master, "pty"),
        ]
        return [FdReader(fd, self._output(name)) for fd, name in streams if fd is not None]

    def _output(self, stream: StreamName) -> Callable[[bytes], None]:
        def publish(data: bytes) -> None:
            self._fanout.publish(Output(stream, data))

        return publish

    def _finish(self, end: EndInfo) -> None:
        self.end = end
        self.ended_at = time.monotonic()
        self._fanout.publish(end)

    async def write(self, data: bytes) -> None:
        """Feed `data` to the process's stdin pipe or terminal.

        :raise InvalidArgument: it has no stdin pipe, or its input is closed.
        """
        if self._writer is None:
            raise InvalidArgument("the process was started without stdin (set stdin=true)")
        try:
            await self._writer.write(data)
        except InputClosed:
            raise InvalidArgument("the process's input is closed") from None

    async def close_stdin(self) -> None:
        """Close the stdin pipe, or send ^D (end of input) to a terminal.

        :raise InvalidArgument: it has no stdin pipe.
        """
        if self._writer is None:
            raise InvalidArgument("the process was started without stdin (set stdin=true)")
        if self.is_pty:
            await self.write(pty.EOF_CHAR)
        else:
            self._writer.close()

    def signal(self, sig: int) -> None:
        """Send `sig` to the process's whole process group."""
        signal_group(self.pid, sig)

    def resize(self, cols: int, rows: int) -> None:
        """:raise InvalidArgument: the process has no PTY, or the size is zero."""
        if self._fds.master is None or not self.running:
            raise InvalidArgument("the process has no PTY to resize")
        if cols <= 0 or rows <= 0:
            raise InvalidArgument("PTY size must be at least 1x1")
        pty.set_size(self._fds.master, cols, rows)
