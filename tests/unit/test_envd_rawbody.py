"""Upload bodies read straight off the connection (`envd/rawbody.py`): envd's real protocol and
`/files` handler under uvicorn on a loopback socket, driven with raw bytes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import pwd
import random
import socket
from typing import TYPE_CHECKING, Any, cast

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from nestbox.envd import files, splice
from nestbox.envd.conntrack import ConnTracker
from nestbox.envd.filesystem.atomic import TEMP_PREFIX
from nestbox.envd.filesystem.watch import WatcherRegistry
from nestbox.envd.rawbody import (
    CHUNK,
    EXTENSION,
    MIN_LENGTH,
    SENDFILE,
    _Framing,
    raw_body_protocol,
)
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.splice import Collector
from nestbox.envd.state import Runtime
from tests.conftest import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


class Server:
    def __init__(self, port: int, raw: list[bool], sent: list[bool]) -> None:
        self.port = port
        self.raw = raw
        """For each upload, whether its body came through the raw path."""
        self.sent = sent
        """For each download, whether it was offered sendfile(2)."""
        self.spliced: list[int] = []
        """For each upload body moved by splice(2), the bytes written."""

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    none = cast("Any", None)
    rt = Runtime(settings=EnvdSettings(), in_vm=False, processes=none,
                 watchers=WatcherRegistry(), tracker=none, ports=none)  # fmt: skip
    rt.defaults.user = pwd.getpwuid(os.geteuid()).pw_name
    raw: list[bool] = []
    sent: list[bool] = []

    async def upload(request: Any) -> Any:
        raw.append(EXTENSION in request.scope.get("extensions", {}))
        return await files.upload(request)

    async def download(request: Any) -> Any:
        sent.append(SENDFILE in request.scope.get("extensions", {}))
        return await files.download(request)

    app = Starlette(routes=[Route("/files", download, methods=["GET"]),
                            Route("/files", upload, methods=["POST"])])  # fmt: skip
    app.state.runtime = rt
    config = uvicorn.Config(app=app, http=raw_body_protocol(ConnTracker(), frozenset({"/files"})),
                            lifespan="off", log_config=None, access_log=False)  # fmt: skip
    server = uvicorn.Server(config)
    sock = socket.create_server(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started, what="uvicorn started")
    try:
        made = Server(sock.getsockname()[1], raw, sent)
        splice_body = splice.splice_body

        def counted(*args: Any) -> int:
            written = splice_body(*args)
            made.spliced.append(written)
            return written

        monkeypatch.setattr(splice, "splice_body", counted)
        yield made
    finally:
        server.should_exit = True
        await task
        sock.close()


def head(path: Path, extra: str, *, method: str = "POST") -> bytes:
    if method == "POST" and "Content-Type" not in extra:
        extra += "Content-Type: application/octet-stream\r\n"
    return f"{method} /files?path={path} HTTP/1.1\r\nHost: envd\r\n{extra}\r\n".encode()


def chunked(data: bytes, sizes: list[int], trailer: bytes = b"") -> bytes:
    out, at = bytearray(), 0
    for i, size in enumerate(sizes):
        piece = data[at : at + size]
        ext = b";x=y" if i % 2 else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        at += size
    assert at == len(data)
    return bytes(out + b"0\r\n" + trailer + b"\r\n")


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed, as envd's are)."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def send_in_pieces(writer: asyncio.StreamWriter, data: bytes, seed: int) -> None:
    """`data` in writes of random sizes (single bytes among them), so framing straddles reads."""
    rng, at = random.Random(seed), 0
    while at < len(data):
        size = rng.choice([1, 2, 3, 7, 100, 4096, 70_000, 300_000])
        writer.write(data[at : at + size])
        await writer.drain()
        at += size


async def test_chunked_upload_is_read_raw_and_the_connection_kept(
    server: Server, tmp_path: Path
) -> None:
    data = os.urandom(2 * CHUNK + 12345)
    sizes = [1, 99_999, CHUNK + 3, len(data) - CHUNK - 100_003]
    target = tmp_path / "d" / "f.bin"
    body = chunked(data, sizes, trailer=b"X-Checksum: none\r\n")
    reader, writer = await server.connect()
    writer.write(head(target, "Transfer-Encoding: chunked\r\n"))
    await send_in_pieces(writer, body, seed=1)
    status, headers, answer = await response(reader)
    assert status == 200, answer
    assert headers.get("connection") != "close"
    assert target.read_bytes() == data
    assert len(server.spliced) == 1  # the kernel moved the body, framing read by peeking
    assert 0 < server.spliced[0] <= len(data)
    # The same connection serves the next request.
    writer.write(head(target, "", method="GET"))
    status, _, got = await response(reader)
    assert (status, got) == (200, data)
    await close(writer)
    assert server.raw == [True]


async def test_a_request_pipelined_after_a_chunked_body_is_answered(
    server: Server, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    target = tmp_path / "f.bin"
    reader, writer = await server.connect()
    writer.write(head(target, "Transfer-Encoding: chunked\r\n") + chunked(data, [len(data)])
                 + head(target, "", method="GET"))  # fmt: skip
    first, second = await response(reader), await response(reader)
    assert first[0] == 200
    assert second[0] == 200
    assert second[2] == data
    await close(writer)


async def test_a_large_content_length_body_is_read_raw_then_the_connection_closes(
    server: Server, tmp_path: Path
) -> None:
    data = os.urandom(MIN_LENGTH + 5)
    target = tmp_path / "f.bin"
    reader, writer = await server.connect()
    writer.write(head(target, f"Content-Length: {len(data)}\r\n"))
    await send_in_pieces(writer, data, seed=2)
    status, headers, _ = await response(reader)
    assert status == 200
    assert headers["connection"] == "close"  # h11 never saw this body's end
    assert await reader.read() == b""
    await close(writer)
    assert target.read_bytes() == data
    assert server.raw == [True]


async def test_a_small_content_length_body_stays_h11s(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    reader, writer = await server.connect()
    for n in (0, 100):
        writer.write(head(target, f"Content-Length: {n}\r\n") + b"s" * n)
        status, headers, _ = await response(reader)
        assert status == 200
        assert headers.get("connection") != "close"
        assert target.read_bytes() == b"s" * n
    await close(writer)
    assert server.raw == [False, False]


async def test_gzip_and_multipart_bodies_through_the_raw_path(
    server: Server, tmp_path: Path
) -> None:
    data = os.urandom(CHUNK + 7)
    packed = gzip.compress(data)
    reader, writer = await server.connect()
    extra = "Transfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n"
    writer.write(head(tmp_path / "g.bin", extra) + chunked(packed, [len(packed)]))
    assert (await response(reader))[0] == 200
    part = (b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="m.bin"\r\n\r\n'
            + data + b"\r\n--bnd--\r\n")  # fmt: skip
    extra = "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=bnd\r\n"
    writer.write(head(tmp_path / "m.bin", extra) + chunked(part, [5, len(part) - 5]))
    assert (await response(reader))[0] == 200
    await close(writer)
    assert (tmp_path / "g.bin").read_bytes() == data
    assert (tmp_path / "m.bin").read_bytes() == data
    assert server.raw == [True, True]


async def test_expect_100_continue_is_answered_before_the_body(
    server: Server, tmp_path: Path
) -> None:
    target = tmp_path / "f.bin"
    reader, writer = await server.connect()
    writer.write(head(target, "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n"))
    assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(chunked(b"abc", [3]))
    assert (await response(reader))[0] == 200
    assert target.read_bytes() == b"abc"
    await close(writer)


@pytest.mark.parametrize(
    "bad",
    [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXY0\r\n\r\n", b"1" * 5000, b"0\r\n" + b"X: y\r\n" * 3000],
    ids=["size", "chunk-end", "long-size-line", "long-trailers"],
)
async def test_malformed_framing_answers_400_and_leaves_no_file(
    server: Server, tmp_path: Path, bad: bytes
) -> None:
    target = tmp_path / "f.bin"
    reader, writer = await server.connect()
    writer.write(head(target, "Transfer-Encoding: chunked\r\n") + bad)
    status, headers, _ = await response(reader)
    assert (status, headers["connection"]) == (400, "close")
    assert b"Invalid HTTP request received." in await reader.read()  # then the connection closes
    await close(writer)
    await eventually(lambda: not list(tmp_path.iterdir()), what="no file left")


async def test_a_client_gone_mid_body_leaves_no_file(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    _, writer = await server.connect()
    writer.write(head(target, f"Content-Length: {3 * CHUNK}\r\n") + os.urandom(CHUNK + 10))
    await writer.drain()
    await eventually(lambda: any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir()),
                     what="the upload started")  # fmt: skip
    writer.transport.abort()
    await close(writer)
    await eventually(lambda: not list(tmp_path.iterdir()), what="the temporary file dropped")
    assert server.raw == [True]


async def test_the_rest_of_a_body_answered_early_is_dropped_and_the_connection_kept(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "DRAIN_LIMIT", 10_000)  # answer long before the body ends
    reader, writer = await server.connect()
    data = os.urandom(3 * CHUNK)
    writer.write(head(tmp_path, "Transfer-Encoding: chunked\r\n"))  # a directory: refused
    sending = asyncio.create_task(send_in_pieces(writer, chunked(data, [CHUNK] * 3), seed=3))
    status, headers, answer = await response(reader)
    assert status == 400, answer
    assert b"is a directory" in answer
    assert headers.get("connection") != "close"
    await sending
    target = tmp_path / "f.bin"
    writer.write(head(target, "Content-Length: 2\r\n") + b"ok")
    assert (await response(reader))[0] == 200
    assert target.read_bytes() == b"ok"
    await close(writer)


# --- the framing alone ---------------------------------------------------------------------


def read_all(framing: _Framing, wire: bytes, step: int) -> tuple[bytes, int]:
    """Feed `wire` `step` bytes at a time; (body bytes, wire bytes used)."""
    sink, used = Collector(), 0
    while used < len(wire) and not framing.done():
        piece = memoryview(wire)[used : used + step]
        n = framing.feed(piece, sink)
        assert n <= len(piece)
        used += n
        if n < len(piece):
            break
    return b"".join(sink.pieces), used


@pytest.mark.parametrize("step", [1, 2, 5, 1000, 10**6])
def test_framing_in_any_split(step: int) -> None:
    data = os.urandom(10_000)
    wire = chunked(data, [1, 4000, 5999], trailer=b"A: b\r\n") + b"NEXT"
    framing = _Framing(None)
    got, used = read_all(framing, wire, step)
    assert framing.done()
    assert got == data
    assert wire[used:] == b"NEXT"
    assert bytes(framing.trailer) == b"0\r\nA: b\r\n\r\n"
    framing = _Framing(len(data))
    got, used = read_all(framing, data + b"NEXT", step)
    assert (got, used, framing.done()) == (data, len(data), True)


async def test_downloads_are_sent_by_the_kernel_on_one_kept_connection(
    server: Server, tmp_path: Path
) -> None:
    """sendfile(2) sends the file and h11 still counts it: the connection takes the next
    request; a HEAD answers the length without a body."""
    data = os.urandom(3 * CHUNK + 5)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    reader, writer = await server.connect()
    for name, method in [("f", "GET"), ("empty", "GET"), ("f", "HEAD"), ("f", "GET")]:
        writer.write(head(tmp_path / name, "", method=method))
        if method == "HEAD":
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            continue
        status, _, body = await response(reader)
        assert (status, body) == (200, data if name == "f" else b"")
    assert server.sent == [True, True, False, True]  # a HEAD has no body to send
    await close(writer)


async def test_more_uploads_at_once_than_splice_threads_all_finish(
    server: Server, tmp_path: Path
) -> None:
    """Six bodies stalled mid-way: four hold the splice threads, two wait for one; once the
    clients send the rest, every upload completes."""
    data = [os.urandom(200_000 + i) for i in range(6)]
    conns = [await server.connect() for _ in data]
    for i, ((_, writer), body) in enumerate(zip(conns, data, strict=True)):
        writer.write(head(tmp_path / f"f{i}", "Transfer-Encoding: chunked\r\n"))
        writer.write(b"%x\r\n" % len(body) + body[:1000])
        await writer.drain()
    await eventually(lambda: len(list(tmp_path.glob(f"{TEMP_PREFIX}*"))) == 6, what="6 uploads")
    for (_, writer), body in zip(conns, data, strict=True):
        writer.write(body[1000:] + b"\r\n0\r\n\r\n")
    for i, (reader, writer) in enumerate(conns):
        status, _, answer = await response(reader)
        assert status == 200, answer
        assert (tmp_path / f"f{i}").read_bytes() == data[i]
        await close(writer)
    assert len(server.spliced) == 6
