"""The process service called in-process: streaming, lifetime, slow readers, shutdown, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import Headers, RequestContext
from protobuf import Oneof

from nestbox.envd.process.proc import identity_args
from nestbox.envd.process.registry import ProcessRegistry
from nestbox.envd.process.service import ProcessService
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import Runtime
from nestbox.envd.users import User, lookup_user
from nestbox.protocol.gen.process.process_pb import (
    PTY,
    CloseStdinRequest,
    ConnectRequest,
    ListRequest,
    ProcessConfig,
    ProcessEvent,
    ProcessInput,
    ProcessSelector,
    SendInputRequest,
    SendSignalRequest,
    Signal,
    StartRequest,
    StreamInputRequest,
    UpdateRequest,
)
from tests.conftest import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


def data_in(kind: str, data: bytes) -> ProcessInput:
    return ProcessInput(input=Oneof(kind, data))


def ctx(headers: dict[str, str] | None = None) -> Any:
    method = MethodInfo(name="Test", service_name="process.Process", input=object, output=object,
                        idempotency_level=IdempotencyLevel.UNKNOWN,
                        stream_type=StreamType.UNARY)  # fmt: skip
    return RequestContext(method=method, http_method="POST", request_headers=Headers(headers or {}))


def pid_of(pid: int) -> ProcessSelector:
    return ProcessSelector(selector=Oneof("pid", pid))


def sh(script: str, **kw: Any) -> StartRequest:
    return StartRequest(process=ProcessConfig(cmd="/bin/sh", args=["-c", script]), **kw)


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    settings = EnvdSettings(stream_buffer=64)
    nothing = cast(Any, None)
    rt = Runtime(settings=settings, in_vm=False, processes=ProcessRegistry(settings),
                 watchers=nothing, tracker=nothing, ports=nothing)  # fmt: skip
    yield rt
    await rt.processes.aclose()


@pytest.fixture
def service(runtime: Runtime) -> ProcessService:
    return ProcessService(runtime)


async def collect(stream: AsyncIterator[Any]) -> list[ProcessEvent]:
    return [resp.event async for resp in stream]


def output(events: list[ProcessEvent], kind: str) -> bytes:
    return b"".join(
        e.event.value.output.value
        for e in events
        if e.event is not None and e.event.field == "data" and e.event.value.output.field == kind
    )


def end_of(events: list[ProcessEvent]) -> ProcessEvent.EndEvent:
    last = events[-1].event
    assert last is not None
    assert last.field == "end"
    return cast(ProcessEvent.EndEvent, last.value)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def next_event(stream: AsyncIterator[Any]) -> ProcessEvent:
    resp = await asyncio.wait_for(anext(stream), 10)
    return cast(ProcessEvent, resp.event)


async def test_exec_streams_start_output_and_end(service: ProcessService) -> None:
    events = await collect(service.start(sh("echo out; echo err >&2; exit 3"), ctx()))
    first = events[0].event
    assert first is not None
    assert first.field == "start"
    assert first.value.pid > 0
    assert output(events, "stdout") == b"out\n"
    assert output(events, "stderr") == b"err\n"
    end = end_of(events)
    assert (end.exit_code, end.exited, end.status) == (3, True, "exit status 3")


async def test_output_arrives_before_the_process_ends(service: ProcessService) -> None:
    stream = service.start(sh("echo early; sleep 30"), ctx())
    start = await next_event(stream)
    data = await next_event(stream)
    assert data.event is not None
    assert data.event.value.output.value == b"early\n"
    assert start.event is not None
    assert alive(start.event.value.pid)
    sel = pid_of(start.event.value.pid)
    await service.send_signal(SendSignalRequest(process=sel, signal=Signal.SIGTERM), ctx())
    assert end_of(await collect(stream)).status == "signal: terminated"


async def test_disconnected_stream_leaves_the_process_running(
    service: ProcessService, runtime: Runtime
) -> None:
    stream = service.start(sh("while :; do echo tick; sleep 0.05; done", tag="bg"), ctx())
    start = await next_event(stream)
    assert start.event is not None
    pid = start.event.value.pid
    await stream.aclose()  # what connectrpc does when the client goes away
    # Whatever the stream's end did to the process is done once `aclose` returns: output it
    # prints afterwards (seen by a new reader) shows it running on.
    again = service.connect(ConnectRequest(process=pid_of(pid)), ctx())
    assert (await next_event(again)).event.field == "start"
    for _ in range(2):
        assert (await next_event(again)).event.field == "data"
    await again.aclose()
    assert alive(pid)
    listed = await service.list(ListRequest(), ctx())
    assert [(p.pid, p.tag) for p in listed.processes] == [(pid, "bg")]
    await runtime.processes.aclose()
    await eventually(lambda: not alive(pid), within=10, what="pid killed")


async def test_connect_after_end_replays_the_end_event(service: ProcessService) -> None:
    events = await collect(service.start(sh("exit 7"), ctx()))
    first = events[0].event
    assert first is not None
    replay = await collect(service.connect(ConnectRequest(process=pid_of(first.value.pid)), ctx()))
    assert [e.event.field for e in replay if e.event] == ["start", "end"]
    assert end_of(replay).exit_code == 7


async def test_keepalives_while_idle(service: ProcessService) -> None:
    """A silent process's stream carries a keepalive every interval; the process ends only once
    two have come (no race with a fixed-length `sleep`)."""
    before = time.monotonic()
    request = StartRequest(process=ProcessConfig(cmd="cat"), stdin=True)
    stream = service.start(request, ctx({"Keepalive-Ping-Interval": "1"}))
    start = await next_event(stream)
    assert start.event is not None
    assert start.event.field == "start"
    assert [(await next_event(stream)).event.field for _ in range(2)] == ["keepalive"] * 2
    assert time.monotonic() - before >= 2  # one interval of silence before each
    sel = pid_of(start.event.value.pid)
    await service.close_stdin(CloseStdinRequest(process=sel), ctx())
    kinds = [e.event.field for e in await collect(stream) if e.event]
    assert kinds[-1] == "end"
    assert set(kinds[:-1]) <= {"keepalive"}  # more of them if the close took a while


async def test_slow_reader_is_dropped_and_the_process_goes_on(service: ProcessService) -> None:
    """A reader that stops reading is dropped; another reader gets every byte and the end."""
    size = 16 * 1024 * 1024
    # The output starts only once the second reader is subscribed (it got its `start`).
    request = sh(f"read go; head -c {size} /dev/zero", stdin=True)
    slow = service.start(request, ctx())
    start = await next_event(slow)
    assert start.event is not None
    sel = pid_of(start.event.value.pid)
    fast = service.connect(ConnectRequest(process=sel), ctx())
    first = await next_event(fast)
    await service.send_input(SendInputRequest(process=sel, input=data_in("stdin", b"go\n")), ctx())
    events = [first, *await collect(fast)]
    assert len(output(events, "stdout")) == size
    assert end_of(events).exit_code == 0
    with pytest.raises(ConnectError) as err:
        await collect(slow)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert err.value.message == "stream reader too slow"


async def test_stdin_pipe_send_and_close(service: ProcessService) -> None:
    stream = service.start(sh("cat; echo done", stdin=True), ctx())
    start = await next_event(stream)
    assert start.event is not None
    sel = pid_of(start.event.value.pid)
    await service.send_input(SendInputRequest(process=sel, input=data_in("stdin", b"hi\n")), ctx())
    await service.close_stdin(CloseStdinRequest(process=sel), ctx())
    events = await collect(stream)
    assert output(events, "stdout") == b"hi\ndone\n"


async def test_stream_input(service: ProcessService) -> None:
    stream = service.start(sh("cat", stdin=True), ctx())
    start = await next_event(stream)
    assert start.event is not None
    sel = pid_of(start.event.value.pid)

    async def messages() -> AsyncIterator[StreamInputRequest]:
        yield StreamInputRequest(event=Oneof("start", StreamInputRequest.StartEvent(process=sel)))
        yield StreamInputRequest(event=Oneof("keepalive", StreamInputRequest.KeepAlive()))
        for chunk in (b"a", b"b"):
            data = StreamInputRequest.DataEvent(input=ProcessInput(input=Oneof("stdin", chunk)))
            yield StreamInputRequest(event=Oneof("data", data))

    await service.stream_input(messages(), ctx())
    await service.close_stdin(CloseStdinRequest(process=sel), ctx())
    assert output(await collect(stream), "stdout") == b"ab"


async def test_pty_resize_and_signal(service: ProcessService) -> None:
    request = StartRequest(
        process=ProcessConfig(cmd="/bin/sh", args=["-c", "stty size; read x; stty size; sleep 30"]),
        pty=PTY(size=PTY.Size(cols=100, rows=40)),
    )
    stream = service.start(request, ctx())
    start = await next_event(stream)
    assert start.event is not None
    sel = pid_of(start.event.value.pid)
    size = PTY(size=PTY.Size(cols=120, rows=50))
    seen = b""
    while b"40 100" not in seen:
        ev = await next_event(stream)
        assert ev.event is not None
        assert ev.event.field == "data"
        seen += ev.event.value.output.value
    await service.update(UpdateRequest(process=sel, pty=size), ctx())
    await service.send_input(SendInputRequest(process=sel, input=data_in("pty", b"\n")), ctx())
    while b"50 120" not in seen:
        ev = await next_event(stream)
        assert ev.event is not None
        assert ev.event.field == "data"
        seen += ev.event.value.output.value
    await service.send_signal(SendSignalRequest(process=sel, signal=Signal.SIGKILL), ctx())
    events = await collect(stream)
    end = end_of(events)
    assert (end.exit_code, end.exited, end.status) == (-1, False, "signal: killed")


async def test_shutdown_kills_background_children(
    service: ProcessService, runtime: Runtime
) -> None:
    stream = service.start(sh("sleep 60 & echo $!; wait"), ctx())
    await next_event(stream)
    child_ev = await next_event(stream)
    assert child_ev.event is not None
    child = int(child_ev.event.value.output.value)
    assert alive(child)
    t0 = time.monotonic()
    await runtime.processes.aclose()
    assert time.monotonic() - t0 < 30  # killed, not waited for (the child sleeps 60 s)
    events = await collect(stream)
    assert end_of(events).status == "signal: killed"
    await eventually(lambda: not alive(child), within=10, what="child killed")


async def test_tag_in_use_is_already_exists(service: ProcessService) -> None:
    first = service.start(sh("sleep 30", tag="web"), ctx())
    await next_event(first)
    with pytest.raises(ConnectError) as err:
        await next_event(service.start(sh("true", tag="web"), ctx()))
    assert err.value.code == Code.ALREADY_EXISTS
    await first.aclose()


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (StartRequest(process=ProcessConfig(cmd="/no/such/binary")), Code.FAILED_PRECONDITION),
        (
            StartRequest(process=ProcessConfig(cmd="true", cwd="/no/such/dir")),
            Code.INVALID_ARGUMENT,
        ),
        (StartRequest(), Code.INVALID_ARGUMENT),
    ],
)
async def test_start_failures(service: ProcessService, request_: StartRequest, code: Code) -> None:
    with pytest.raises(ConnectError) as err:
        await collect(service.start(request_, ctx()))
    assert err.value.code == code
    assert "Traceback" not in err.value.message


async def test_unknown_user(service: ProcessService) -> None:
    headers = {"Authorization": "Basic bm8tc3VjaC11c2VyLXh5ejo="}  # "no-such-user-xyz:"
    with pytest.raises(ConnectError) as err:
        await collect(service.start(sh("true"), ctx(headers)))
    assert err.value.code == Code.UNAUTHENTICATED


async def test_unknown_pid_and_tag_and_bad_requests(service: ProcessService) -> None:
    with pytest.raises(ConnectError) as err:
        await collect(service.connect(ConnectRequest(process=pid_of(999_999_9)), ctx()))
    assert err.value.code == Code.NOT_FOUND
    tag = ProcessSelector(selector=Oneof("tag", "nope"))
    with pytest.raises(ConnectError) as err:
        await service.send_signal(SendSignalRequest(process=tag, signal=Signal.SIGTERM), ctx())
    assert err.value.code == Code.NOT_FOUND
    stream = service.start(sh("sleep 30"), ctx())
    start = await next_event(stream)
    assert start.event is not None
    sel = pid_of(start.event.value.pid)
    calls = [
        service.update(UpdateRequest(process=sel, pty=PTY(size=PTY.Size(cols=1, rows=1))), ctx()),
        service.send_signal(SendSignalRequest(process=sel), ctx()),
        service.send_input(SendInputRequest(process=sel, input=data_in("stdin", b"x")), ctx()),
        service.send_input(SendInputRequest(process=sel, input=data_in("pty", b"x")), ctx()),
        service.close_stdin(CloseStdinRequest(process=sel), ctx()),
        service.connect(ConnectRequest(), ctx()).__anext__(),
    ]
    for call in calls:
        with pytest.raises(ConnectError) as err:
            await call
        assert err.value.code == Code.INVALID_ARGUMENT
    with contextlib.suppress(ProcessLookupError):
        os.killpg(start.event.value.pid, signal.SIGKILL)
    await collect(stream)


async def test_a_background_child_holding_the_pipes_does_not_hold_the_end(
    service: ProcessService, runtime: Runtime
) -> None:
    t0 = time.monotonic()
    events = await collect(service.start(sh("sleep 60 & echo $!"), ctx()))
    assert time.monotonic() - t0 < 30  # the end came with the shell, not with the child's 60 s
    assert end_of(events).exit_code == 0
    child = int(output(events, "stdout"))
    assert alive(child)
    await runtime.processes.aclose()  # sweeps the session of the ended shell
    await eventually(lambda: not alive(child), within=10, what="child killed")


async def test_pty_is_the_controlling_terminal_and_belongs_to_the_user(
    service: ProcessService,
) -> None:
    script = ': </dev/tty && echo has-ctty; test -w "$(tty)" && echo owns-tty; id -u'
    request = StartRequest(
        process=ProcessConfig(cmd="/bin/sh", args=["-c", script]),
        pty=PTY(size=PTY.Size(cols=80, rows=24)),
    )
    events = await collect(service.start(request, ctx({"Authorization": "Basic bm9ib2R5Og=="})))
    lines = output(events, "pty").decode().split()
    assert lines[:2] == ["has-ctty", "owns-tty"]
    assert lines[2] != "0"


async def test_starts_use_no_thread_and_leave_no_descriptor(
    service: ProcessService, runtime: Runtime
) -> None:
    """With its user cached (the usual case: `/init` looked the default user up), a Start
    spawns and watches its process on the event loop: no worker thread for the request, no
    waiter thread per process (Python 3.11's asyncio child watcher started one per child, and
    under TCG 50 Starts at once then waited on each other for tens of seconds); an ended process
    leaves no descriptor (pipes, pidfd) open."""
    lookup_user(runtime.defaults.user)
    threads, fds = set(threading.enumerate()), set(os.listdir("/proc/self/fd"))
    streams = [service.start(sh("sleep 30"), ctx()) for _ in range(5)]
    pids = [(await next_event(s)).event.value.pid for s in streams]  # type: ignore[union-attr]
    assert set(threading.enumerate()) <= threads
    for pid in pids:
        await service.send_signal(SendSignalRequest(process=pid_of(pid), signal=Signal.SIGKILL),
                                  ctx())  # fmt: skip
    for stream in streams:
        assert end_of(await collect(stream)).status == "signal: killed"
    assert set(threading.enumerate()) <= threads
    await eventually(lambda: set(os.listdir("/proc/self/fd")) <= fds, within=10,
                     what="the processes' descriptors closed")  # fmt: skip


def test_identity_switches_only_to_another_user() -> None:
    """Starting a process as envd's own user passes no uid/gid/groups, so CPython can `vfork`
    (a full `fork` of envd costs the guest's vCPU ~0.2 s under TCG); another user is switched
    to when envd is root."""
    me = User(name="me", uid=os.geteuid(), gid=os.getegid(), home=Path("/"), shell="/bin/sh",
              groups=tuple(os.getgroups()))  # fmt: skip
    assert identity_args(me) == {}
    other = User(name="nobody", uid=65534, gid=65534, home=Path("/"), shell="/bin/sh",
                 groups=(65534,))  # fmt: skip
    switch = {"user": 65534, "group": 65534, "extra_groups": [65534]}
    assert identity_args(other) == (switch if os.geteuid() == 0 else {})
