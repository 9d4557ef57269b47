"""The agent's per-capsule envd client against a real envd process on localhost.

One envd serves the whole module (each test uses its own paths, tags and processes); the
close-idle test counts envd's ESTABLISHED sockets in /proc/net/tcp to see our FINs arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import psutil
import pytest

from nestbox.hostagent.envdconn import (
    CHUNK,
    CapsuleEnvd,
    Ended,
    Output,
    PoolSettings,
    Started,
    init_request,
)
from nestbox.hostagent.envdconn.errors import (
    Conflict,
    DeadlineExceeded,
    EnvdCallError,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from tests.conftest import eventually, free_port
from tests.integration.envd_process import EnvdProcess, run_envd

EVENT_TIMEOUT_S = 15


@pytest.fixture(scope="module")
def shared_envd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvdProcess]:
    with run_envd(tmp_path_factory.mktemp("envd")) as proc:
        yield proc


@pytest.fixture
async def envd(shared_envd: EnvdProcess) -> AsyncIterator[CapsuleEnvd]:
    async with CapsuleEnvd(shared_envd.url) as client:
        yield client


def established_to(port: int) -> int:
    """envd's side of every open connection to `port` (server sockets in ESTABLISHED)."""
    return sum(
        1
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def wait_for_count(port: int, wanted: int) -> int:
    with anyio.move_on_after(30):
        while established_to(port) != wanted:  # noqa: ASYNC110 (the state has no event to wait on)
            await anyio.sleep(0.02)
    return established_to(port)


# ---- lifecycle -------------------------------------------------------------------------------


async def test_health_and_metrics(envd: CapsuleEnvd) -> None:
    assert await envd.health()
    assert await envd.is_healthy()
    assert (await envd.metrics())["cpu_count"] >= 1


async def test_unreachable_envd_is_unavailable() -> None:
    async with CapsuleEnvd(f"http://127.0.0.1:{free_port()}") as dead:
        assert not await dead.is_healthy()
        with pytest.raises(Unavailable):
            await dead.exec("true")
        with pytest.raises(Unavailable):
            await dead.stat("/")


async def test_init_sets_identity_and_token(tmp_path: Path) -> None:
    """`/init` with an access token: later calls need it (a fresh envd: the token sticks)."""
    with run_envd(tmp_path) as own:
        async with CapsuleEnvd(own.url, access_token="tok") as envd:
            request = init_request(capsule_id="cl-x", template_id="minimal", access_token="tok")
            await envd.init(request)
            result = await envd.exec("/bin/sh", ["-c", "echo $NESTBOX_CAPSULE_ID"])
            assert result.stdout == b"cl-x\n"
        async with CapsuleEnvd(own.url) as tokenless:
            with pytest.raises(Unauthorized):
                await tokenless.exec("true")
            with pytest.raises(Unauthorized):
                await tokenless.stat("/")
            assert await tokenless.is_healthy()  # /health needs no token


async def test_response_header_timeout() -> None:
    """A server that takes the connection and never answers: the 30 s response-header
    timeout (here 0.3 s; a process Start's 120 s here 0.6 s) ends the call, for unary and
    streaming calls alike."""
    accepted: list[anyio.abc.SocketStream] = []

    async def hold(stream: anyio.abc.SocketStream) -> None:
        accepted.append(stream)
        async with stream:
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    pool = PoolSettings(response_header_timeout_s=0.3, start_header_timeout_s=0.6)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        async with CapsuleEnvd(f"http://127.0.0.1:{port}", pool=pool) as envd:
            with anyio.fail_after(30):  # a hang: without the timeout they would wait for ever
                with pytest.raises(DeadlineExceeded):
                    await envd.stat("/")
                with pytest.raises(DeadlineExceeded):
                    await envd.list_processes()
                with pytest.raises(DeadlineExceeded):
                    async for _ in envd.read_file_stream("/etc/hostname"):
                        pass
                with pytest.raises(DeadlineExceeded):
                    await envd.exec("true")
        tg.cancel_scope.cancel()
    assert accepted


async def test_a_start_waits_longer_for_its_head() -> None:
    """A server that answers every request only after `late_s`: calls with the 30 s header
    bound (here 0.3 s) give up first, a process Start (whose head comes once the process is
    spawned, and spawns queue on the capsule's one vCPU) gets the answer (a 404 here)."""
    late_s = 1.0

    async def answer_late(stream: anyio.abc.SocketStream) -> None:
        # The calls that gave up have closed their connection: the answer may meet a reset.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream):
            async with stream:
                await stream.receive()
                await anyio.sleep(late_s)
                await stream.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")  # fmt: skip

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    pool = PoolSettings(response_header_timeout_s=0.3)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer_late)
        async with CapsuleEnvd(f"http://127.0.0.1:{port}", pool=pool) as envd:
            with anyio.fail_after(60):
                with pytest.raises(DeadlineExceeded):
                    await envd.list_processes()
                with pytest.raises(EnvdCallError) as refused:
                    await envd.exec("true")
                assert not isinstance(refused.value, DeadlineExceeded), refused.value
                with pytest.raises(EnvdCallError) as refused:
                    await envd.start_background("true")
                assert not isinstance(refused.value, DeadlineExceeded), refused.value
        tg.cancel_scope.cancel()


async def test_closed_client_is_unavailable(shared_envd: EnvdProcess) -> None:
    client = CapsuleEnvd(shared_envd.url)
    await client.aclose()
    with pytest.raises(Unavailable):
        await client.health()


# ---- processes ---------------------------------------------------------------------------


async def test_exec_collects_output_and_exit_code(envd: CapsuleEnvd, tmp_path: Path) -> None:
    result = await envd.exec(
        "/bin/sh",
        ["-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 3'],
        envs={"GREETING": "hello"},
        cwd=str(tmp_path),
    )
    assert result.stdout == f"hello from {tmp_path}\n".encode()
    assert result.stderr == b"oops\n"
    assert result.exit_code == 3
    assert result.pid > 0
    assert not result.truncated


async def test_exec_truncates_huge_output(envd: CapsuleEnvd) -> None:
    result = await envd.exec("/bin/sh", ["-c", "head -c 300000 /dev/zero"], max_output=1000)
    assert result.stdout == b"\0" * 1000
    assert result.truncated


async def test_exec_timeout_kills_the_process(envd: CapsuleEnvd) -> None:
    with pytest.raises(DeadlineExceeded):
        await envd.exec("/bin/sleep", ["30"], timeout_s=0.3)

    async def gone() -> bool:  # envd lists it until it has reaped it, just after the SIGKILL
        return not [p for p in await envd.list_processes() if p.args == ("30",)]

    await eventually(gone, within=10, what="the timed-out process killed")  # long before 30 s


async def test_exec_refusals_map_to_codes(envd: CapsuleEnvd) -> None:
    with pytest.raises(InvalidRequest):
        await envd.exec("/no/such/binary")
    with pytest.raises(InvalidRequest):
        await envd.exec("true", cwd="/no/such/dir")
    with pytest.raises(NotFound):
        await envd.kill_process("no-such-tag")


async def test_cancellation_stays_cancellation(envd: CapsuleEnvd) -> None:
    """connectrpc wraps CancelledError; the caller's scope must still see its timeout."""
    with pytest.raises(TimeoutError), anyio.fail_after(0.3):
        await envd.exec("/bin/sleep", ["5"], timeout_s=None)

    async def follow() -> None:
        async with envd.exec_stream("/bin/sleep", ["5"]) as events:
            async for _ in events:
                pass

    with pytest.raises(TimeoutError), anyio.fail_after(0.3):
        await follow()
    await envd.exec("/bin/true")  # the client still works


async def test_exec_stream_events_in_order(envd: CapsuleEnvd) -> None:
    seen: list[object] = []
    with anyio.fail_after(EVENT_TIMEOUT_S):
        async with envd.exec_stream("/bin/sh", ["-c", "echo a; echo b >&2; exit 7"]) as events:
            assert events.pid > 0
            seen = [e async for e in events]
    assert isinstance(seen[0], Started)
    assert seen[0].pid == events.pid
    outputs = [(e.stream, e.data) for e in seen if isinstance(e, Output)]
    assert sorted(outputs) == [("stderr", b"b\n"), ("stdout", b"a\n")]
    assert isinstance(seen[-1], Ended)
    assert seen[-1].exit_code == 7
    assert events.ended == seen[-1]


async def test_background_list_connect_and_kill(envd: CapsuleEnvd) -> None:
    script = "while true; do echo tick; sleep 0.1; done"
    bg = await envd.start_background("/bin/sh", ["-c", script], tag="ticker")
    assert bg.tag == "ticker"
    listed = {p.tag: p for p in await envd.list_processes()}
    assert listed["ticker"].pid == bg.pid
    assert listed["ticker"].args == ("-c", script)
    with anyio.fail_after(EVENT_TIMEOUT_S):
        async with envd.connect_process("ticker") as events:
            assert events.pid == bg.pid
            async for event in events:
                if isinstance(event, Output):
                    assert event.data.startswith(b"tick")
                    break
    with pytest.raises(Conflict):
        await envd.start_background("/bin/sleep", ["1"], tag="ticker")
    await envd.kill_process(bg.pid, "SIGTERM")
    with anyio.fail_after(EVENT_TIMEOUT_S):
        while any(p.tag == "ticker" for p in await envd.list_processes()):  # noqa: ASYNC110 (the state has no event to wait on)
            await anyio.sleep(0.05)
    auto = await envd.start_background("/bin/sleep", ["30"])
    assert auto.tag.startswith("proc-")
    await envd.kill_process(auto.tag)
    with pytest.raises(InvalidRequest):
        await envd.kill_process(auto.pid, "SIGHUP")


async def test_stdin(envd: CapsuleEnvd) -> None:
    """Processes started by the client get no stdin; sending input is refused cleanly."""
    bg = await envd.start_background("/bin/sleep", ["30"])
    try:
        with pytest.raises((InvalidRequest, NotFound)):
            await envd.send_stdin(bg.pid, b"x")
    finally:
        await envd.kill_process(bg.pid)


async def test_stdin_pipe_reaches_the_process(envd: CapsuleEnvd, tmp_path: Path) -> None:
    """With `stdin`, a background process reads what `send_stdin` writes, to the end that
    `close_stdin` makes."""
    out = tmp_path / "cat.out"
    bg = await envd.start_background("/bin/sh", ["-c", f"cat > {out}"], stdin=True)
    await envd.send_stdin(bg.pid, b"hello ")
    await envd.send_stdin(bg.tag, b"world\n")
    await envd.close_stdin(bg.pid)
    done = b"hello world\n"
    await eventually(lambda: out.exists() and out.read_bytes() == done, within=EVENT_TIMEOUT_S)


async def test_watch_dir_starts_then_reports_changes(envd: CapsuleEnvd, tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    events = envd.watch_dir(str(watched))
    try:
        with anyio.fail_after(EVENT_TIMEOUT_S):
            assert (await anext(events)).type == "start"
            (watched / "new.txt").write_bytes(b"x")
            event = await anext(events)
        assert (event.type, event.name) == ("create", "new.txt")
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # an async generator
    with pytest.raises(NotFound):
        await anext(envd.watch_dir(str(tmp_path / "missing")))


# ---- PTY -----------------------------------------------------------------------------------


async def read_until(events: AsyncIterator[object], needle: bytes) -> bytes:
    seen = b""
    with anyio.fail_after(EVENT_TIMEOUT_S):
        async for event in events:
            if isinstance(event, Output):
                assert event.stream == "pty"
                seen += event.data
                if needle in seen:
                    return seen
    raise AssertionError(f"stream ended before {needle!r}: {seen!r}")


async def test_pty_attach_input_resize_reconnect_kill(envd: CapsuleEnvd) -> None:
    async with envd.pty_attach("/bin/sh", cols=80, rows=24, envs={"PS1": "$ "}) as term:
        tag = term.tag
        assert tag is not None
        assert tag.startswith("pty-")
        await envd.pty_input(tag, b"echo $((6*7))\n")
        await read_until(term, b"42")
        await envd.pty_resize(tag, 100, 30)
        await envd.pty_input(tag, b"stty size\n")
        await read_until(term, b"30 100")
    # the stream is gone, the terminal is not: reconnect by tag
    async with envd.pty_attach(None, tag=tag) as again:
        assert again.tag == tag
        await envd.pty_input(tag, b"echo again-$((1+1))\n")
        await read_until(again, b"again-2")
        await envd.pty_kill(tag)
        with anyio.fail_after(EVENT_TIMEOUT_S):
            rest = [e async for e in again]
        assert isinstance(rest[-1], Ended)
    with pytest.raises(NotFound):
        await envd.pty_input(tag, b"x")
    with pytest.raises(InvalidRequest):
        envd.pty_attach(None)
    with pytest.raises(InvalidRequest):
        await envd.pty_resize(tag, 0, 10)


# ---- files ---------------------------------------------------------------------------------


async def pseudo_random(total: int, seed: bytes) -> AsyncIterator[bytes]:
    """`total` deterministic bytes in uneven pieces (so the client has to re-chunk)."""
    block = hashlib.sha512(seed).digest() * 8192  # 512 KiB
    sent = 0
    piece = 100_000
    while sent < total:
        n = min(piece, total - sent)
        yield block[:n]
        sent += n
        piece = 300_000 if piece == 100_000 else 100_000


async def test_streamed_50_mib_round_trip(envd: CapsuleEnvd, tmp_path: Path) -> None:
    total = 50 * 1024 * 1024
    want = hashlib.sha256()
    async for chunk in pseudo_random(total, b"seed"):
        want.update(chunk)
    target = str(tmp_path / "deep" / "big.bin")
    written = await envd.write_file_stream(target, pseudo_random(total, b"seed"))
    assert written == target
    got = hashlib.sha256()
    sizes: list[int] = []
    async for chunk in envd.read_file_stream(target):
        got.update(chunk)
        sizes.append(len(chunk))
    assert sum(sizes) == total
    assert got.hexdigest() == want.hexdigest()
    assert set(sizes[:-1]) == {CHUNK}
    assert 0 < sizes[-1] <= CHUNK


async def test_whole_file_read_and_write(envd: CapsuleEnvd, tmp_path: Path) -> None:
    path = str(tmp_path / "small.txt")
    assert await envd.write_file(path, b"hello\n") == path
    assert await envd.read_file(path) == b"hello\n"
    with pytest.raises(TooLarge):
        await envd.read_file(path, max_bytes=3)
    with pytest.raises(NotFound):
        await envd.read_file(str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest):
        await envd.read_file(str(tmp_path))  # a directory
    with pytest.raises(NotFound):
        async for _ in envd.read_file_stream(str(tmp_path / "missing")):
            pass


async def test_filesystem_operations(envd: CapsuleEnvd, tmp_path: Path) -> None:
    base = tmp_path / "fs"
    made = await envd.make_dir(str(base / "a" / "b"))
    assert made.type == "directory"
    assert made.path == str(base / "a" / "b")
    with pytest.raises(Conflict):
        await envd.make_dir(str(base / "a" / "b"))
    await envd.write_file(str(base / "a" / "f.txt"), b"12345")
    entry = await envd.stat(str(base / "a" / "f.txt"))
    assert (entry.name, entry.type, entry.size) == ("f.txt", "file", 5)
    assert entry.permissions.startswith("-rw")
    assert entry.modified_at > 0
    names = sorted(e.path for e in await envd.list_dir(str(base), depth=2))
    assert names == [str(base / "a"), str(base / "a" / "b"), str(base / "a" / "f.txt")]
    moved = await envd.move(str(base / "a" / "f.txt"), str(base / "g.txt"))
    assert moved.path == str(base / "g.txt")
    await envd.remove(str(base / "a"))
    assert [e.name for e in await envd.list_dir(str(base))] == ["g.txt"]
    with pytest.raises(NotFound):
        await envd.stat(str(base / "a"))


# ---- connection hygiene -----------------------------------------------------------------


async def test_close_idle_sends_fins_before_prepare(
    shared_envd: EnvdProcess, tmp_path: Path
) -> None:
    """Idle connections of both pools close (envd sees them go) while a running stream
    survives; the seed does this right before `/snapshot/prepare`."""
    port = shared_envd.port
    go = tmp_path / "go"  # the stream's process finishes once this exists
    async with CapsuleEnvd(shared_envd.url) as envd:
        await wait_for_count(port, 0)
        async with anyio.create_task_group() as tg:  # several idle unary connections
            for _ in range(3):
                tg.start_soon(envd.health)
            for _ in range(2):
                tg.start_soon(envd.list_processes)  # and idle streaming-pool ones
        assert established_to(port) >= 3
        script = f"echo 1; while [ ! -e {go} ]; do sleep 0.02; done; echo 2"
        async with envd.exec_stream("/bin/sh", ["-c", script]) as events:
            first = await anext(events)
            assert isinstance(first, Started)
            await envd.close_idle()
            assert await wait_for_count(port, 1) == 1  # only the running stream is left
            go.touch()
            rest = [e async for e in events]
        assert isinstance(rest[-1], Ended)
        assert rest[-1].exit_code == 0
        assert b"".join(e.data for e in rest if isinstance(e, Output)) == b"1\n2\n"
        assert envd.statistics().generation == 2
        assert await envd.health()  # fresh pools work
        await envd.close_idle()
        assert await wait_for_count(port, 0) == 0
