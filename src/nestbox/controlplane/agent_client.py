"""Typed client to the host agents: `hostagent.v1.HostAgentService` over the generated Connect
client, one `AgentClient` (and one connection pool) per host.

- Transport: HTTP/1.1 only (the seed's bb582de: no HTTP/2 on the control plane <-> agent link),
  a pyqwest pool of its own per host, never shared with the public port proxy
  (`portproxy.py` has its own). No overall timeout on the pool: streams (exec, PTY, file
  transfers) may run for hours; each unary call sets its own deadline.
- Credentials: the host's agent token from registration, in `X-Agent-Token` on every call.
- Errors: every failure leaves as `AgentCallError`, a `ControlPlaneError` whose `code` is the
  agent's stable `ErrorInfo` code, unchanged (a missing file is `not_found`, exec on a paused
  capsule `invalid_state`, …). A host that does not answer is `host_unavailable`; anything
  else the agent did wrong is `agent_error`.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport, HTTPVersion, Proxy

from nestbox.controlplane.errors import ControlPlaneError
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.gen.hostagent.v1.hostagent_connect import HostAgentServiceClient
from nestbox.protocol.hosts import AGENT_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
READ_MAX_BYTES = 101 * MIB
"""Largest message read from an agent: a buffered ReadFile (100 MiB) and its envelope."""
UNARY_TIMEOUT_S = 60.0
LIFECYCLE_TIMEOUT_S = 300.0
"""Create, pause, resume, destroy: a restore or a full-RAM snapshot under TCG takes seconds,
and the agent may first build the `minimal` template (one cold boot)."""
TEMPLATE_TIMEOUT_S = 600.0
FILE_TIMEOUT_S = 600.0
SLOW_CALL_S = 5.0
"""A unary call that takes longer is logged (a lifecycle call or a long exec may)."""
EXEC_GRACE_S = 15.0
"""A foreground exec may take its own timeout plus this before the call itself gives up."""


_CODES = frozenset(code.value for code in ErrorCode)


class AgentCallError(ControlPlaneError):
    """A host agent call failed; `code` is the agent's code, or `host_unavailable` /
    `agent_error` when the failure was the agent's or the network's, not the request's."""

    def __init__(self, code: ErrorCode, message: str, *, host_id: str) -> None:
        super().__init__(message)
        self.code = code
        self.host_id = host_id


def map_error(err: ConnectError, host_id: str) -> AgentCallError:
    """The public error for a failed agent call: the agent's `ErrorInfo.code` unchanged."""
    for detail in err.details:
        info = detail.value(pb.ErrorInfo)
        if isinstance(info, pb.ErrorInfo) and info.code in _CODES:
            return AgentCallError(ErrorCode(info.code), err.message, host_id=host_id)
    if err.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
        log.warning("host %s: %s", host_id, err.message, extra={"host_id": host_id})
        return AgentCallError(
            ErrorCode.HOST_UNAVAILABLE, f"host {host_id} is not answering", host_id=host_id
        )
    if err.code is Code.CANCELED:
        # This side cancelled the call (its client left): nothing went wrong with the host.
        return AgentCallError(ErrorCode.AGENT_ERROR, f"the call to host {host_id} was cancelled",
                              host_id=host_id)  # fmt: skip
    log.error("host %s failed a call: %s %s", host_id, err.code, err.message,
              extra={"host_id": host_id})  # fmt: skip
    if err.code is Code.UNAUTHENTICATED:
        message = f"host {host_id} refused the control plane's credentials"
    else:
        message = f"host {host_id} failed: {err.message}"
    return AgentCallError(ErrorCode.AGENT_ERROR, message, host_id=host_id)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The RPC pool of one host (the seed's `HostClientPool` figures)."""

    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 90.0
    max_idle: int = 20
    tcp_keepalive_s: float = 30.0


def _transport(pool: PoolSettings) -> HTTPTransport:
    return HTTPTransport(
        http_version=HTTPVersion.HTTP1,
        connect_timeout=pool.connect_timeout_s,
        pool_idle_timeout=pool.idle_timeout_s,
        pool_max_idle_per_host=pool.max_idle,
        tcp_keepalive_interval=pool.tcp_keepalive_s,
        follow_redirects=False,
        enable_otel=False,
        # Agents are always reached directly, whatever HTTP_PROXY says (pyqwest ignores a
        # bare '*'; every address is exempt). Were that to fail, the "proxy" is loopback's
        # discard port, so nothing leaves the machine.
        proxy=Proxy("http://127.0.0.1:9", no_proxy="0.0.0.0/0,::/0,localhost"),
    )


class AgentClient:
    """One host agent's RPCs. Unary methods return the answer (or raise `AgentCallError`);
    streaming methods return async iterators whose errors are mapped the same way."""

    def __init__(
        self, host_id: str, address: str, token: str, pool: PoolSettings | None = None
    ) -> None:
        self.host_id = host_id
        self.address = address
        self.token = token
        self._transport = _transport(pool or PoolSettings())
        self._rpc = HostAgentServiceClient(
            f"http://{address}", http_client=Client(self._transport),
            read_max_bytes=READ_MAX_BYTES, send_compression=None, accept_compression=[],
        )  # fmt: skip
        self._headers = {AGENT_TOKEN_HEADER: token}

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _unary(self, call: Coroutine[Any, Any, T]) -> T:
        """One unary call; one that takes over `SLOW_CALL_S` is logged with its method."""
        start = time.monotonic()
        try:
            return await call
        except ConnectError as err:
            raise map_error(err, self.host_id) from err
        finally:
            took = time.monotonic() - start
            if took > SLOW_CALL_S:
                method = getattr(call, "__qualname__", "a call")
                log.info("host %s: %s took %.1f s", self.host_id, method, took,
                         extra={"host_id": self.host_id})  # fmt: skip

    async def _stream(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        try:
            async with aclosing(source):  # type: ignore[type-var]  # an async generator
                async for item in source:
                    yield item
        except ConnectError as err:
            raise map_error(err, self.host_id) from err

    @staticmethod
    def _ms(seconds: float | None) -> int | None:
        return None if seconds is None else int(seconds * 1000)

    # ── lifecycle ──

    async def create_capsule(self, request: pb.CreateCapsuleRequest) -> tuple[pb.Capsule, int]:
        """The capsule, and the bytes its template takes on the host (0: not said)."""
        answer = await self._unary(self._rpc.create_capsule(
            request, headers=self._headers, timeout_ms=self._ms(LIFECYCLE_TIMEOUT_S)))  # fmt: skip
        return _capsule(answer.capsule), answer.template_size_bytes

    async def destroy_capsule(self, capsule_id: str) -> None:
        await self._unary(self._rpc.destroy_capsule(
            pb.DestroyCapsuleRequest(capsule_id=capsule_id), headers=self._headers,
            timeout_ms=self._ms(LIFECYCLE_TIMEOUT_S)))  # fmt: skip

    async def pause_capsule(self, capsule_id: str) -> pb.Capsule:
        answer = await self._unary(self._rpc.pause_capsule(
            pb.PauseCapsuleRequest(capsule_id=capsule_id), headers=self._headers,
            timeout_ms=self._ms(LIFECYCLE_TIMEOUT_S)))  # fmt: skip
        return _capsule(answer.capsule)

    async def resume_capsule(self, request: pb.ResumeCapsuleRequest) -> pb.Capsule:
        answer = await self._unary(self._rpc.resume_capsule(
            request, headers=self._headers, timeout_ms=self._ms(LIFECYCLE_TIMEOUT_S)))  # fmt: skip
        return _capsule(answer.capsule)

    async def list_capsules(self) -> pb.ListCapsulesResponse:
        return await self._unary(self._rpc.list_capsules(
            pb.ListCapsulesRequest(), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    async def ping_capsule(self, capsule_id: str) -> None:
        await self._unary(self._rpc.ping_capsule(
            pb.PingCapsuleRequest(capsule_id=capsule_id), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    async def capsule_metrics(self, capsule_id: str, range_sec: int = 0) -> list[pb.MetricPoint]:
        answer = await self._unary(self._rpc.get_capsule_metrics(
            pb.GetCapsuleMetricsRequest(capsule_id=capsule_id, range_sec=range_sec),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return list(answer.points)

    async def capsule_logs(
        self, capsule_id: str, start_unix_ms: int = 0, limit: int = 0
    ) -> list[pb.LogEntry]:
        answer = await self._unary(self._rpc.get_capsule_logs(
            pb.GetCapsuleLogsRequest(capsule_id=capsule_id, start_unix_ms=start_unix_ms,
                                     limit=limit),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return list(answer.entries)

    async def set_idle_timeout(self, capsule_id: str, seconds: int) -> pb.Capsule:
        answer = await self._unary(self._rpc.set_idle_timeout(
            pb.SetIdleTimeoutRequest(capsule_id=capsule_id, idle_timeout_sec=seconds),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return _capsule(answer.capsule)

    async def fork_capsule(self, request: pb.ForkCapsuleRequest) -> pb.ForkCapsuleResponse:
        return await self._unary(self._rpc.fork_capsule(
            request, headers=self._headers, timeout_ms=self._ms(LIFECYCLE_TIMEOUT_S)))  # fmt: skip

    async def ping(self) -> pb.PingResponse:
        return await self._unary(self._rpc.ping(
            pb.PingRequest(), headers=self._headers, timeout_ms=self._ms(10.0)))  # fmt: skip

    async def terminate(self) -> pb.TerminateResponse:
        return await self._unary(self._rpc.terminate(
            pb.TerminateRequest(), headers=self._headers,
            timeout_ms=self._ms(LIFECYCLE_TIMEOUT_S)))  # fmt: skip

    # ── processes ──

    async def exec(self, request: pb.ExecRequest) -> pb.ExecResponse:
        limit = (request.timeout_sec or 30) + EXEC_GRACE_S
        return await self._unary(self._rpc.exec(
            request, headers=self._headers, timeout_ms=self._ms(limit)))  # fmt: skip

    def exec_stream(self, request: pb.ExecStreamRequest) -> AsyncIterator[pb.ExecStreamResponse]:
        return self._stream(self._rpc.exec_stream(request, headers=self._headers))

    async def start_background(
        self, request: pb.StartBackgroundRequest
    ) -> pb.StartBackgroundResponse:
        return await self._unary(self._rpc.start_background(
            request, headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    async def list_processes(self, capsule_id: str) -> list[pb.ProcessInfo]:
        answer = await self._unary(self._rpc.list_processes(
            pb.ListProcessesRequest(capsule_id=capsule_id), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return list(answer.processes)

    async def kill_process(self, request: pb.KillProcessRequest) -> None:
        await self._unary(self._rpc.kill_process(
            request, headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    def connect_process(
        self, request: pb.ConnectProcessRequest
    ) -> AsyncIterator[pb.ConnectProcessResponse]:
        return self._stream(self._rpc.connect_process(request, headers=self._headers))

    async def send_stdin(self, request: pb.SendStdinRequest) -> None:
        await self._unary(self._rpc.send_stdin(
            request, headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    async def close_stdin(self, request: pb.CloseStdinRequest) -> None:
        await self._unary(self._rpc.close_stdin(
            request, headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    # ── terminals ──

    def pty_attach(self, request: pb.PtyAttachRequest) -> AsyncIterator[pb.PtyAttachResponse]:
        return self._stream(self._rpc.pty_attach(request, headers=self._headers))

    async def pty_send_input(self, capsule_id: str, tag: str, data: bytes) -> None:
        await self._unary(self._rpc.pty_send_input(
            pb.PtySendInputRequest(capsule_id=capsule_id, tag=tag, data=data),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    async def pty_resize(self, capsule_id: str, tag: str, cols: int, rows: int) -> None:
        await self._unary(self._rpc.pty_resize(
            pb.PtyResizeRequest(capsule_id=capsule_id, tag=tag, cols=cols, rows=rows),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    async def pty_kill(self, capsule_id: str, tag: str) -> None:
        await self._unary(self._rpc.pty_kill(
            pb.PtyKillRequest(capsule_id=capsule_id, tag=tag), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip

    # ── files ──

    async def write_file(self, capsule_id: str, path: str, content: bytes) -> str:
        answer = await self._unary(self._rpc.write_file(
            pb.WriteFileRequest(capsule_id=capsule_id, path=path, content=content),
            headers=self._headers, timeout_ms=self._ms(FILE_TIMEOUT_S)))  # fmt: skip
        return answer.path

    async def read_file(self, capsule_id: str, path: str) -> bytes:
        answer = await self._unary(self._rpc.read_file(
            pb.ReadFileRequest(capsule_id=capsule_id, path=path), headers=self._headers,
            timeout_ms=self._ms(FILE_TIMEOUT_S)))  # fmt: skip
        return answer.content

    async def write_file_stream(
        self, messages: AsyncIterator[pb.WriteFileStreamRequest]
    ) -> pb.WriteFileStreamResponse:
        return await self._unary(self._rpc.write_file_stream(messages, headers=self._headers))

    def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]:
        return self._chunks(self._rpc.read_file_stream(
            pb.ReadFileStreamRequest(capsule_id=capsule_id, path=path),
            headers=self._headers))  # fmt: skip

    async def _chunks(
        self, source: AsyncIterator[pb.ReadFileStreamResponse]
    ) -> AsyncIterator[bytes]:
        async for message in self._stream(source):
            if message.chunk:
                yield message.chunk

    async def list_dir(self, capsule_id: str, path: str, depth: int) -> list[pb.FileEntry]:
        answer = await self._unary(self._rpc.list_dir(
            pb.ListDirRequest(capsule_id=capsule_id, path=path, depth=depth),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return list(answer.entries)

    async def make_dir(self, capsule_id: str, path: str) -> pb.FileEntry:
        answer = await self._unary(self._rpc.make_dir(
            pb.MakeDirRequest(capsule_id=capsule_id, path=path), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return _entry(answer.entry)

    async def remove_path(self, capsule_id: str, path: str) -> None:
        await self._unary(self._rpc.remove_path(
            pb.RemovePathRequest(capsule_id=capsule_id, path=path), headers=self._headers,
            timeout_ms=self._ms(FILE_TIMEOUT_S)))  # fmt: skip

    async def stat(self, capsule_id: str, path: str) -> pb.FileEntry:
        answer = await self._unary(self._rpc.stat(
            pb.StatRequest(capsule_id=capsule_id, path=path), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return _entry(answer.entry)

    async def move(self, capsule_id: str, source: str, destination: str) -> pb.FileEntry:
        answer = await self._unary(self._rpc.move(
            pb.MoveRequest(capsule_id=capsule_id, source=source, destination=destination),
            headers=self._headers, timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip
        return _entry(answer.entry)

    def watch_dir(self, request: pb.WatchDirRequest) -> AsyncIterator[pb.WatchDirResponse]:
        return self._stream(self._rpc.watch_dir(request, headers=self._headers))

    # ── templates ──

    async def create_template(
        self,
        capsule_id: str,
        template_id: str,
        *,
        kind: pb.TemplateKind = pb.TemplateKind.SNAPSHOT,
        consume: bool = False,
    ) -> pb.CreateTemplateResponse:
        """A snapshot template (default) or, with `kind=BASE`, a base one (the capsule's disk
        flattened, no memory); the capsule is left paused unless `consume`."""
        return await self._unary(self._rpc.create_template(
            pb.CreateTemplateRequest(capsule_id=capsule_id, template_id=template_id, kind=kind,
                                     consume_capsule=consume),
            headers=self._headers, timeout_ms=self._ms(TEMPLATE_TIMEOUT_S)))  # fmt: skip

    async def build_template(
        self, capsule_id: str, template_id: str, *, kind: pb.TemplateKind, consume: bool
    ) -> pb.CreateTemplateResponse:
        """The template builder's last step: a snapshot (memory and disk) or a base template
        (the disk flattened) of the build capsule, consuming it when asked."""
        return await self._unary(self._rpc.create_template(
            pb.CreateTemplateRequest(capsule_id=capsule_id, template_id=template_id, kind=kind,
                                     consume_capsule=consume),
            headers=self._headers, timeout_ms=self._ms(TEMPLATE_TIMEOUT_S)))  # fmt: skip

    async def delete_template(self, template_id: str) -> None:
        await self._unary(self._rpc.delete_template(
            pb.DeleteTemplateRequest(template_id=template_id), headers=self._headers,
            timeout_ms=self._ms(UNARY_TIMEOUT_S)))  # fmt: skip


def _capsule(capsule: pb.Capsule | None) -> pb.Capsule:
    if capsule is None:
        raise ControlPlaneError("the host agent answered without the capsule")
    return capsule


def _entry(entry: pb.FileEntry | None) -> pb.FileEntry:
    if entry is None:
        raise ControlPlaneError("the host agent answered without the file entry")
    return entry


class AgentPool:
    """An `AgentClient` per host, made on first use and remade when the host's address or
    token changes (a re-registration). `aclose()` closes every pool."""

    def __init__(self, pool: PoolSettings | None = None) -> None:
        self._pool = pool or PoolSettings()
        self._clients: dict[str, AgentClient] = {}
        self._retired: list[AgentClient] = []

    def client(self, host_id: str, address: str, token: str) -> AgentClient:
        current = self._clients.get(host_id)
        if current is not None and current.address == address and current.token == token:
            return current
        if current is not None:
            # Streams may still run on the old pool: close it with the others at the end.
            self._retired.append(current)
        fresh = self._clients[host_id] = AgentClient(host_id, address, token, self._pool)
        return fresh

    def forget(self, host_id: str) -> None:
        old = self._clients.pop(host_id, None)
        if old is not None:
            self._retired.append(old)

    async def aclose(self) -> None:
        clients = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        for client in clients:
            await client.aclose()
