"""The table of processes envd started, by pid and by tag, and who owns their pump tasks.

The registry owns every process: each one's `run()` pump is a task the registry created and
awaits in `aclose()`, never a stream handler's. Ended processes stay findable (by Connect, which
then replays the end event) for `RETAIN_S` seconds, at most `RETAIN_MAX` of them.

On `aclose()` (envd shutdown) every process still running is killed with its whole process
group, and the session of each started process is swept for stragglers (job-control groups,
background children that outlived their parent), so nothing envd started outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import anyio.to_thread

from nestbox.envd.errors import AlreadyExists, NotFound, StartFailed
from nestbox.envd.process.proc import ManagedProcess
from nestbox.envd.process.signals import PROC, kill_session, signal_group

if TYPE_CHECKING:
    from nestbox.envd.process.fanout import Subscription
    from nestbox.envd.process.proc import ProcessSpec
    from nestbox.envd.settings import EnvdSettings

log = logging.getLogger(__name__)

RETAIN_S = 60.0
"""How long an ended process's end event stays available to Connect."""
RETAIN_MAX = 256
"""How many ended processes are kept at most."""
SHUTDOWN_GRACE_S = 5.0
"""How long `aclose()` waits for killed processes' pumps to finish before cancelling them."""


class ProcessRegistry:
    """Processes by pid and tag. All access happens on the event loop, so no lock is needed:
    the only await between checking a tag and recording it is the spawn, and the tag is held in
    `_reserved` across it."""

    def __init__(self, settings: EnvdSettings) -> None:
        self._buffer = settings.stream_buffer
        self._procs: dict[int, ManagedProcess] = {}  # running and retained ended, by pid
        self._tags: dict[str, ManagedProcess] = {}  # the latest process started with each tag
        self._reserved: set[str] = set()  # tags of processes being spawned right now
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self, spec: ProcessSpec) -> tuple[ManagedProcess, Subscription]:
        """Start a process and subscribe to it before any of its output is read.

        :raise AlreadyExists: a running process has this tag.
        :raise StartFailed: it could not start, or envd is shutting down.
        """
        if self._closing:
            raise StartFailed("envd is shutting down")
        self._reserve(spec.tag)
        try:
            proc = await ManagedProcess.spawn(spec, buffer=self._buffer)
        except OSError as err:
            reason = (err.strerror or "error").lower()
            raise StartFailed(f"cannot start {spec.cmd!r}: {reason}") from err
        except subprocess.SubprocessError as err:  # the PTY set-up in the child failed
            raise StartFailed(f"cannot start {spec.cmd!r} on a terminal") from err
        finally:
            if spec.tag is not None:
                self._reserved.discard(spec.tag)
        sub = proc.subscribe()
        self._adopt(proc)
        log.info("process %d (%s) started", proc.pid, spec.cmd,
                 extra={"pid": proc.pid, "cmd": spec.cmd, "tag": spec.tag or ""})  # fmt: skip
        return proc, sub

    def _reserve(self, tag: str | None) -> None:
        if tag is None:
            return
        current = self._tags.get(tag)
        if tag in self._reserved or (current is not None and current.running):
            raise AlreadyExists(f"a running process already has tag {tag!r}")
        self._reserved.add(tag)

    def _adopt(self, proc: ManagedProcess) -> None:
        self._purge()
        self._procs[proc.pid] = proc
        if proc.tag is not None:
            self._tags[proc.tag] = proc
        task = asyncio.get_running_loop().create_task(self._pump(proc), name=f"proc-{proc.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._closing:  # aclose() ran during the spawn and did not see this process
            signal_group(proc.pid, signal.SIGKILL)

    async def _pump(self, proc: ManagedProcess) -> None:
        try:
            end = await proc.run()
        except Exception:
            log.exception("pump of process %d failed", proc.pid)
            return
        fields = {"pid": proc.pid, "cmd": proc.spec.cmd, "exit_code": end.exit_code}
        log.info("process %d (%s) ended: %s", proc.pid, proc.spec.cmd, end.status, extra=fields)

    def lookup(self, selector: int | str) -> ManagedProcess:
        """The process with this pid (an int) or tag (a str), running or recently ended.

        :raise NotFound: there is none.
        """
        self._purge()
        proc = self._procs.get(selector) if isinstance(selector, int) else self._tags.get(selector)
        if proc is None:
            kind = "pid" if isinstance(selector, int) else "tag"
            raise NotFound(f"no process with {kind} {selector!r}")
        return proc

    def running(self) -> list[ManagedProcess]:
        return [p for p in self._procs.values() if p.running]

    def _purge(self) -> None:
        """Forget ended processes older than RETAIN_S, and the oldest beyond RETAIN_MAX."""
        now = time.monotonic()
        ended = sorted(
            (p for p in self._procs.values() if p.ended_at is not None),
            key=lambda p: p.ended_at or 0.0,
        )
        excess = len(ended) - RETAIN_MAX
        for i, proc in enumerate(ended):
            if i < excess or now - (proc.ended_at or now) > RETAIN_S:
                self._forget(proc)

    def _forget(self, proc: ManagedProcess) -> None:
        if self._procs.get(proc.pid) is proc:
            del self._procs[proc.pid]
        if proc.tag is not None and self._tags.get(proc.tag) is proc:
            del self._tags[proc.tag]

    async def aclose(self) -> None:
        """Kill everything envd started (SIGKILL to groups and sessions) and end the pumps."""
        self._closing = True
        sessions = []
        for proc in self._procs.values():
            if proc.leader_alive:
                signal_group(proc.pid, signal.SIGKILL)
            sessions.append((proc.pid, proc.leader_alive))
        if sessions:
            await anyio.to_thread.run_sync(_sweep, sessions)
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _sweep(sessions: list[tuple[int, bool]]) -> None:
    """SIGKILL what is left of each session (blocking: `/proc` reads; runs in a thread).

    A session whose leader is already reaped is swept only while no process has the leader's
    pid: a live member would pin that pid, so a process holding it means the pid was reused and
    the session is gone.
    """
    for sid, leader_alive in sessions:
        if not leader_alive and (PROC / str(sid)).exists():
            continue
        try:
            kill_session(sid)
        except OSError as err:
            log.warning("could not sweep session %d: %s", sid, os.strerror(err.errno or 0))
