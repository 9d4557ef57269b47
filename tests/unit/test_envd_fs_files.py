"""`/files` in-process (httpx over ASGI): request shapes, decoding and error answers."""

from __future__ import annotations

import gzip
import os
import pwd
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from nestbox.envd import files
from nestbox.envd.errors import InvalidArgument
from nestbox.envd.files import GZIP_PIECE, _attachment, _Decoder, _form_filename
from nestbox.envd.filesystem.watch import WatcherRegistry
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import Runtime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    none = cast(Any, None)
    rt = Runtime(settings=EnvdSettings(), in_vm=False, processes=none,
                 watchers=WatcherRegistry(), tracker=none, ports=none)  # fmt: skip
    rt.defaults.user = pwd.getpwuid(os.geteuid()).pw_name
    app = Starlette(routes=[Route("/files", files.download, methods=["GET"]),
                            Route("/files", files.upload, methods=["POST"])])  # fmt: skip
    app.state.runtime = rt
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://envd") as client:
        yield client


def decode(encoding: str, *chunks: bytes) -> bytes:
    d = _Decoder(encoding)
    out = b"".join(piece for chunk in chunks for piece in d.feed(chunk))
    return out + b"".join(d.finish())


def test_decoder() -> None:
    assert decode("", b"ab", b"c") == b"abc"
    body = gzip.compress(b"hello ") + gzip.compress(b"world")  # two gzip members
    assert decode("gzip", body[:7], body[7:20], body[20:]) == b"hello world"
    with pytest.raises(InvalidArgument):
        decode("gzip", body[:-3])
    with pytest.raises(InvalidArgument):
        decode("gzip", b"not gzip at all")
    with pytest.raises(InvalidArgument):
        _Decoder("br")


def test_decoder_inflates_in_bounded_pieces() -> None:
    bomb = gzip.compress(b"\0" * (5 * GZIP_PIECE + 123))
    d = _Decoder("gzip")
    pieces = list(d.feed(bomb))
    assert max(len(p) for p in pieces) <= GZIP_PIECE
    assert sum(len(p) for p in pieces) == 5 * GZIP_PIECE + 123
    assert list(d.finish()) == []


def test_form_filename_and_attachment() -> None:
    # httpx sends the filename as UTF-8 bytes with HTML5 escapes.
    assert _form_filename("/a/%22q%22/\u00e9.txt".encode()) == '/a/"q"/\u00e9.txt'
    assert _form_filename(b"a%0Ab") == "a\nb"
    assert _attachment("plain.txt") == 'attachment; filename="plain.txt"'
    assert _attachment("\u00e9 t.txt") == "attachment; filename*=utf-8''%C3%A9%20t.txt"


async def test_raw_upload_then_download(http: httpx.AsyncClient, tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.bin"
    r = await http.post("/files", params={"path": str(target)}, content=b"abc", headers=OCTET)
    assert r.status_code == 200
    assert r.json() == [{"name": "f.bin", "type": "file", "path": str(target)}]
    r = await http.get("/files", params={"path": str(target)})
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"abc", "3")

    empty = tmp_path / "empty"
    r = await http.post("/files", params={"path": str(empty)}, content=b"", headers=OCTET)
    assert r.status_code == 200
    assert empty.read_bytes() == b""


async def test_multipart_skips_other_parts(http: httpx.AsyncClient, tmp_path: Path) -> None:
    target = tmp_path / "m.txt"
    r = await http.post(
        "/files",
        params={"path": str(target)},
        data={"path": "/elsewhere", "note": "ignored"},
        files=[("file", ("upload", b"content"))],
    )
    assert r.status_code == 200, r.text
    assert target.read_bytes() == b"content"


async def test_multipart_errors(http: httpx.AsyncClient, tmp_path: Path) -> None:
    no_file = await http.post("/files", params={"path": str(tmp_path / "x")}, data={"a": "b"})
    assert no_file.status_code == 400

    same = [("file", ("n", b"1")), ("file", ("n", b"2"))]
    twice = await http.post("/files", params={"path": str(tmp_path / "dup")}, files=same)
    assert twice.status_code == 400
    assert "twice" in twice.json()["error"]["message"]

    no_name = await http.post("/files", files=[("file", ("", b"1"))])
    assert no_name.status_code == 400

    no_boundary = await http.post("/files", content=b"x",
                                  headers={"Content-Type": "multipart/form-data"})  # fmt: skip
    assert no_boundary.status_code == 400

    bad_encoding = await http.post("/files", params={"path": str(tmp_path / "y")}, content=b"x",
                                   headers={**OCTET, "Content-Encoding": "br"})  # fmt: skip
    assert bad_encoding.status_code == 400
    assert bad_encoding.json() == {
        "error": {"code": "invalid_request", "message": "unsupported Content-Encoding 'br'"}
    }


async def test_download_of_a_fifo_is_refused(http: httpx.AsyncClient, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = await http.get("/files", params={"path": str(fifo)})
    assert r.status_code == 400
    assert "not a regular file" in r.json()["error"]["message"]


async def test_upload_writes_through_a_symlink(http: httpx.AsyncClient, tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    r = await http.post("/files", params={"path": str(tmp_path / "link.txt")}, content=b"new",
                        headers=OCTET)  # fmt: skip
    assert r.json()[0]["path"] == str(tmp_path / "link.txt")
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_text() == "new"
