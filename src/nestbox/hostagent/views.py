"""Agent values -> `hostagent.v1` messages, and errors -> Connect errors (`ErrorMapper`).

The only module besides `api.py` that knows the generated message classes. Error mapping
follows the table at the top of `proto/hostagent/v1/hostagent.proto`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from nestbox.hostagent.capsule import CapsuleState
from nestbox.hostagent.envdconn import Ended, Event, Output, Started
from nestbox.hostagent.envdconn.errors import DeadlineExceeded
from nestbox.hostagent.errors import classify
from nestbox.protocol.errors import HTTP_STATUS, ErrorCode
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

    from connectrpc.request import RequestContext

    Ctx = RequestContext[Any, Any]

    from nestbox.hostagent.envdconn import FileEntry
    from nestbox.hostagent.managed import CapsuleView
    from nestbox.hostagent.metrics import MetricPoint
    from nestbox.hostagent.storage.templates import Template

log = logging.getLogger(__name__)

SLOW_CALL_S = 5.0
"""A unary RPC that takes longer is logged (a lifecycle call or a long exec may; a resize
should not)."""

REQ = TypeVar("REQ")
RES = TypeVar("RES")

CONNECT_CODES: dict[ErrorCode, Code] = {
    # The codes the agent answers with (the proto's table); others go by HTTP status.
    ErrorCode.INVALID_REQUEST: Code.INVALID_ARGUMENT,
    ErrorCode.UNAUTHORIZED: Code.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN: Code.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: Code.NOT_FOUND,
    ErrorCode.CONFLICT: Code.ALREADY_EXISTS,
    ErrorCode.INVALID_STATE: Code.FAILED_PRECONDITION,
    ErrorCode.TOO_LARGE: Code.RESOURCE_EXHAUSTED,
    ErrorCode.NOT_ENOUGH_SPACE: Code.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: Code.UNAVAILABLE,
    ErrorCode.HOST_UNAVAILABLE: Code.UNAVAILABLE,
    ErrorCode.INTERNAL: Code.INTERNAL,
}
BY_HTTP_STATUS: dict[int, Code] = {
    400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND, 409: Code.FAILED_PRECONDITION, 413: Code.RESOURCE_EXHAUSTED,
    503: Code.UNAVAILABLE, 507: Code.RESOURCE_EXHAUSTED,
}  # fmt: skip
STATES: dict[CapsuleState, pb.CapsuleState] = {
    CapsuleState.STARTING: pb.CapsuleState.STARTING,
    CapsuleState.RUNNING: pb.CapsuleState.RUNNING,
    CapsuleState.PAUSING: pb.CapsuleState.PAUSING,
    CapsuleState.PAUSED: pb.CapsuleState.PAUSED,
    CapsuleState.RESUMING: pb.CapsuleState.RESUMING,
    CapsuleState.SNAPSHOTTING: pb.CapsuleState.SNAPSHOTTING,
    CapsuleState.STOPPING: pb.CapsuleState.STOPPING,
    CapsuleState.STOPPED: pb.CapsuleState.STOPPED,
    CapsuleState.ERROR: pb.CapsuleState.ERROR,
}
"""Every state of the agent's one enum, on the wire (a test checks none is missing)."""


# ── errors ───────────────────────────────────────────────────────────────────────────────


def connect_error(err: Exception, method: str) -> ConnectError:
    """The Connect error for `err`, with an `ErrorInfo` detail holding the stable code."""
    code, message = classify(err)
    if code == ErrorCode.INTERNAL:
        log.error("%s failed: %r", method, err)
        log.debug("%s failed", method, exc_info=err)
    connect = Code.DEADLINE_EXCEEDED if isinstance(err, DeadlineExceeded) else connect_code(code)
    return ConnectError(connect, message, details=[pb.ErrorInfo(code=code.value)])


def connect_code(code: ErrorCode) -> Code:
    """The Connect code for `code` (by its HTTP status for codes the table does not name)."""
    if code in CONNECT_CODES:
        return CONNECT_CODES[code]
    return BY_HTTP_STATUS.get(HTTP_STATUS.get(code, 500), Code.INTERNAL)


class ErrorMapper:
    """A Connect interceptor for every kind of method: domain errors leave as Connect errors
    with their stable code; cancellation and Connect errors pass untouched."""

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, Ctx], Awaitable[RES]],
        request: REQ,
        ctx: Ctx,
        /,
    ) -> RES:
        """Unary and client-streaming calls alike (`request` is then the message iterator).
        A call that takes over `SLOW_CALL_S` is logged, with how it ended."""
        start = time.monotonic()
        outcome = "answered"
        try:
            return await call_next(request, ctx)
        except ConnectError:
            outcome = "failed"
            raise
        except Exception as err:
            outcome = "failed"
            raise connect_error(err, ctx.method.name) from err
        except BaseException:
            outcome = "was cancelled"
            raise
        finally:
            took = time.monotonic() - start
            if took > SLOW_CALL_S:
                log.info("%s %s after %.1f s", ctx.method.name, outcome, took)

    intercept_client_stream = intercept_unary

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, Ctx], AsyncIterator[RES]],
        request: REQ,
        ctx: Ctx,
        /,
    ) -> AsyncIterator[RES]:
        """Closes the method's stream (ending its guest call) as soon as ours is closed, e.g.
        when the client went away, rather than whenever the garbage collector gets to it."""
        try:
            # the generated service's stream methods are async generators
            stream = cast("AsyncGenerator[RES, None]", call_next(request, ctx))
            async with contextlib.aclosing(stream):
                async for item in stream:
                    yield item
        except ConnectError:
            raise
        except Exception as err:
            raise connect_error(err, ctx.method.name) from err


# ── values ───────────────────────────────────────────────────────────────────────────────


def capsule(view: CapsuleView) -> pb.Capsule:
    return pb.Capsule(
        capsule_id=view.capsule_id,
        state=STATES[view.state],
        template_id=view.template_id,
        team_id=view.team_id,
        vcpus=view.vcpus,
        memory_mb=view.memory_mib,
        idle_timeout_sec=view.idle_timeout_s,
        host_ip=view.host_address or "",
        guest_ip="169.254.0.21" if view.host_address else "",
        egress=view.egress,
        egress_allow=view.egress_allow,
        template_kind=(
            pb.TemplateKind.BASE if view.template_kind == "base" else pb.TemplateKind.SNAPSHOT
        ),
        created_at_unix_ms=view.created_at_unix_ms,
        last_active_at_unix_ms=view.last_active_unix_ms,
        error=view.error or "",
        metadata=view.metadata,
    )


def process_event(event: Event) -> pb.ProcessEvent:
    """One envd event as a `ProcessEvent`."""
    if isinstance(event, Started):
        started: Oneof[Literal["started"], pb.ProcessEvent.Started] = Oneof(
            "started", pb.ProcessEvent.Started(pid=event.pid, tag=event.tag or "")
        )
        return pb.ProcessEvent(event=started)
    if isinstance(event, Output):
        data: Oneof[Literal["stdout", "stderr", "pty"], bytes] = Oneof(event.stream, event.data)
        return pb.ProcessEvent(event=data)  # type: ignore[arg-type]  # a union of 3 literals
    assert isinstance(event, Ended)
    exited: Oneof[Literal["exited"], pb.ProcessEvent.Exited] = Oneof(
        "exited",
        pb.ProcessEvent.Exited(
            exit_code=event.exit_code, exited=event.exited, status=event.status,
            error=event.error or "",
        ),
    )  # fmt: skip
    return pb.ProcessEvent(event=exited)


def file_entry(entry: FileEntry) -> pb.FileEntry:
    return pb.FileEntry(
        name=entry.name, path=entry.path, type=entry.type, size=entry.size, mode=entry.mode,
        permissions=entry.permissions, owner=entry.owner, group=entry.group,
        modified_at=entry.modified_at, symlink_target=entry.symlink_target,
    )  # fmt: skip


def metric_point(point: MetricPoint) -> pb.MetricPoint:
    return pb.MetricPoint(
        ts_unix_ms=point.ts_unix_ms, cpu_pct=point.cpu_pct, mem_bytes=point.mem_bytes,
        disk_bytes=point.disk_bytes,
    )  # fmt: skip


def template(t: Template) -> pb.Template:
    meta = t.meta
    return pb.Template(
        template_id=meta.template_id, vcpus=meta.vcpus, memory_mb=meta.memory_mib,
        default_user=meta.default_user, default_env=dict(meta.default_env),
        created_at_unix_ms=int(meta.created_at.timestamp() * 1000), source=meta.source,
        kind=pb.TemplateKind.BASE if meta.kind == "base" else pb.TemplateKind.SNAPSHOT,
        size_bytes=t.size_bytes(),
    )  # fmt: skip
