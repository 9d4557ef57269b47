"""envd's `process.Process` service over the wire: a real envd, the generated Connect client.

The first test speaks the JSON codec, as E2B's SDK does; the rest use the default binary one.
Every process a test starts is SIGKILLed with its process group when the test ends, whatever
envd did, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pwd
import signal
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.codec import proto_json_codec
from connectrpc.errors import ConnectError
from protobuf import Oneof

from nestbox.protocol.gen.process.process_connect import ProcessClient
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
    StartResponse,
    StreamInputRequest,
    UpdateRequest,
)
from tests.conftest import eventually

if TYPE_CHECKING:
    from tests.integration.envd_process import EnvdProcess

EVENT_TIMEOUT_S = 15


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids of processes a test started; their process groups are killed afterwards."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
async def client(envd: EnvdProcess) -> AsyncIterator[ProcessClient]:
    async with ProcessClient(envd.url) as c:
        yield c


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


def by_pid(pid: int) -> ProcessSelector:
    return ProcessSelector(selector=Oneof("pid", pid))


def by_tag(tag: str) -> ProcessSelector:
    return ProcessSelector(selector=Oneof("tag", tag))


def sh(script: str, **kw: Any) -> StartRequest:
    return StartRequest(process=ProcessConfig(cmd="/bin/sh", args=["-c", script]), **kw)


def stdin(data: bytes) -> ProcessInput:
    return ProcessInput(input=Oneof("stdin", data))


async def next_event(stream: AsyncIterator[Any]) -> ProcessEvent:
    resp = await asyncio.wait_for(anext(stream), EVENT_TIMEOUT_S)
    return cast(ProcessEvent, resp.event)


async def started(stream: AsyncIterator[Any], pids: list[int]) -> int:
    """Read the `start` event; record and return the pid."""
    ev = (await next_event(stream)).event
    assert ev is not None
    assert ev.field == "start", ev
    pids.append(ev.value.pid)
    return int(ev.value.pid)


async def leave(stream: AsyncIterator[Any]) -> None:
    """Close a server stream early, as a client that goes away does."""
    await cast(AsyncGenerator[Any, None], stream).aclose()


async def collect(stream: AsyncIterator[Any]) -> list[ProcessEvent]:
    async with asyncio.timeout(60):
        return [resp.event async for resp in stream]


def fields(events: list[ProcessEvent]) -> list[str]:
    return [e.event.field for e in events if e.event is not None]


def output(events: list[ProcessEvent], kind: str) -> bytes:
    return b"".join(
        e.event.value.output.value
        for e in events
        if e.event is not None and e.event.field == "data" and e.event.value.output.field == kind
    )


def end_of(events: list[ProcessEvent]) -> ProcessEvent.EndEvent:
    last = events[-1].event
    assert last is not None
    assert last.field == "end", events
    return cast(ProcessEvent.EndEvent, last.value)


async def read_until(stream: AsyncIterator[Any], needle: bytes) -> bytes:
    """Data events until their bytes contain `needle` (keepalives are skipped)."""
    seen = b""
    while needle not in seen:
        ev = (await next_event(stream)).event
        assert ev is not None
        assert ev.field in ("data", "keepalive"), (ev, seen)
        if ev.field == "data":
            seen += ev.value.output.value
    return seen


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_exec_like_the_e2b_sdk_with_the_json_codec(
    envd: EnvdProcess, pids: list[int]
) -> None:
    async with ProcessClient(envd.url, codec=proto_json_codec()) as json_client:
        request = StartRequest(
            process=ProcessConfig(
                cmd="/bin/bash", args=["-l", "-c", "echo out; echo err >&2; exit 3"], envs={}
            ),
            stdin=False,
        )
        stream = json_client.start(request, headers={"Keepalive-Ping-Interval": "50"})
        await started(stream, pids)
        events = await collect(stream)
    assert output(events, "stdout") == b"out\n"
    assert output(events, "stderr") == b"err\n"
    end = end_of(events)
    assert (end.exit_code, end.exited, end.status) == (3, True, "exit status 3")


async def test_env_cwd_and_user(client: ProcessClient, pids: list[int], tmp_path: Path) -> None:
    script = 'echo "$GREETING"; pwd; id -u; echo "$HOME"'
    request = StartRequest(
        process=ProcessConfig(cmd="/bin/sh", args=["-c", script], envs={"GREETING": "hi"},
                              cwd=str(tmp_path))
    )  # fmt: skip
    stream = client.start(request)
    await started(stream, pids)
    as_root = output(await collect(stream), "stdout").decode().splitlines()
    assert as_root == ["hi", str(tmp_path), "0", "/root"]

    stream = client.start(sh(script), headers=basic("nobody"))
    await started(stream, pids)
    as_nobody = output(await collect(stream), "stdout").decode().splitlines()
    assert as_nobody[2] == str(pwd.getpwnam("nobody").pw_uid) != "0"
    assert as_nobody[1] == "/"  # nobody's home does not exist: the fallback


async def test_pty_session_input_resize_output(client: ProcessClient, pids: list[int]) -> None:
    request = StartRequest(
        process=ProcessConfig(cmd="/bin/sh", args=["-i"], envs={"PS1": "$ "}),
        pty=PTY(size=PTY.Size(cols=80, rows=24)),
    )
    stream = client.start(request)
    pid = await started(stream, pids)

    async def type_(text: bytes) -> None:
        data = ProcessInput(input=Oneof("pty", text))
        await client.send_input(SendInputRequest(process=by_pid(pid), input=data))

    await type_(b"stty size\n")
    await read_until(stream, b"24 80")
    await client.update(
        UpdateRequest(process=by_pid(pid), pty=PTY(size=PTY.Size(cols=100, rows=30)))
    )
    await type_(b"stty size\n")
    await read_until(stream, b"30 100")
    await type_(b"exit 4\n")
    events = await collect(stream)
    assert end_of(events).exit_code == 4


async def test_background_process_reattach_list_and_kill(
    client: ProcessClient, pids: list[int]
) -> None:
    script = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"
    stream = client.start(sh(script, tag="ticker"))
    pid = await started(stream, pids)
    await read_until(stream, b"tick 0")
    await leave(stream)  # the client goes away; the process must not go with it

    listed = (await client.list(ListRequest())).processes
    assert [(p.pid, p.tag) for p in listed] == [(pid, "ticker")]
    assert listed[0].config is not None
    assert (listed[0].config.cmd, list(listed[0].config.args)) == ("/bin/sh", ["-c", script])

    attached = client.connect(ConnectRequest(process=by_tag("ticker")))
    ev = (await next_event(attached)).event
    assert ev is not None
    assert (ev.field, ev.value.pid) == ("start", pid)
    # Ticks printed after this re-attach: envd handled the first stream's disconnect on the
    # same event loop long before it served this one, and the process outlived it.
    seen = b""
    while seen.count(b"\n") < 2:
        seen += await read_until(attached, b"\n")
    assert alive(pid)
    await client.send_signal(SendSignalRequest(process=by_pid(pid), signal=Signal.SIGKILL))
    events = await collect(attached)
    end = end_of(events)
    assert (end.exit_code, end.exited, end.status) == (-1, False, "signal: killed")
    await eventually(lambda: not alive(pid), within=10, what="pid killed")
    assert (await client.list(ListRequest())).processes == []


async def test_stdin_send_input_and_close(client: ProcessClient, pids: list[int]) -> None:
    stream = client.start(StartRequest(process=ProcessConfig(cmd="cat"), stdin=True))
    pid = await started(stream, pids)
    await client.send_input(SendInputRequest(process=by_pid(pid), input=stdin(b"hello ")))
    await client.send_input(SendInputRequest(process=by_pid(pid), input=stdin(b"world")))
    await client.close_stdin(CloseStdinRequest(process=by_pid(pid)))
    events = await collect(stream)
    assert output(events, "stdout") == b"hello world"
    assert end_of(events).exit_code == 0


async def test_stream_input(client: ProcessClient, pids: list[int]) -> None:
    stream = client.start(StartRequest(process=ProcessConfig(cmd="cat"), stdin=True, tag="cat"))
    pid = await started(stream, pids)

    async def messages() -> AsyncIterator[StreamInputRequest]:
        start = StreamInputRequest.StartEvent(process=by_tag("cat"))
        yield StreamInputRequest(event=Oneof("start", start))
        yield StreamInputRequest(event=Oneof("keepalive", StreamInputRequest.KeepAlive()))
        for chunk in (b"one ", b"two"):
            data = StreamInputRequest.DataEvent(input=stdin(chunk))
            yield StreamInputRequest(event=Oneof("data", data))

    await client.stream_input(messages())
    await client.close_stdin(CloseStdinRequest(process=by_pid(pid)))
    assert output(await collect(stream), "stdout") == b"one two"


async def test_keepalive_events_while_idle(client: ProcessClient, pids: list[int]) -> None:
    """A silent process's stream carries a keepalive every interval; the process here ends only
    once the test has seen two of them (no race with a fixed-length `sleep`)."""
    before = time.monotonic()
    stream = client.start(StartRequest(process=ProcessConfig(cmd="cat"), stdin=True),
                          headers={"Keepalive-Ping-Interval": "1"})  # fmt: skip
    pid = await started(stream, pids)
    assert [(await next_event(stream)).event.field for _ in range(2)] == ["keepalive"] * 2
    assert time.monotonic() - before >= 2  # one interval of silence before each
    await client.close_stdin(CloseStdinRequest(process=by_pid(pid)))
    rest = fields(await collect(stream))
    assert rest[-1] == "end"
    assert set(rest[:-1]) <= {"keepalive"}  # more of them if the close took a while


async def test_start_errors(client: ProcessClient) -> None:
    cases = [
        (StartRequest(process=ProcessConfig(cmd="/no/such/binary")), {}, Code.FAILED_PRECONDITION),
        (StartRequest(process=ProcessConfig(cmd="true", cwd="/no/such/dir")), {},
         Code.INVALID_ARGUMENT),
        (sh("true"), basic("no-such-user-xyz"), Code.UNAUTHENTICATED),
    ]  # fmt: skip
    for request, headers, code in cases:
        with pytest.raises(ConnectError) as err:
            await collect(client.start(request, headers=headers))
        assert err.value.code == code, err.value
        assert "Traceback" not in err.value.message


async def test_unknown_process_and_resize_of_a_non_pty(
    client: ProcessClient, pids: list[int]
) -> None:
    with pytest.raises(ConnectError) as err:
        await collect(client.connect(ConnectRequest(process=by_pid(99_999_999))))
    assert err.value.code == Code.NOT_FOUND
    with pytest.raises(ConnectError) as err:
        await client.send_signal(SendSignalRequest(process=by_tag("nope"), signal=Signal.SIGKILL))
    assert err.value.code == Code.NOT_FOUND

    stream = client.start(sh("sleep 30"))
    pid = await started(stream, pids)
    with pytest.raises(ConnectError) as err:
        await client.update(
            UpdateRequest(process=by_pid(pid), pty=PTY(size=PTY.Size(cols=9, rows=9)))
        )
    assert err.value.code == Code.INVALID_ARGUMENT
    await client.send_signal(SendSignalRequest(process=by_pid(pid), signal=Signal.SIGTERM))
    assert end_of(await collect(stream)).status == "signal: terminated"


async def test_envd_shutdown_kills_its_processes(
    envd: EnvdProcess, client: ProcessClient, pids: list[int]
) -> None:
    stream = client.start(sh("sleep 60 & echo $!; wait", tag="doomed"))
    pid = await started(stream, pids)
    child = int(await read_until(stream, b"\n"))
    await leave(stream)
    assert alive(pid)
    assert alive(child)
    os.kill(envd.pid, signal.SIGTERM)
    await asyncio.to_thread(envd.proc.wait, 20)  # uvicorn re-raises SIGTERM: no exit code check
    await eventually(lambda: not alive(pid), within=10, what="pid killed")
    await eventually(lambda: not alive(child), within=10, what="child killed")


async def test_a_stalled_reader_never_stalls_the_process(
    envd: EnvdProcess, client: ProcessClient, pids: list[int]
) -> None:
    """A client that stops reading is dropped with resource_exhausted; the process runs on.

    httpx reads the socket only on demand, so the stall reaches envd as TCP backpressure (the
    generated client's transport would keep reading in the background).
    """
    size = 256 * 1024 * 1024
    body = sh(f"head -c {size} /dev/zero").to_binary()
    headers = {"content-type": "application/connect+proto", "connect-protocol-version": "1"}
    url = f"{envd.url}/process.Process/Start"
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream(
            "POST", url, content=struct.pack(">BI", 0, len(body)) + body, headers=headers
        ) as resp,
    ):
        chunks = resp.aiter_raw()
        first = await anext(chunks)
        start = StartResponse.from_binary(first[5 : 5 + struct.unpack(">I", first[1:5])[0]])
        assert start.event is not None
        assert start.event.event is not None
        pid = start.event.event.value.pid
        pids.append(pid)
        for _ in range(200):  # the process finishes although nobody reads its output
            await asyncio.sleep(0.1)
            if pid not in [p.pid for p in (await client.list(ListRequest())).processes]:
                break
        await eventually(lambda: not alive(pid), within=10, what="pid killed")
        rest = b"".join([first] + [chunk async for chunk in chunks])
    flags, end = last_envelope(rest)
    assert flags & 0x02  # end of stream
    assert json.loads(end)["error"] == {"code": "resource_exhausted",
                                        "message": "stream reader too slow"}  # fmt: skip


def last_envelope(data: bytes) -> tuple[int, bytes]:
    """The flags and payload of the last Connect envelope in a stream body."""
    offset, last = 0, (0, b"")
    while offset < len(data):
        flags, length = struct.unpack(">BI", data[offset : offset + 5])
        last = (flags, data[offset + 5 : offset + 5 + length])
        offset += 5 + length
    return last
