"""Processes in a capsule through envd's `process.Process` service: one-shot exec, streamed
exec, background processes, listing, signals, stdin, and re-attaching.

Every call goes over the streaming pool (the seed puts the whole process service there); unary
RPCs still carry the 2-minute bound as a Connect timeout. A process outlives the stream that
started it: envd owns it until it exits or is signalled.
"""

from __future__ import annotations

import logging
import secrets
import signal as signals
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio
from protobuf import Oneof

from nestbox.hostagent.envdconn.errors import (
    DeadlineExceeded,
    EnvdCallError,
    InvalidRequest,
    Unavailable,
)
from nestbox.hostagent.envdconn.events import Ended, EventStream, Output, open_event_stream
from nestbox.hostagent.envdconn.transport import OpsBase
from nestbox.protocol.gen.process.process_pb import (
    PTY,
    CloseStdinRequest,
    ConnectRequest,
    ListRequest,
    ProcessConfig,
    ProcessInput,
    ProcessSelector,
    SendInputRequest,
    SendSignalRequest,
    Signal,
    StartRequest,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

log = logging.getLogger(__name__)

MAX_EXEC_OUTPUT = 16 * 1024 * 1024
"""Bytes of stdout (and of stderr) `exec` keeps; the rest is dropped and `truncated` set."""
KILL_GRACE_S = 5.0

Selector = int | str
"""A process by pid (int) or tag (str)."""
SIGNALS: dict[str, Signal] = {"SIGKILL": Signal.SIGKILL, "SIGTERM": Signal.SIGTERM}


@dataclass(frozen=True, slots=True)
class ExecResult:
    pid: int
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: int
    status: str = ""
    """envd's account of the end, e.g. "exit status 1" or "signal: killed"."""
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class ProcessView:
    pid: int
    tag: str | None
    cmd: str
    args: tuple[str, ...]
    envs: dict[str, str]
    cwd: str | None


@dataclass(frozen=True, slots=True)
class BackgroundProcess:
    pid: int
    tag: str


class ProcessOps(OpsBase):
    """The process half of `CapsuleEnvd`."""

    async def exec(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout_s: float | None = 30.0,
        max_output: int = MAX_EXEC_OUTPUT,
    ) -> ExecResult:
        """Run `cmd args...` to its end and collect its output.

        After `timeout_s` seconds the process is SIGKILLed and `DeadlineExceeded` raised.
        :raise EnvdCallError: envd refused the command or the stream broke.
        """
        started = time.monotonic()
        out, err = _Capture(max_output), _Capture(max_output)
        request = start_request(cmd, args, envs, cwd, tag=None)
        async with self._open_start(request, user) as events:
            with anyio.move_on_after(timeout_s) as scope:
                async for event in events:
                    if isinstance(event, Output):
                        (err if event.stream == "stderr" else out).add(event.data)
        if scope.cancelled_caught:
            await self._kill_quietly(events.pid)
            raise DeadlineExceeded(f"{cmd!r} did not finish within {timeout_s} s")
        end = _require_end(events)
        return ExecResult(
            pid=events.pid,
            exit_code=end.exit_code,
            stdout=out.value(),
            stderr=err.value(),
            duration_ms=int((time.monotonic() - started) * 1000),
            status=end.status,
            truncated=out.truncated or err.truncated,
        )

    def exec_stream(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
    ) -> AbstractAsyncContextManager[EventStream]:
        """`async with envd.exec_stream(cmd) as events:` — `Started`, `Output`..., `Ended`."""
        return self._open_start(start_request(cmd, args, envs, cwd, tag=tag), user)

    async def start_background(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        tag: str | None = None,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
    ) -> BackgroundProcess:
        """Start a process that runs on after this call; `tag` defaults to `proc-<8 hex>`.
        With `stdin` it reads a pipe that `send_stdin` feeds (else /dev/null)."""
        tag = tag or f"proc-{secrets.token_hex(4)}"
        request = start_request(cmd, args, envs, cwd, tag=tag, stdin=stdin)
        async with self._open_start(request, user) as ev:
            return BackgroundProcess(pid=ev.pid, tag=tag)

    async def list_processes(self) -> list[ProcessView]:
        """The processes envd runs right now."""
        response = await self._unary(self._conn.pools().process.list, ListRequest())
        return [_view(info.pid, info.tag, info.config) for info in response.processes]

    async def kill_process(self, selector: Selector, signal: str = "SIGKILL") -> None:
        """Send SIGKILL (default) or SIGTERM. :raise NotFound: no such running process."""
        request = SendSignalRequest(process=selector_of(selector), signal=_signal(signal))
        await self._unary(self._conn.pools().process.send_signal, request)

    async def send_stdin(self, selector: Selector, data: bytes) -> None:
        """Write to a process's stdin (started with stdin open). :raise NotFound:"""
        request = SendInputRequest(
            process=selector_of(selector), input=process_input("stdin", data)
        )
        await self._unary(self._conn.pools().process.send_input, request)

    async def close_stdin(self, selector: Selector) -> None:
        await self._unary(
            self._conn.pools().process.close_stdin, CloseStdinRequest(process=selector_of(selector))
        )

    def connect_process(self, selector: Selector) -> AbstractAsyncContextManager[EventStream]:
        """Re-attach to a process's output: `Started`, then what it prints from now, `Ended`.
        A process that has ended gives `Started` and its `Ended`."""
        pools = self._conn.pools()
        tag = selector if isinstance(selector, str) else None
        responses = pools.process.connect(
            ConnectRequest(process=selector_of(selector)), headers=self._conn.headers()
        )
        return open_event_stream(responses, tag)

    # ---- shared with the PTY half -------------------------------------------------------

    def _open_start(
        self, request: StartRequest, user: str | None
    ) -> AbstractAsyncContextManager[EventStream]:
        pools = self._conn.pools()
        tag = request.tag if request.has_field("tag") else None
        responses = pools.process_start.start(request, headers=self._conn.headers(user))
        return open_event_stream(responses, tag)

    async def _kill_quietly(self, pid: int) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_GRACE_S):
            try:
                await self.kill_process(pid)
            except EnvdCallError as err:
                log.debug("could not kill pid %d after its deadline: %s", pid, err)


class _Capture:
    """Output kept up to a limit."""

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._room = limit
        self.truncated = False

    def add(self, data: bytes) -> None:
        if len(data) > self._room:
            data, self.truncated = data[: self._room], True
        self._room -= len(data)
        if data:
            self._parts.append(data)

    def value(self) -> bytes:
        return b"".join(self._parts)


def _require_end(events: EventStream) -> Ended:
    if events.ended is None:
        raise Unavailable("envd's process stream ended before the process did")
    return events.ended


def start_request(
    cmd: str,
    args: Sequence[str],
    envs: Mapping[str, str] | None,
    cwd: str | None,
    *,
    tag: str | None,
    pty: PTY | None = None,
    stdin: bool = False,
) -> StartRequest:
    config = ProcessConfig(cmd=cmd, args=list(args), envs=dict(envs or {}), cwd=cwd or None)
    return StartRequest(process=config, tag=tag, pty=pty, stdin=True if stdin else None)


def selector_of(selector: Selector) -> ProcessSelector:
    if isinstance(selector, int):
        by_pid: Oneof[Literal["pid"], int] = Oneof("pid", selector)
        return ProcessSelector(selector=by_pid)
    if not selector:
        raise InvalidRequest("a process selector (pid or tag) is required")
    by_tag: Oneof[Literal["tag"], str] = Oneof("tag", selector)
    return ProcessSelector(selector=by_tag)


def process_input(kind: Literal["stdin", "pty"], data: bytes) -> ProcessInput:
    if kind == "stdin":
        stdin: Oneof[Literal["stdin"], bytes] = Oneof("stdin", data)
        return ProcessInput(input=stdin)
    pty: Oneof[Literal["pty"], bytes] = Oneof("pty", data)
    return ProcessInput(input=pty)


def _signal(name: str) -> Signal:
    """`SIGKILL`/`KILL`/`9` and `SIGTERM`/`TERM`/`15`, any case. :raise InvalidRequest:"""
    key = name.strip().upper()
    if key.isdigit():
        key = signals.Signals(int(key)).name if int(key) in (9, 15) else key
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return SIGNALS[key]
    except KeyError:
        raise InvalidRequest(f"signal must be SIGKILL or SIGTERM, not {name!r}") from None


def _view(pid: int, tag: str | None, config: ProcessConfig | None) -> ProcessView:
    config = config or ProcessConfig()
    return ProcessView(
        pid=pid,
        tag=tag or None,
        cmd=config.cmd,
        args=tuple(config.args),
        envs=dict(config.envs),
        cwd=config.cwd if config.has_field("cwd") else None,
    )
