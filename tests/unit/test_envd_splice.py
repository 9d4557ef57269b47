"""`envd/splice.py` alone, on a socket pair: a body moved into a file by the kernel takes exactly
its framing's bytes, and the thread stops when told to, or when the peer goes."""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

import pytest

from nestbox.envd.rawbody import _Framing
from nestbox.envd.splice import ClientGone, splice_body

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # as an event loop's socket is
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def chunked(data: bytes, sizes: list[int]) -> bytes:
    out, at = bytearray(), 0
    for size in sizes:
        out += b"%x;ext=1\r\n" % size + data[at : at + size] + b"\r\n"
        at += size
    return bytes(out) + b"0\r\nTrailer: x\r\n\r\n"


def test_a_chunked_body_and_nothing_after_it(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair
    data = os.urandom(3_000_000)
    held = memoryview(b"already here;")
    wire = chunked(data, [1, 70_000, 2_000_000, len(data) - 2_070_001]) + b"GET /next HTTP/1.1"
    sender = threading.Thread(target=theirs.sendall, args=(wire,))
    sender.start()
    out = tmp_path / "f"
    with out.open("wb") as f:
        written = splice_body(ours.fileno(), _Framing(None), [held], f.fileno(), threading.Event())
    sender.join()
    assert written == len(held) + len(data)
    assert out.read_bytes() == bytes(held) + data
    assert ours.recv(100) == b"GET /next HTTP/1.1"  # the pipelined request is still there


def test_a_content_length_body(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    ours, theirs = pair
    data = os.urandom(1_500_000)
    sender = threading.Thread(target=theirs.sendall, args=(data + b"more",))
    sender.start()
    out = tmp_path / "f"
    with out.open("wb") as f:
        written = splice_body(ours.fileno(), _Framing(len(data)), [], f.fileno(), threading.Event())
    sender.join()
    assert (written, out.read_bytes()) == (len(data), data)
    assert ours.recv(10) == b"more"


def test_the_peer_gone_mid_body_or_a_stop_ends_it(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair
    stop = threading.Event()
    theirs.sendall(b"x" * 1000)
    timer = threading.Timer(0.1, stop.set)  # the client stalls; the request is cancelled
    timer.start()
    with (tmp_path / "f").open("wb") as f, pytest.raises(ClientGone):
        splice_body(ours.fileno(), _Framing(10_000), [], f.fileno(), stop)
    timer.join()
    theirs.sendall(b"y" * 500)
    theirs.shutdown(socket.SHUT_WR)  # then it goes away before the end of the body
    with (tmp_path / "g").open("wb") as f, pytest.raises(ClientGone):
        splice_body(ours.fileno(), _Framing(10_000), [], f.fileno(), threading.Event())


def test_malformed_framing_raises(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair
    theirs.sendall(b"zz\r\nhello\r\n")
    with (tmp_path / "f").open("wb") as f, pytest.raises(ValueError, match="chunk size"):
        splice_body(ours.fileno(), _Framing(None), [], f.fileno(), threading.Event())


def test_size_lines_and_trailers_longer_than_a_peek(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair
    data = os.urandom(5000)
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 90) for i in range(40))
    wire = b"1388;" + b"e" * 1500 + b"\r\n" + data + b"\r\n0\r\n" + trailers + b"\r\nNEXT"
    theirs.sendall(wire)
    framing = _Framing(None)
    with (tmp_path / "f").open("wb") as f:
        assert splice_body(ours.fileno(), framing, [], f.fileno(), threading.Event()) == len(data)
    assert (tmp_path / "f").read_bytes() == data
    assert len(framing.trailer) > 3000  # every trailer line, for h11
    assert ours.recv(10) == b"NEXT"
