"""`FakeAgent`: an in-process host agent with canned behaviour, implementing the generated
`HostAgentService` protocol (so mypy checks it against the contract), served over real HTTP/1.1
on loopback by `serve_fake_agent()` with the agent's credential checks (RPCs: `X-Agent-Token`;
the tiny `/proxy/{id}/{port}/...` endpoint: `X-Nestbox-Proxy-Token`, each refusing the other).

Capsules, processes, terminals and files live in dicts. Commands are not run: `exec` answers
what the script asks for (`echo X`, `exit N`, `printenv NAME`, `pwd`, `binary`), records the
request, and background processes live until killed. Errors carry the `ErrorInfo` detail the
real agent sends, so the control plane's code mapping is exercised for real.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.gen.hostagent.v1.hostagent_connect import (
    HostAgentService,
    HostAgentServiceASGIApplication,
)
from nestbox.protocol.hosts import AGENT_TOKEN_HEADER, PROXY_TOKEN_HEADER
from tests.conftest import free_port
from tests.integration.asgi_server import serve

MAX_BUFFERED = 100 * 1024 * 1024
CODES = {
    "invalid_request": Code.INVALID_ARGUMENT, "not_found": Code.NOT_FOUND,
    "conflict": Code.ALREADY_EXISTS, "invalid_state": Code.FAILED_PRECONDITION,
    "too_large": Code.RESOURCE_EXHAUSTED, "unavailable": Code.UNAVAILABLE,
}  # fmt: skip


def fail(code: str, message: str) -> ConnectError:
    return ConnectError(CODES[code], message, details=[pb.ErrorInfo(code=code)])


def event(kind: str, value: Any) -> pb.ProcessEvent:
    return pb.ProcessEvent(event=Oneof(kind, value))  # type: ignore[arg-type]  # any of the five


@dataclass
class FakeProcess:
    pid: int
    tag: str
    cmd: str
    args: list[str]
    stdin: bool = False
    stdin_data: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False


@dataclass
class FakePty:
    tag: str
    pid: int
    send: MemoryObjectSendStream[pb.ProcessEvent]
    receive: MemoryObjectReceiveStream[pb.ProcessEvent]
    size: tuple[int, int] = (80, 24)


@dataclass
class FakeCapsule:
    capsule_id: str
    template: str
    team_id: str
    vcpus: int
    memory_mb: int
    state: pb.CapsuleState = pb.CapsuleState.RUNNING
    host_ip: str = ""
    last_active_ms: int = 0
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    ptys: dict[str, FakePty] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {"/", "/root", "/tmp"})
    idle_timeout_sec: int = 0
    egress: bool = False
    egress_allow: list[str] = field(default_factory=list)
    kind: pb.TemplateKind = pb.TemplateKind.SNAPSHOT
    logs: list[pb.LogEntry] = field(default_factory=list)
    """What GetCapsuleLogs answers (envd's ring, as the agent checked it)."""
    watchers: list[tuple[str, MemoryObjectSendStream[tuple[str, str]]]] = field(
        default_factory=list
    )

    def view(self) -> pb.Capsule:
        running = self.state == pb.CapsuleState.RUNNING
        return pb.Capsule(
            capsule_id=self.capsule_id, state=self.state, template_id=self.template,
            team_id=self.team_id, vcpus=self.vcpus, memory_mb=self.memory_mb,
            host_ip=self.host_ip if running else "", guest_ip="169.254.0.21" if running else "",
            created_at_unix_ms=1, last_active_at_unix_ms=self.last_active_ms,
            metadata={"agent_version": "fake", "accel": "none"},
            idle_timeout_sec=self.idle_timeout_sec, egress=self.egress,
            egress_allow=self.egress_allow, template_kind=self.kind,
        )  # fmt: skip

    def notify(self, path: str, kind: str) -> None:
        """What envd's watch sees: `kind` of `path`, for watchers of its directory."""
        parent, _, name = path.rpartition("/")
        for watched, send in list(self.watchers):
            if watched.rstrip("/") == parent:
                with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError,
                                         anyio.ClosedResourceError):  # fmt: skip
                    send.send_nowait((kind, name))


class FakeAgent(HostAgentService):
    """The agent's capsules and canned answers. `token` is what it accepts in X-Agent-Token for
    RPCs, `proxy_token` what it accepts in X-Nestbox-Proxy-Token for /proxy/."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.token = ""
        self.proxy_token = ""
        self.address = ""
        self.templates: dict[str, tuple[int, int]] = {
            "minimal": (1, 256), "base": (1, 512), "minimal-base": (1, 256),
        }  # fmt: skip
        self.template_sizes: dict[str, int] = {}
        """What a create says its template takes on this host (absent: 0, not said)."""
        self.base_templates: set[str] = {"minimal-base"}
        """Base templates: a capsule gets the size its create asks for (else the shape)."""
        self.capsules: dict[str, FakeCapsule] = {}
        self.auto_paused: list[str] = []
        self.exec_requests: list[pb.ExecRequest] = []
        self.calls: list[str] = []
        self.fail_create: str | None = None
        self.create_hook: Callable[[pb.CreateCapsuleRequest], Awaitable[None]] | None = None
        """Set: a create awaits it before it does anything (e.g. to hold it in flight). A hook
        and not a replaced method: the RPC app binds the service's methods at its first call."""
        self.create_requests: list[pb.CreateCapsuleRequest] = []
        self.stream_requests: list[pb.ExecStreamRequest] = []
        self.stream_hook: (
            Callable[[pb.ExecStreamRequest], AsyncIterator[pb.ExecStreamResponse]] | None
        ) = None
        """Set: ExecStream answers what it yields (the template builder's tests)."""
        self.exec_hook: Callable[[pb.ExecRequest], tuple[bytes, bytes, int] | None] | None = None
        """Set: Exec answers (stdout, stderr, exit code) it returns, or the script when None."""
        self.fail_fork: str | None = None
        self.forks: list[pb.ForkCapsuleRequest] = []
        self._next_pid = 100
        self._next_ip = 2

    # ── helpers ──

    def _capsule(self, capsule_id: str, *, running: bool = True) -> FakeCapsule:
        capsule = self.capsules.get(capsule_id)
        if capsule is None:
            raise fail("not_found", f"capsule {capsule_id} does not exist")
        if running and capsule.state != pb.CapsuleState.RUNNING:
            raise fail("invalid_state", f"capsule {capsule_id} is not running")
        capsule.last_active_ms = int(time.time() * 1000)
        return capsule

    def _pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def close(self) -> None:
        """Close what terminals are left (their streams would warn when collected)."""
        for capsule in self.capsules.values():
            for pty in capsule.ptys.values():
                pty.send.close()
                pty.receive.close()

    def auto_pause(self, capsule_id: str) -> None:
        """What the idle reaper does."""
        self.capsules[capsule_id].state = pb.CapsuleState.PAUSED
        self.auto_paused.append(capsule_id)

    # ── lifecycle ──

    async def create_capsule(
        self, request: pb.CreateCapsuleRequest, ctx: Any
    ) -> pb.CreateCapsuleResponse:
        if self.create_hook is not None:
            await self.create_hook(request)
        self.calls.append("create")
        self.create_requests.append(request)
        if self.fail_create:
            raise fail(self.fail_create, "canned create failure")
        shape = self.templates.get(request.template)
        if shape is None:
            raise fail("not_found", f"template {request.template} does not exist")
        if request.capsule_id in self.capsules:
            raise fail("conflict", f"capsule {request.capsule_id} exists")
        self._next_ip += 1
        if request.template in self.base_templates:
            shape = (request.vcpus or shape[0], request.memory_mb or shape[1])
        capsule = FakeCapsule(
            request.capsule_id, request.template, request.team_id, shape[0], shape[1],
            host_ip=f"10.99.0.{self._next_ip}", last_active_ms=int(time.time() * 1000),
            idle_timeout_sec=request.idle_timeout_sec, egress=request.egress,
            egress_allow=list(request.egress_allow),
            kind=pb.TemplateKind.BASE if request.template in self.base_templates
            else pb.TemplateKind.SNAPSHOT,
        )  # fmt: skip
        self.capsules[capsule.capsule_id] = capsule
        return pb.CreateCapsuleResponse(
            capsule=capsule.view(), template_size_bytes=self.template_sizes.get(request.template, 0)
        )

    async def destroy_capsule(
        self, request: pb.DestroyCapsuleRequest, ctx: Any
    ) -> pb.DestroyCapsuleResponse:
        self.calls.append("destroy")
        self._capsule(request.capsule_id, running=False)
        del self.capsules[request.capsule_id]
        return pb.DestroyCapsuleResponse()

    async def pause_capsule(
        self, request: pb.PauseCapsuleRequest, ctx: Any
    ) -> pb.PauseCapsuleResponse:
        capsule = self._capsule(request.capsule_id)
        capsule.state = pb.CapsuleState.PAUSED
        return pb.PauseCapsuleResponse(capsule=capsule.view())

    async def resume_capsule(
        self, request: pb.ResumeCapsuleRequest, ctx: Any
    ) -> pb.ResumeCapsuleResponse:
        capsule = self._capsule(request.capsule_id, running=False)
        if capsule.state != pb.CapsuleState.PAUSED:
            raise fail("invalid_state", "not paused")
        capsule.state = pb.CapsuleState.RUNNING
        return pb.ResumeCapsuleResponse(capsule=capsule.view())

    async def list_capsules(
        self, request: pb.ListCapsulesRequest, ctx: Any
    ) -> pb.ListCapsulesResponse:
        auto, self.auto_paused = self.auto_paused, []
        return pb.ListCapsulesResponse(capsules=[c.view() for c in self.capsules.values()],
                                       auto_paused_ids=auto)  # fmt: skip

    async def ping_capsule(
        self, request: pb.PingCapsuleRequest, ctx: Any
    ) -> pb.PingCapsuleResponse:
        self._capsule(request.capsule_id)
        return pb.PingCapsuleResponse()

    async def set_idle_timeout(
        self, request: pb.SetIdleTimeoutRequest, ctx: Any
    ) -> pb.SetIdleTimeoutResponse:
        capsule = self._capsule(request.capsule_id, running=False)
        capsule.idle_timeout_sec = request.idle_timeout_sec
        return pb.SetIdleTimeoutResponse(capsule=capsule.view())

    async def fork_capsule(
        self, request: pb.ForkCapsuleRequest, ctx: Any
    ) -> pb.ForkCapsuleResponse:
        """Copies with the source's files and processes (what a real fork carries over)."""
        self.calls.append("fork")
        source = self._capsule(request.capsule_id)
        self.forks.append(request)
        if self.fail_fork:
            raise fail(self.fail_fork, "canned fork failure")
        copies = []
        for cid in request.capsule_ids:
            self._next_ip += 1
            copy = FakeCapsule(
                cid, source.template, source.team_id, source.vcpus, source.memory_mb,
                host_ip=f"10.99.0.{self._next_ip}", last_active_ms=int(time.time() * 1000),
                processes={pid: replace(p, stdin_data=bytearray())
                           for pid, p in source.processes.items()},
                files=dict(source.files), dirs=set(source.dirs),
                idle_timeout_sec=source.idle_timeout_sec,
            )  # fmt: skip
            self.capsules[cid] = copy
            copies.append(copy.view())
        return pb.ForkCapsuleResponse(capsules=copies, paused_ms=7, quiesced_ms=9)

    async def get_capsule_metrics(
        self, request: pb.GetCapsuleMetricsRequest, ctx: Any
    ) -> pb.GetCapsuleMetricsResponse:
        return pb.GetCapsuleMetricsResponse()

    async def get_capsule_logs(
        self, request: pb.GetCapsuleLogsRequest, ctx: Any
    ) -> pb.GetCapsuleLogsResponse:
        capsule = self._capsule(request.capsule_id)
        found = [e for e in capsule.logs if e.ts_unix_ms >= request.start_unix_ms]
        return pb.GetCapsuleLogsResponse(entries=found[: request.limit or len(found)])

    # ── processes ──

    def _run(self, capsule: FakeCapsule, request: pb.ExecRequest) -> tuple[bytes, bytes, int]:
        script = request.args[-1] if request.args else request.cmd
        try:
            words = shlex.split(script) if script else []
        except ValueError:  # a script the shell cannot parse fails there, not the agent's RPC
            return b"", f"sh: syntax error: {script}\n".encode(), 2
        verb, rest = (words[0], words[1:]) if words else ("", [])
        if verb == "echo":
            return (" ".join(rest) + "\n").encode(), b"", 0
        if verb == "exit":
            return b"", b"bye\n", int(rest[0])
        if verb == "printenv":
            return (request.envs.get(rest[0], "") + "\n").encode(), b"", 0
        if verb == "pwd":
            return ((request.cwd or "/root") + "\n").encode(), b"", 0
        if verb == "binary":
            return b"\xff\xfe\x00bin", b"", 0
        return f"ran {script}\n".encode(), b"", 0

    async def exec(self, request: pb.ExecRequest, ctx: Any) -> pb.ExecResponse:
        capsule = self._capsule(request.capsule_id)
        self.exec_requests.append(request)
        hooked = self.exec_hook(request) if self.exec_hook is not None else None
        stdout, stderr, code = hooked or self._run(capsule, request)
        return pb.ExecResponse(stdout=stdout, stderr=stderr, exit_code=code, pid=self._pid(),
                               duration_ms=3, status="exited")  # fmt: skip

    async def exec_stream(
        self, request: pb.ExecStreamRequest, ctx: Any
    ) -> AsyncIterator[pb.ExecStreamResponse]:
        self._capsule(request.capsule_id)
        self.stream_requests.append(request)
        if self.stream_hook is not None:
            async for message in self.stream_hook(request):
                yield message
            return
        yield pb.ExecStreamResponse(
            event=event("started", pb.ProcessEvent.Started(pid=self._pid()))
        )
        for chunk in (b"line1\n", "é".encode()[:1], "é".encode()[1:] + b"\n", b"line3\n"):
            yield pb.ExecStreamResponse(event=event("stdout", chunk))
            await anyio.sleep(0.01)
        yield pb.ExecStreamResponse(event=event("stderr", b"warn\n"))
        yield pb.ExecStreamResponse(
            event=event("exited", pb.ProcessEvent.Exited(exit_code=3, exited=True))
        )

    async def start_background(
        self, request: pb.StartBackgroundRequest, ctx: Any
    ) -> pb.StartBackgroundResponse:
        capsule = self._capsule(request.capsule_id)
        pid = self._pid()
        tag = request.tag or f"proc-{secrets.token_hex(4)}"
        capsule.processes[pid] = FakeProcess(pid, tag, request.cmd, list(request.args),
                                             stdin=request.stdin)  # fmt: skip
        return pb.StartBackgroundResponse(pid=pid, tag=tag)

    async def list_processes(
        self, request: pb.ListProcessesRequest, ctx: Any
    ) -> pb.ListProcessesResponse:
        capsule = self._capsule(request.capsule_id)
        return pb.ListProcessesResponse(processes=[
            pb.ProcessInfo(pid=p.pid, tag=p.tag, cmd=p.cmd, args=p.args)
            for p in capsule.processes.values()
        ])  # fmt: skip

    def _process(self, capsule: FakeCapsule, selector: Any) -> FakeProcess:
        for p in capsule.processes.values():
            if (selector.field == "pid" and p.pid == selector.value) or (
                selector.field == "tag" and p.tag == selector.value
            ):
                return p
        raise fail("not_found", "no such process")

    async def kill_process(
        self, request: pb.KillProcessRequest, ctx: Any
    ) -> pb.KillProcessResponse:
        capsule = self._capsule(request.capsule_id)
        if request.signal not in ("SIGKILL", "SIGTERM"):
            raise fail("invalid_request", "bad signal")
        del capsule.processes[self._process(capsule, request.selector).pid]
        return pb.KillProcessResponse()

    def _stdin_of(self, capsule_id: str, selector: Any) -> FakeProcess:
        proc = self._process(self._capsule(capsule_id), selector)
        if not proc.stdin or proc.stdin_closed:
            raise fail("invalid_request", "the process was started without stdin")
        return proc

    async def send_stdin(self, request: pb.SendStdinRequest, ctx: Any) -> pb.SendStdinResponse:
        self._stdin_of(request.capsule_id, request.selector).stdin_data += request.data
        return pb.SendStdinResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: Any) -> pb.CloseStdinResponse:
        self._stdin_of(request.capsule_id, request.selector).stdin_closed = True
        return pb.CloseStdinResponse()

    async def connect_process(
        self, request: pb.ConnectProcessRequest, ctx: Any
    ) -> AsyncIterator[pb.ConnectProcessResponse]:
        capsule = self._capsule(request.capsule_id)
        proc = self._process(capsule, request.selector)
        yield pb.ConnectProcessResponse(
            event=event("started", pb.ProcessEvent.Started(pid=proc.pid, tag=proc.tag))
        )
        yield pb.ConnectProcessResponse(event=event("stdout", b"attached\n"))
        yield pb.ConnectProcessResponse(
            event=event("exited", pb.ProcessEvent.Exited(exit_code=0, exited=True))
        )

    # ── terminals: input is echoed back as output ──

    async def pty_attach(
        self, request: pb.PtyAttachRequest, ctx: Any
    ) -> AsyncIterator[pb.PtyAttachResponse]:
        capsule = self._capsule(request.capsule_id)
        if request.cmd:
            send, receive = anyio.create_memory_object_stream[pb.ProcessEvent](256)
            tag = request.tag or f"pty-{secrets.token_hex(4)}"
            pty = capsule.ptys[tag] = FakePty(tag, self._pid(), send, receive,
                                             (request.cols, request.rows))  # fmt: skip
        else:
            pty = capsule.ptys.get(request.tag)  # type: ignore[assignment]
            if pty is None:
                raise fail("not_found", f"no terminal {request.tag}")
        yield pb.PtyAttachResponse(
            event=event("started", pb.ProcessEvent.Started(pid=pty.pid, tag=pty.tag))
        )
        async for ev in pty.receive:
            yield pb.PtyAttachResponse(event=ev)
            if ev.event is not None and ev.event.field == "exited":
                pty.receive.close()
                return

    def _pty(self, capsule_id: str, tag: str) -> FakePty:
        pty = self._capsule(capsule_id).ptys.get(tag)
        if pty is None:
            raise fail("not_found", f"no terminal {tag}")
        return pty

    async def pty_send_input(
        self, request: pb.PtySendInputRequest, ctx: Any
    ) -> pb.PtySendInputResponse:
        pty = self._pty(request.capsule_id, request.tag)
        await pty.send.send(event("pty", b"echo:" + request.data))
        return pb.PtySendInputResponse()

    async def pty_resize(self, request: pb.PtyResizeRequest, ctx: Any) -> pb.PtyResizeResponse:
        pty = self._pty(request.capsule_id, request.tag)
        pty.size = (request.cols, request.rows)
        await pty.send.send(event("pty", f"size:{request.cols}x{request.rows}".encode()))
        return pb.PtyResizeResponse()

    async def pty_kill(self, request: pb.PtyKillRequest, ctx: Any) -> pb.PtyKillResponse:
        pty = self._pty(request.capsule_id, request.tag)
        await pty.send.send(event("exited", pb.ProcessEvent.Exited(exit_code=137, exited=False)))
        pty.send.close()
        return pb.PtyKillResponse()

    # ── files ──

    def _entry(self, capsule: FakeCapsule, path: str) -> pb.FileEntry:
        if path in capsule.dirs:
            kind, size = "directory", 0
        elif path in capsule.files:
            kind, size = "file", len(capsule.files[path])
        else:
            raise fail("not_found", f"{path} does not exist")
        return pb.FileEntry(name=path.rstrip("/").rsplit("/", 1)[-1], path=path, type=kind,
                            size=size, mode=0o644, permissions="-rw-r--r--", owner="root",
                            group="root", modified_at=1700000000)  # fmt: skip

    async def write_file(self, request: pb.WriteFileRequest, ctx: Any) -> pb.WriteFileResponse:
        capsule = self._capsule(request.capsule_id)
        if len(request.content) > MAX_BUFFERED:
            raise fail("too_large", "over 100 MiB")
        kind = "write" if request.path in capsule.files else "create"
        capsule.files[request.path] = request.content
        capsule.notify(request.path, kind)
        return pb.WriteFileResponse(path=request.path)

    async def read_file(self, request: pb.ReadFileRequest, ctx: Any) -> pb.ReadFileResponse:
        capsule = self._capsule(request.capsule_id)
        if request.path not in capsule.files:
            raise fail("not_found", f"{request.path} does not exist")
        return pb.ReadFileResponse(content=capsule.files[request.path])

    async def write_file_stream(
        self, request: AsyncIterator[pb.WriteFileStreamRequest], ctx: Any
    ) -> pb.WriteFileStreamResponse:
        first = await anext(request)
        assert first.message is not None
        assert first.message.field == "meta"
        meta = first.message.value
        capsule = self._capsule(meta.capsule_id)
        size = 0
        digest = bytearray()
        async for message in request:
            assert message.message is not None
            assert message.message.field == "chunk"
            size += len(message.message.value)
            if len(digest) < 1024:
                digest += message.message.value[:1024]
        # Huge uploads are not kept whole: the first KiB and the size are enough to check.
        capsule.files[meta.path] = bytes(digest) if size > 1024 * 1024 else bytes(digest[:size])
        capsule.files[meta.path + ".size"] = str(size).encode()
        return pb.WriteFileStreamResponse(path=meta.path, bytes_written=size)

    async def read_file_stream(
        self, request: pb.ReadFileStreamRequest, ctx: Any
    ) -> AsyncIterator[pb.ReadFileStreamResponse]:
        capsule = self._capsule(request.capsule_id)
        if request.path == "/dev/big":
            for _ in range(64):
                yield pb.ReadFileStreamResponse(chunk=b"x" * 65536)
            return
        if request.path not in capsule.files:
            raise fail("not_found", f"{request.path} does not exist")
        data = capsule.files[request.path]
        for start in range(0, len(data), 65536):
            yield pb.ReadFileStreamResponse(chunk=data[start : start + 65536])

    async def watch_dir(
        self, request: pb.WatchDirRequest, ctx: Any
    ) -> AsyncIterator[pb.WatchDirResponse]:
        capsule = self._capsule(request.capsule_id)
        if request.path not in capsule.dirs:
            raise fail("not_found", f"{request.path} does not exist")
        send, receive = anyio.create_memory_object_stream[tuple[str, str]](64)
        watcher = (request.path, send)
        capsule.watchers.append(watcher)
        try:
            yield pb.WatchDirResponse(type="start")
            async with receive:
                while True:
                    # keepalives, as envd sends them: a caller that left is noticed at one
                    item = None
                    with anyio.move_on_after(0.2):
                        item = await receive.receive()
                    kind, name = item if item is not None else ("keepalive", "")
                    yield pb.WatchDirResponse(type=kind, name=name)
        finally:
            capsule.watchers.remove(watcher)
            send.close()

    async def list_dir(self, request: pb.ListDirRequest, ctx: Any) -> pb.ListDirResponse:
        capsule = self._capsule(request.capsule_id)
        if request.path not in capsule.dirs:
            raise fail("not_found", f"{request.path} does not exist")
        prefix = request.path.rstrip("/") + "/"
        names = [p for p in (*capsule.dirs, *capsule.files) if p.startswith(prefix)
                 and "/" not in p[len(prefix):] and p != request.path]  # fmt: skip
        return pb.ListDirResponse(entries=[self._entry(capsule, p) for p in sorted(names)])

    async def make_dir(self, request: pb.MakeDirRequest, ctx: Any) -> pb.MakeDirResponse:
        capsule = self._capsule(request.capsule_id)
        if request.path in capsule.dirs or request.path in capsule.files:
            raise fail("conflict", f"{request.path} exists")
        capsule.dirs.add(request.path)
        return pb.MakeDirResponse(entry=self._entry(capsule, request.path))

    async def remove_path(self, request: pb.RemovePathRequest, ctx: Any) -> pb.RemovePathResponse:
        capsule = self._capsule(request.capsule_id)
        self._entry(capsule, request.path)
        capsule.dirs.discard(request.path)
        capsule.files.pop(request.path, None)
        return pb.RemovePathResponse()

    async def stat(self, request: pb.StatRequest, ctx: Any) -> pb.StatResponse:
        capsule = self._capsule(request.capsule_id)
        return pb.StatResponse(entry=self._entry(capsule, request.path))

    async def move(self, request: pb.MoveRequest, ctx: Any) -> pb.MoveResponse:
        capsule = self._capsule(request.capsule_id)
        if request.source not in capsule.files:
            raise fail("not_found", f"{request.source} does not exist")
        capsule.files[request.destination] = capsule.files.pop(request.source)
        return pb.MoveResponse(entry=self._entry(capsule, request.destination))

    # ── templates ──

    async def create_template(
        self, request: pb.CreateTemplateRequest, ctx: Any
    ) -> pb.CreateTemplateResponse:
        capsule = self._capsule(request.capsule_id, running=False)
        if capsule.state not in (pb.CapsuleState.RUNNING, pb.CapsuleState.PAUSED):
            raise fail("invalid_state", "neither running nor paused")
        capsule.state = pb.CapsuleState.PAUSED
        self.templates[request.template_id] = (capsule.vcpus, capsule.memory_mb)
        if request.kind == pb.TemplateKind.BASE:
            self.base_templates.add(request.template_id)
        template = pb.Template(template_id=request.template_id, vcpus=capsule.vcpus,
                               memory_mb=capsule.memory_mb, default_user="root",
                               kind=request.kind or pb.TemplateKind.SNAPSHOT)  # fmt: skip
        if request.consume_capsule:
            del self.capsules[request.capsule_id]
            return pb.CreateTemplateResponse(template=template)
        return pb.CreateTemplateResponse(template=template, capsule=capsule.view())

    async def delete_template(
        self, request: pb.DeleteTemplateRequest, ctx: Any
    ) -> pb.DeleteTemplateResponse:
        if self.templates.pop(request.template_id, None) is None:
            raise fail("not_found", "no such template")
        return pb.DeleteTemplateResponse()

    # ── the agent ──

    async def ping(self, request: pb.PingRequest, ctx: Any) -> pb.PingResponse:
        return pb.PingResponse(agent_id=self.name, version="fake", accel="none")

    async def terminate(self, request: pb.TerminateRequest, ctx: Any) -> pb.TerminateResponse:
        self.calls.append("terminate")
        paused = []
        for capsule in self.capsules.values():
            if capsule.state == pb.CapsuleState.RUNNING:
                capsule.state = pb.CapsuleState.PAUSED
                paused.append(capsule.capsule_id)
        return pb.TerminateResponse(paused_ids=paused)


class FakeAgentApp:
    """ASGI: the RPC service behind the X-Agent-Token check, `/proxy/...` behind the
    X-Nestbox-Proxy-Token check."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.rpc = HostAgentServiceASGIApplication(agent, read_max_bytes=MAX_BUFFERED + 2**20)
        self.proxied: list[dict[str, Any]] = []
        self.ws_targets: list[bytes] = []
        """Each WebSocket handshake's raw path and query, as it arrived."""
        self.rpcs: list[str] = []
        """The method of each authorised RPC, in order (`Exec`, `ListCapsules`, …)."""

    def _authorised(self, scope: Any) -> bool:
        if scope["path"].startswith("/proxy/"):
            header, token = PROXY_TOKEN_HEADER, self.agent.proxy_token
        else:
            header, token = AGENT_TOKEN_HEADER, self.agent.token
        want = header.lower().encode()
        return any(k == want and token and v.decode() == token for k, v in scope["headers"])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if not self._authorised(scope):
            await _answer(send, 401, {"error": {"code": "unauthorized", "message": "no"}})
            return
        if scope["path"].startswith("/proxy/"):
            await self._proxy(scope, receive, send)
            return
        self.rpcs.append(scope["path"].rsplit("/", 1)[-1])
        await self.rpc(scope, receive, send)

    async def _proxy(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen = {"path": scope["raw_path"].decode(), "query": scope["query_string"].decode(),
                "method": scope["method"], "headers": headers, "body": body.decode()}  # fmt: skip
        self.proxied.append(seen)
        _, _, cid, port, *rest = scope["raw_path"].decode().split("/")
        if rest and rest[0] == "redirect":
            await _answer(send, 302, seen, [(b"location", f"/proxy/{cid}/{port}/landed/".encode())])
            return
        await _answer(send, 200, seen)

    async def _websocket(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if not self._authorised(scope):
            await send({"type": "websocket.close", "code": 1008})
            return
        query = scope["query_string"]
        self.ws_targets.append(scope["raw_path"] + (b"?" + query if query else b""))
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            await send({"type": "websocket.send", "text": f"echo:{text}"})


async def _answer(send: Any, status: int, doc: dict[str, Any],
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serve_fake_agent(name: str = "fake") -> AsyncIterator[tuple[FakeAgent, FakeAgentApp]]:
    """A `FakeAgent` on 127.0.0.1:<free port> until the block ends (`agent.address`)."""
    agent = FakeAgent(name)
    app = FakeAgentApp(agent)
    port = free_port()
    agent.address = f"127.0.0.1:{port}"
    try:
        async with serve(app, port):
            yield agent, app
    finally:
        agent.close()
