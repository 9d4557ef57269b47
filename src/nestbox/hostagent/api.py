"""The `hostagent.v1.HostAgentService` implementation: parse the request, call the manager,
build the answer. Nothing else: rules live in `manager`, conversions and error mapping in
`views` (`ErrorMapper` turns every raised error into a Connect error with a stable code).

Guest calls go through `manager.call` (one-shot) or `manager.relay` (streams), which count
as activity and are cut with `unavailable` when the capsule is paused under them.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeAlias

from nestbox import __version__
from nestbox.hostagent import fork, idle, views
from nestbox.hostagent.errors import BadRequest
from nestbox.hostagent.manager import CreateSpec
from nestbox.protocol.envd import LOG_LINES
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.gen.hostagent.v1.hostagent_connect import HostAgentService

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from contextlib import AbstractAsyncContextManager

    from connectrpc.request import RequestContext

    from nestbox.hostagent.envdconn import CapsuleEnvd, EventStream
    from nestbox.hostagent.manager import CapsuleManager

Ctx: TypeAlias = "RequestContext[Any, Any]"
"""Every handler's context (the generated protocol's precise types add nothing here)."""
MAX_BUFFERED_FILE = 100 * 1024 * 1024
"""WriteFile/ReadFile hold the whole file in one message (Wrenn's 100 MB cap)."""
READ_MAX_BYTES = MAX_BUFFERED_FILE + 1024 * 1024
"""Largest request message the Connect app reads (a buffered WriteFile plus its fields)."""
DEFAULT_EXEC_TIMEOUT_S = 30


class AgentService(HostAgentService):
    """Implements the generated `HostAgentService` protocol over a `CapsuleManager`.

    `manager` is a callable because the manager exists only while the app's lifespan runs;
    `on_terminate` asks the server to stop after Terminate answered.
    """

    def __init__(
        self, manager: Callable[[], CapsuleManager], on_terminate: Callable[[], None]
    ) -> None:
        self._manager = manager
        self._on_terminate = on_terminate

    @property
    def m(self) -> CapsuleManager:
        return self._manager()

    # ── capsule lifecycle ───────────────────────────────────────────────────────────────

    async def create_capsule(
        self, request: pb.CreateCapsuleRequest, ctx: Ctx
    ) -> pb.CreateCapsuleResponse:
        spec = CreateSpec(
            template_id=request.template, capsule_id=request.capsule_id,
            team_id=request.team_id, idle_timeout_s=request.idle_timeout_sec,
            default_user=request.default_user, default_env=dict(request.default_env),
            egress=request.egress, egress_allow=list(request.egress_allow),
            vcpus=request.vcpus, memory_mib=request.memory_mb,
            default_workdir=request.default_workdir,
        )  # fmt: skip
        view = await self.m.create(spec)
        return pb.CreateCapsuleResponse(
            capsule=views.capsule(view),
            template_size_bytes=self.m.platform_size(view.template_id),
        )

    async def destroy_capsule(
        self, request: pb.DestroyCapsuleRequest, ctx: Ctx
    ) -> pb.DestroyCapsuleResponse:
        await self.m.destroy(request.capsule_id)
        await fork.prune(self.m)  # a fork's base goes with its last copy
        return pb.DestroyCapsuleResponse()

    async def pause_capsule(
        self, request: pb.PauseCapsuleRequest, ctx: Ctx
    ) -> pb.PauseCapsuleResponse:
        await self.m.pause(request.capsule_id)
        return pb.PauseCapsuleResponse(capsule=views.capsule(self.m.view(request.capsule_id)))

    async def resume_capsule(
        self, request: pb.ResumeCapsuleRequest, ctx: Ctx
    ) -> pb.ResumeCapsuleResponse:
        timeout = request.idle_timeout_sec if request.has_field("idle_timeout_sec") else None
        view = await self.m.resume(
            request.capsule_id, default_user=request.default_user,
            default_env=dict(request.default_env), idle_timeout_s=timeout,
        )  # fmt: skip
        return pb.ResumeCapsuleResponse(capsule=views.capsule(view))

    async def list_capsules(
        self, request: pb.ListCapsulesRequest, ctx: Ctx
    ) -> pb.ListCapsulesResponse:
        capsules, auto_paused = self.m.list_capsules()
        return pb.ListCapsulesResponse(
            capsules=[views.capsule(v) for v in capsules], auto_paused_ids=auto_paused
        )

    async def ping_capsule(
        self, request: pb.PingCapsuleRequest, ctx: Ctx
    ) -> pb.PingCapsuleResponse:
        self.m.touch(request.capsule_id)
        return pb.PingCapsuleResponse()

    async def get_capsule_metrics(
        self, request: pb.GetCapsuleMetricsRequest, ctx: Ctx
    ) -> pb.GetCapsuleMetricsResponse:
        points = self.m.entry(request.capsule_id).metrics.since(request.range_sec)
        return pb.GetCapsuleMetricsResponse(points=[views.metric_point(p) for p in points])

    async def get_capsule_logs(
        self, request: pb.GetCapsuleLogsRequest, ctx: Ctx
    ) -> pb.GetCapsuleLogsResponse:
        limit = request.limit or LOG_LINES
        found = await self.m.call(
            request.capsule_id, lambda envd: envd.logs(request.start_unix_ms, limit)
        )
        return pb.GetCapsuleLogsResponse(entries=[
            pb.LogEntry(ts_unix_ms=e.ts_unix_ms, level=e.level, message=e.message,
                        fields=e.fields)
            for e in found
        ])  # fmt: skip

    async def set_idle_timeout(
        self, request: pb.SetIdleTimeoutRequest, ctx: Ctx
    ) -> pb.SetIdleTimeoutResponse:
        view = await idle.set_idle_timeout(self.m, request.capsule_id, request.idle_timeout_sec)
        return pb.SetIdleTimeoutResponse(capsule=views.capsule(view))

    async def fork_capsule(
        self, request: pb.ForkCapsuleRequest, ctx: Ctx
    ) -> pb.ForkCapsuleResponse:
        try:
            result = await fork.fork(
                self.m, request.capsule_id, request.count, list(request.capsule_ids)
            )
        finally:
            await fork.prune(self.m)
        return pb.ForkCapsuleResponse(
            capsules=[views.capsule(v) for v in result.copies], paused_ms=result.paused_ms,
            quiesced_ms=result.quiesced_ms,
        )  # fmt: skip

    # ── processes ───────────────────────────────────────────────────────────────────────

    async def exec(self, request: pb.ExecRequest, ctx: Ctx) -> pb.ExecResponse:
        _require(request.cmd, "cmd")
        timeout = request.timeout_sec or DEFAULT_EXEC_TIMEOUT_S
        result = await self.m.call(request.capsule_id, lambda envd: envd.exec(
            request.cmd, request.args, envs=request.envs, cwd=request.cwd or None,
            user=request.user or None, timeout_s=timeout,
        ))  # fmt: skip
        return pb.ExecResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code,
            pid=result.pid, duration_ms=result.duration_ms, truncated=result.truncated,
            status=result.status,
        )  # fmt: skip

    async def exec_stream(
        self, request: pb.ExecStreamRequest, ctx: Ctx
    ) -> AsyncIterator[pb.ExecStreamResponse]:
        _require(request.cmd, "cmd")

        def source(envd: CapsuleEnvd) -> AbstractAsyncContextManager[EventStream]:
            return envd.exec_stream(
                request.cmd, request.args, envs=request.envs, cwd=request.cwd or None,
                user=request.user or None, tag=request.tag or None,
            )  # fmt: skip

        async for event in self.m.relay(request.capsule_id, source):
            yield pb.ExecStreamResponse(event=views.process_event(event))

    async def start_background(
        self, request: pb.StartBackgroundRequest, ctx: Ctx
    ) -> pb.StartBackgroundResponse:
        _require(request.cmd, "cmd")
        started = await self.m.call(request.capsule_id, lambda envd: envd.start_background(
            request.cmd, request.args, tag=request.tag or None, envs=request.envs,
            cwd=request.cwd or None, user=request.user or None, stdin=request.stdin,
        ))  # fmt: skip
        return pb.StartBackgroundResponse(pid=started.pid, tag=started.tag)

    async def list_processes(
        self, request: pb.ListProcessesRequest, ctx: Ctx
    ) -> pb.ListProcessesResponse:
        found = await self.m.call(request.capsule_id, lambda envd: envd.list_processes())
        return pb.ListProcessesResponse(processes=[
            pb.ProcessInfo(pid=p.pid, tag=p.tag or "", cmd=p.cmd, args=list(p.args),
                           cwd=p.cwd or "")
            for p in found
        ])  # fmt: skip

    async def kill_process(
        self, request: pb.KillProcessRequest, ctx: Ctx
    ) -> pb.KillProcessResponse:
        selector = _selector(request.selector)
        signal = request.signal or "SIGKILL"
        await self.m.call(request.capsule_id, lambda envd: envd.kill_process(selector, signal))
        return pb.KillProcessResponse()

    async def connect_process(
        self, request: pb.ConnectProcessRequest, ctx: Ctx
    ) -> AsyncIterator[pb.ConnectProcessResponse]:
        selector = _selector(request.selector)
        source = lambda envd: envd.connect_process(selector)  # noqa: E731
        async for event in self.m.relay(request.capsule_id, source):
            yield pb.ConnectProcessResponse(event=views.process_event(event))

    async def send_stdin(self, request: pb.SendStdinRequest, ctx: Ctx) -> pb.SendStdinResponse:
        selector = _selector(request.selector)
        await self.m.call(request.capsule_id, lambda e: e.send_stdin(selector, request.data))
        return pb.SendStdinResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: Ctx) -> pb.CloseStdinResponse:
        selector = _selector(request.selector)
        await self.m.call(request.capsule_id, lambda envd: envd.close_stdin(selector))
        return pb.CloseStdinResponse()

    # ── terminals ───────────────────────────────────────────────────────────────────────

    async def pty_attach(
        self, request: pb.PtyAttachRequest, ctx: Ctx
    ) -> AsyncIterator[pb.PtyAttachResponse]:
        def source(envd: CapsuleEnvd) -> AbstractAsyncContextManager[EventStream]:
            return envd.pty_attach(
                request.cmd or None, request.args, tag=request.tag or None,
                cols=request.cols or 80, rows=request.rows or 24, envs=request.envs,
                cwd=request.cwd or None, user=request.user or None,
            )  # fmt: skip

        async for event in self.m.relay(request.capsule_id, source):
            yield pb.PtyAttachResponse(event=views.process_event(event))

    async def pty_send_input(
        self, request: pb.PtySendInputRequest, ctx: Ctx
    ) -> pb.PtySendInputResponse:
        _require(request.tag, "tag")
        await self.m.call(request.capsule_id, lambda e: e.pty_input(request.tag, request.data))
        return pb.PtySendInputResponse()

    async def pty_resize(self, request: pb.PtyResizeRequest, ctx: Ctx) -> pb.PtyResizeResponse:
        _require(request.tag, "tag")
        await self.m.call(
            request.capsule_id, lambda e: e.pty_resize(request.tag, request.cols, request.rows)
        )
        return pb.PtyResizeResponse()

    async def pty_kill(self, request: pb.PtyKillRequest, ctx: Ctx) -> pb.PtyKillResponse:
        _require(request.tag, "tag")
        await self.m.call(request.capsule_id, lambda envd: envd.pty_kill(request.tag))
        return pb.PtyKillResponse()

    # ── files ───────────────────────────────────────────────────────────────────────────

    async def write_file(self, request: pb.WriteFileRequest, ctx: Ctx) -> pb.WriteFileResponse:
        _require(request.path, "path")
        path = await self.m.call(request.capsule_id, lambda envd: envd.write_file(
            request.path, request.content, user=request.user or None))  # fmt: skip
        return pb.WriteFileResponse(path=path)

    async def read_file(self, request: pb.ReadFileRequest, ctx: Ctx) -> pb.ReadFileResponse:
        _require(request.path, "path")
        content = await self.m.call(request.capsule_id, lambda envd: envd.read_file(
            request.path, user=request.user or None, max_bytes=MAX_BUFFERED_FILE))  # fmt: skip
        return pb.ReadFileResponse(content=content)

    async def write_file_stream(
        self, request: AsyncIterator[pb.WriteFileStreamRequest], ctx: Ctx
    ) -> pb.WriteFileStreamResponse:
        first = await anext(request, None)
        meta = first.message.value if first is not None and first.message else None
        if not isinstance(meta, pb.WriteFileMeta) or not meta.path:
            raise BadRequest("the first message must be `meta` with a capsule_id and a path")
        written = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal written
            async for message in request:
                chunk = message.message.value if message.message else b""
                if not isinstance(chunk, bytes):
                    raise BadRequest("only `chunk` messages may follow `meta`")
                written += len(chunk)
                yield chunk

        path = await self.m.call(meta.capsule_id, lambda envd: envd.write_file_stream(
            meta.path, chunks(), user=meta.user or None))  # fmt: skip
        return pb.WriteFileStreamResponse(path=path, bytes_written=written)

    async def read_file_stream(
        self, request: pb.ReadFileStreamRequest, ctx: Ctx
    ) -> AsyncIterator[pb.ReadFileStreamResponse]:
        _require(request.path, "path")
        source = lambda envd: aclosing(  # noqa: E731
            envd.read_file_stream(request.path, user=request.user or None)
        )
        # envd's chunks are `envdconn.CHUNK` at most: the message limit needs no re-split
        async for chunk in self.m.relay(request.capsule_id, source):
            yield pb.ReadFileStreamResponse(chunk=chunk)

    async def list_dir(self, request: pb.ListDirRequest, ctx: Ctx) -> pb.ListDirResponse:
        _require(request.path, "path")
        entries = await self.m.call(request.capsule_id, lambda envd: envd.list_dir(
            request.path, request.depth or 1, user=request.user or None))  # fmt: skip
        return pb.ListDirResponse(entries=[views.file_entry(e) for e in entries])

    async def make_dir(self, request: pb.MakeDirRequest, ctx: Ctx) -> pb.MakeDirResponse:
        _require(request.path, "path")
        entry = await self.m.call(
            request.capsule_id, lambda e: e.make_dir(request.path, user=request.user or None)
        )
        return pb.MakeDirResponse(entry=views.file_entry(entry))

    async def remove_path(self, request: pb.RemovePathRequest, ctx: Ctx) -> pb.RemovePathResponse:
        _require(request.path, "path")
        await self.m.call(
            request.capsule_id, lambda e: e.remove(request.path, user=request.user or None)
        )
        return pb.RemovePathResponse()

    async def stat(self, request: pb.StatRequest, ctx: Ctx) -> pb.StatResponse:
        _require(request.path, "path")
        entry = await self.m.call(
            request.capsule_id, lambda e: e.stat(request.path, user=request.user or None)
        )
        return pb.StatResponse(entry=views.file_entry(entry))

    async def move(self, request: pb.MoveRequest, ctx: Ctx) -> pb.MoveResponse:
        _require(request.source, "source")
        _require(request.destination, "destination")
        entry = await self.m.call(request.capsule_id, lambda envd: envd.move(
            request.source, request.destination, user=request.user or None))  # fmt: skip
        return pb.MoveResponse(entry=views.file_entry(entry))

    async def watch_dir(
        self, request: pb.WatchDirRequest, ctx: Ctx
    ) -> AsyncIterator[pb.WatchDirResponse]:
        _require(request.path, "path")
        source = lambda envd: aclosing(  # noqa: E731
            envd.watch_dir(request.path, recursive=request.recursive, user=request.user or None)
        )
        async for event in self.m.relay(request.capsule_id, source):
            yield pb.WatchDirResponse(type=event.type, name=event.name)

    # ── templates ───────────────────────────────────────────────────────────────────────

    async def create_template(
        self, request: pb.CreateTemplateRequest, ctx: Ctx
    ) -> pb.CreateTemplateResponse:
        template, view = await self.m.create_template(
            request.capsule_id, request.template_id, consume=request.consume_capsule,
            kind="base" if request.kind == pb.TemplateKind.BASE else "snapshot",
        )  # fmt: skip
        return pb.CreateTemplateResponse(
            template=views.template(template), capsule=views.capsule(view) if view else None
        )

    async def delete_template(
        self, request: pb.DeleteTemplateRequest, ctx: Ctx
    ) -> pb.DeleteTemplateResponse:
        await self.m.delete_template(request.template_id)
        return pb.DeleteTemplateResponse()

    # ── the agent ───────────────────────────────────────────────────────────────────────

    async def ping(self, request: pb.PingRequest, ctx: Ctx) -> pb.PingResponse:
        stats = self.m.statistics()
        return pb.PingResponse(
            agent_id=self.m.settings.agent_id, version=__version__,
            accel=self.m.runtime.accel.accel, capsules_running=stats.running,
            capsules_paused=stats.paused, slots_free=stats.slots_free,
        )  # fmt: skip

    async def terminate(self, request: pb.TerminateRequest, ctx: Ctx) -> pb.TerminateResponse:
        paused, failed = await self.m.pause_all(destroy_failed=True)
        self._on_terminate()
        return pb.TerminateResponse(paused_ids=paused, failed_ids=failed)


def _require(value: str, name: str) -> None:
    if not value:
        raise BadRequest(f"`{name}` is required")


def _selector(selector: object) -> int | str:
    """A `oneof selector { pid, tag }` as envdconn's selector. :raise BadRequest:"""
    value = getattr(selector, "value", None)
    if isinstance(value, (int, str)) and value:
        return value
    raise BadRequest("a process selector (pid or tag) is required")
