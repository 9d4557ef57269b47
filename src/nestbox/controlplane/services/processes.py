"""Commands and processes in a capsule: one-shot exec, background processes, listing and
signalling them, and the streams behind the WebSocket routes (exec stream, re-attach, PTY).

Everything goes through the capsule's host agent; the capsule must be running (else
`invalid_state`). Streams are handed out as async iterators of `ProcessEvent`s; the API layer
turns them into WebSocket frames.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from protobuf import Oneof

from nestbox.controlplane.errors import InvalidRequest
from nestbox.protocol.capsules import (
    BackgroundView,
    ExecResultView,
    ProcessListView,
    ProcessView,
)
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Target, Targets
    from nestbox.protocol.capsules import ExecCreate

DEFAULT_TIMEOUT_S = 30
SIGNALS = {"SIGKILL": "SIGKILL", "SIGTERM": "SIGTERM", "KILL": "SIGKILL", "TERM": "SIGTERM",
           "9": "SIGKILL", "15": "SIGTERM"}  # fmt: skip
"""The signals a caller may name (any case), and the one the agent is sent."""

Selector = Oneof[Literal["pid"], int] | Oneof[Literal["tag"], str]


PID = re.compile(r"[0-9]{1,10}")


def selector(value: str) -> Selector:
    """A process by pid (ASCII digits, all of it) or tag (anything else)."""
    if PID.fullmatch(value):
        return Oneof[Literal["pid"], int]("pid", int(value))
    return Oneof[Literal["tag"], str]("tag", value)


def encode_output(stdout: bytes, stderr: bytes) -> tuple[str, str, Literal["utf-8", "base64"]]:
    """Both streams as UTF-8 text, or both base64 if either is not valid UTF-8."""
    try:
        return stdout.decode("utf-8"), stderr.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        b64 = base64.b64encode
        return b64(stdout).decode(), b64(stderr).decode(), "base64"


@dataclass(frozen=True, slots=True)
class PtyStart:
    """A new terminal (`cmd` set) or a re-attach to `tag` (`cmd` None)."""

    cmd: str | None
    args: Sequence[str] = ()
    tag: str = ""
    cols: int = 80
    rows: int = 24
    envs: Mapping[str, str] | None = None
    cwd: str | None = None
    user: str | None = None


class ProcessService:
    def __init__(self, targets: Targets) -> None:
        self._targets = targets

    async def exec(
        self, principal: Principal, capsule_id: str, req: ExecCreate
    ) -> ExecResultView | BackgroundView:
        target = await self._targets.running(principal, capsule_id)
        envs, cwd = dict(req.envs or {}), req.cwd or ""
        if req.background:
            started = await target.agent.start_background(pb.StartBackgroundRequest(
                capsule_id=capsule_id, cmd=req.cmd, args=req.args, envs=envs, cwd=cwd,
                tag=req.tag or "", user=req.user or "", stdin=req.stdin,
            ))  # fmt: skip
            return BackgroundView(sandbox_id=capsule_id, cmd=req.cmd, pid=started.pid,
                                  tag=started.tag)  # fmt: skip
        done = await target.agent.exec(pb.ExecRequest(
            capsule_id=capsule_id, cmd=req.cmd, args=req.args, envs=envs, cwd=cwd,
            timeout_sec=req.timeout_sec or DEFAULT_TIMEOUT_S, user=req.user or "",
        ))  # fmt: skip
        stdout, stderr, encoding = encode_output(done.stdout, done.stderr)
        return ExecResultView(
            sandbox_id=capsule_id, cmd=req.cmd, stdout=stdout, stderr=stderr,
            exit_code=done.exit_code, duration_ms=done.duration_ms, encoding=encoding,
        )  # fmt: skip

    async def list(self, principal: Principal, capsule_id: str) -> ProcessListView:
        target = await self._targets.running(principal, capsule_id)
        found = await target.agent.list_processes(capsule_id)
        return ProcessListView(processes=[
            ProcessView(pid=p.pid, tag=p.tag or None, cmd=p.cmd, args=list(p.args))
            for p in found
        ])  # fmt: skip

    async def kill(
        self, principal: Principal, capsule_id: str, which: str, signal: str | None
    ) -> None:
        """Signal a process by pid or tag (SIGKILL unless `signal` says SIGTERM)."""
        sig = SIGNALS.get(("SIGKILL" if signal is None else signal).upper())
        if sig is None:
            raise InvalidRequest("signal must be SIGKILL or SIGTERM")
        target = await self._targets.running(principal, capsule_id)
        await target.agent.kill_process(
            pb.KillProcessRequest(capsule_id=capsule_id, selector=selector(which), signal=sig)
        )

    # ── streams (the WebSocket routes) ──

    async def running(self, principal: Principal, capsule_id: str) -> Target:
        """The running capsule a stream will use (checked before a WebSocket is accepted)."""
        return await self._targets.running(principal, capsule_id)

    @staticmethod
    def exec_stream(
        target: Target,
        cmd: str,
        args: Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[pb.ExecStreamResponse]:
        return target.agent.exec_stream(pb.ExecStreamRequest(
            capsule_id=target.capsule.id, cmd=cmd, args=list(args), envs=dict(envs or {}),
            cwd=cwd or "", user=user or "",
        ))  # fmt: skip

    @staticmethod
    def connect(target: Target, which: str) -> AsyncIterator[pb.ConnectProcessResponse]:
        return target.agent.connect_process(
            pb.ConnectProcessRequest(capsule_id=target.capsule.id, selector=selector(which))
        )

    @staticmethod
    def pty_attach(target: Target, start: PtyStart) -> AsyncIterator[pb.PtyAttachResponse]:
        return target.agent.pty_attach(pb.PtyAttachRequest(
            capsule_id=target.capsule.id, cmd=start.cmd or "", args=list(start.args),
            tag=start.tag, cols=start.cols, rows=start.rows, envs=dict(start.envs or {}),
            cwd=start.cwd or "", user=start.user or "",
        ))  # fmt: skip
