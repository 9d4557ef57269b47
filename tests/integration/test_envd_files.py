"""envd's `/files` endpoints over the wire: a real envd on localhost, driven with httpx.

Uploads are sent the ways E2B's SDK sends them (multipart parts named `file`, several parts
for `write_files`, raw `application/octet-stream`, gzip), and the big-file test checks that
envd streams: 100 MiB each way must not raise its peak RSS by anywhere near 100 MiB.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import os
import pwd
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from tests.integration.envd_process import EnvdProcess

MiB = 1024 * 1024
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


@pytest.fixture
async def http(envd: EnvdProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=envd.url, timeout=60) as client:
        yield client


@pytest.fixture
def public_dir(tmp_path: Path) -> Path:
    """A world-writable directory (tmp_path itself is root's 0700)."""
    d = tmp_path / "public"
    d.mkdir()
    d.chmod(0o1777)
    tmp_path.chmod(0o755)
    return d


def vm_hwm(pid: int) -> int:
    """Peak resident set size of `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def pattern(total: int, chunk: int = MiB) -> Iterator[bytes]:
    """`total` deterministic, incompressible-looking bytes, `chunk` at a time; the bytes do
    not depend on `chunk`."""
    seed = hashlib.sha256(b"nestbox").digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(4096))
    unit = (block * (MiB // len(block) + 1))[:MiB]
    for start in range(0, total, MiB):
        # Number every MiB so a misplaced piece changes the hash.
        piece = (start.to_bytes(8, "big") + unit[8:])[: total - start]
        for offset in range(0, len(piece), chunk):
            yield piece[offset : offset + chunk]


async def agen(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def sha_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


async def multipart_stream(
    parts: list[tuple[str, Iterator[bytes]]], boundary: str = "nestbox-boundary-42"
) -> AsyncIterator[bytes]:
    for filename, chunks in parts:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        for c in chunks:
            yield c
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def download_sha(http: httpx.AsyncClient, path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    async with http.stream("GET", "/files", params={"path": str(path)}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"] == f'attachment; filename="{path.name}"'
        length = int(r.headers["content-length"])
        async for chunk in r.aiter_raw():
            h.update(chunk)
            size += len(chunk)
    assert size == length
    return h.hexdigest(), size


async def test_100_mib_each_way_streams_with_bounded_memory(
    envd: EnvdProcess, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    size = 100 * MiB
    warm = tmp_path / "warm"
    r = await http.post("/files", params={"path": str(warm)}, content=b"x" * 1024,
                        headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200
    assert (await http.get("/files", params={"path": str(warm)})).content == b"x" * 1024
    baseline = vm_hwm(envd.pid)

    raw_target = tmp_path / "big-raw.bin"
    r = await http.post("/files", params={"path": str(raw_target)}, content=agen(pattern(size)),
                        headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "big-raw.bin", "type": "file", "path": str(raw_target)}]

    form_target = tmp_path / "big-form.bin"
    boundary = "nestbox-boundary-42"
    r = await http.post(
        "/files",
        params={"path": str(form_target)},
        content=multipart_stream([("ignored", pattern(size, 256 * 1024))], boundary),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 200, r.text

    expected = sha_of(pattern(size))
    for target in (raw_target, form_target):
        assert target.stat().st_size == size
        assert await download_sha(http, target) == (expected, size)

    growth = vm_hwm(envd.pid) - baseline
    print(f"envd peak RSS: {baseline / MiB:.1f} MiB before, +{growth / MiB:.1f} MiB after")
    assert growth < 40 * MiB, f"envd's peak RSS grew by {growth / MiB:.1f} MiB"


async def test_sdk_style_multipart_single_and_several_files(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    # files.write(path, data): one `file` part whose filename is the path, path in the query.
    one = work / "a" / "b" / "one.txt"
    r = await http.post("/files", params={"path": str(one)}, files=[("file", (str(one), b"1"))])
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "one.txt", "type": "file", "path": str(one)}]
    assert one.read_bytes() == b"1"

    # files.write_files([...]): several `file` parts, each filename a path, no path query.
    two, three = work / "two.txt", work / "sub dir" / 'th"r\u00e9e.txt'
    files = [("file", (str(two), b"22")), ("file", (str(three), b"333"))]
    r = await http.post("/files", files=files)
    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()] == [str(two), str(three)]
    assert two.read_bytes() == b"22"
    assert three.read_bytes() == b"333"
    assert names(work) == ["a", "sub dir", "two.txt"]  # no temporary files left
    assert names(work / "sub dir") == ['th"r\u00e9e.txt']


async def test_overwrite_keeps_mode_and_relative_paths_start_at_home(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(b"old content, longer than the new one")
    target.chmod(0o751)
    r = await http.post("/files", params={"path": str(target)}, content=b"new",
                        headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o751

    home = Path(pwd.getpwuid(os.geteuid()).pw_dir)
    name = f"nestbox-files-test-{os.getpid()}.txt"
    try:
        r = await http.post("/files", params={"path": name}, content=b"home",
                            headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.json()[0]["path"] == str(home / name)
        assert (await http.get("/files", params={"path": f"~/{name}"})).content == b"home"
    finally:
        (home / name).unlink(missing_ok=True)


async def test_gzip_octet_stream_upload(http: httpx.AsyncClient, tmp_path: Path) -> None:
    data = b"compress me " * 50_000
    target = tmp_path / "gz.txt"
    r = await http.post(
        "/files",
        params={"path": str(target)},
        content=gzip.compress(data),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert target.read_bytes() == data

    r = await http.post(
        "/files",
        params={"path": str(tmp_path / "bad.txt")},
        content=gzip.compress(data)[:100],
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 400
    assert not (tmp_path / "bad.txt").exists()


async def test_download_errors(http: httpx.AsyncClient, tmp_path: Path) -> None:
    r = await http.get("/files", params={"path": str(tmp_path)})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"

    r = await http.get("/files", params={"path": str(tmp_path / "missing")})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"

    r = await http.get("/files", params={"path": "/dev/null"})
    assert r.status_code == 400

    r = await http.get("/files", params={"path": "/etc/hostname", "username": "no-such-user"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


async def test_upload_errors(http: httpx.AsyncClient, tmp_path: Path) -> None:
    r = await http.post("/files", params={"path": str(tmp_path)}, content=b"x",
                        headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 400  # a directory

    r = await http.post(
        "/files", content=b"x", headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 400  # raw upload without a path

    r = await http.post("/files", params={"path": str(tmp_path / "t")}, content=b"x",
                        headers={"Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 400

    work = tmp_path / "work"
    work.mkdir()
    truncated = b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\npartial'
    r = await http.post("/files", params={"path": str(work / "half")}, content=truncated,
                        headers={"Content-Type": "multipart/form-data; boundary=b"})  # fmt: skip
    assert r.status_code == 400
    assert names(work) == []


async def test_interrupted_upload_leaves_nothing(envd: EnvdProcess, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "cut.bin"
    reader, writer = await asyncio.open_connection("127.0.0.1", envd.port)
    writer.write(
        f"POST /files?path={target} HTTP/1.1\r\nHost: envd\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {10 * MiB}\r\n\r\n".encode()
    )
    writer.write(b"x" * MiB)
    await writer.drain()
    # The temporary file appears as the body streams in ...
    [partial] = await eventually(lambda: names(work), what="the upload's temporary file")
    assert partial.startswith(".nestbox-upload-")
    writer.close()  # ... and goes when the client goes away mid-body
    await eventually(lambda: names(work) == [], what="the temporary file removed")
    del reader


@root_only
async def test_upload_as_nobody_is_owned_by_nobody(
    http: httpx.AsyncClient, public_dir: Path
) -> None:
    nobody = pwd.getpwnam("nobody")
    target = public_dir / "new" / "file.txt"
    r = await http.post("/files", params={"path": str(target), "username": "nobody"},
                        files=[("file", ("x", b"hi"))])  # fmt: skip
    assert r.status_code == 200, r.text
    for p in (target, target.parent):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)

    # E2B's SDK names the user with Basic auth when the caller passes `user=`.
    auth = "Basic " + base64.b64encode(b"nobody:").decode()
    other = public_dir / "other.txt"
    r = await http.post("/files", params={"path": str(other)}, content=b"x",
                        headers={"Content-Type": "application/octet-stream",
                                 "Authorization": auth})  # fmt: skip
    assert r.status_code == 200
    assert other.stat().st_uid == nobody.pw_uid


@root_only
async def test_nobody_may_not_write_into_a_root_owned_directory(
    http: httpx.AsyncClient, public_dir: Path
) -> None:
    locked = public_dir / "locked"
    locked.mkdir(mode=0o755)
    r = await http.post("/files", params={"path": str(locked / "f"), "username": "nobody"},
                        content=b"x",
                        headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert names(locked) == []

    secret = public_dir / "secret"
    secret.write_bytes(b"s")
    secret.chmod(0o600)
    r = await http.get("/files", params={"path": str(secret), "username": "nobody"})
    assert r.status_code == 403


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, so the disk fills up on demand."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_answers_507_and_leaves_nothing(
    http: httpx.AsyncClient, small_tmpfs: Path
) -> None:
    (small_tmpfs / "keep.txt").write_bytes(b"old")
    for name in ("new.bin", "keep.txt"):
        r = await http.post("/files", params={"path": str(small_tmpfs / name)},
                            content=agen(pattern(2 * MiB)),
                            headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "not_enough_space"
    assert names(small_tmpfs) == ["keep.txt"]
    assert (small_tmpfs / "keep.txt").read_bytes() == b"old"


async def _head(reader: asyncio.StreamReader) -> dict[str, str]:
    """A response head read off the wire: status line and headers (names lower-cased)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status, *lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    headers[":status"] = status.split()[1]
    return headers


def _open_fds(pid: int) -> set[str]:
    """The files `pid` holds open (their targets)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


async def test_a_download_cut_short_closes_the_connection_and_the_file(
    tmp_path: Path, envd: EnvdProcess
) -> None:
    """A file that shrinks under a download ends it early with the connection closed (never a
    response that lies about its length and goes on); a client that leaves mid-download leaves
    no file open in envd."""
    path = tmp_path / "big.bin"
    size = 64 * MiB
    with path.open("wb") as f:
        for chunk in pattern(size):
            f.write(chunk)
    before = _open_fds(envd.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", envd.port, limit=MiB)
    writer.write(f"GET /files?path={path} HTTP/1.1\r\nHost: envd\r\n\r\n".encode())
    head = await _head(reader)
    assert int(head["content-length"]) == size
    await reader.readexactly(MiB)  # the download is under way, held up by our slow reading
    os.truncate(path, 2 * MiB)
    got = MiB
    while chunk := await reader.read(MiB):
        got += len(chunk)
    assert got < size  # the end of the stream came before the promised length
    writer.close()
    await eventually(lambda: str(path) not in _open_fds(envd.pid), what="the file closed")

    path.write_bytes(b"".join(pattern(size)))
    reader, writer = await asyncio.open_connection("127.0.0.1", envd.port, limit=MiB)
    writer.write(f"GET /files?path={path} HTTP/1.1\r\nHost: envd\r\n\r\n".encode())
    await _head(reader)
    await reader.readexactly(MiB)
    writer.transport.abort()  # gone mid-download
    await eventually(lambda: _open_fds(envd.pid) <= before, what="the file closed, client gone")
    async with httpx.AsyncClient(base_url=envd.url, timeout=60) as http:  # envd serves on
        sha, n = await download_sha(http, path)
    assert (sha, n) == (sha_of(pattern(size)), size)
