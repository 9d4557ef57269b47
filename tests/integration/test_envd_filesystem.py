"""envd's `filesystem.Filesystem` service over the wire: a real envd, the generated Connect client.

One test speaks the JSON codec, as E2B's SDK does; the rest use the default binary one.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import subprocess
from typing import TYPE_CHECKING

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.codec import proto_json_codec
from connectrpc.errors import ConnectError

from nestbox.protocol.gen.filesystem.filesystem_connect import FilesystemClient
from nestbox.protocol.gen.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    EventType,
    FileType,
    GetWatcherEventsRequest,
    ListDirRequest,
    ListDirResponse,
    MakeDirRequest,
    MoveRequest,
    RemoveRequest,
    RemoveWatcherRequest,
    StatRequest,
    WatchDirRequest,
    WatchDirResponse,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from tests.integration.envd_process import EnvdProcess

EVENT_TIMEOUT_S = 10
NOBODY = {"Authorization": "Basic " + base64.b64encode(b"nobody:").decode()}
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


@pytest.fixture
async def fs(envd: EnvdProcess) -> AsyncIterator[FilesystemClient]:
    async with FilesystemClient(envd.url) as client:
        yield client


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


async def code_of(call: object) -> Code:
    with pytest.raises(ConnectError) as info:
        await call  # type: ignore[misc]  # any awaitable RPC
    return info.value.code


async def test_stat_list_with_depth(fs: FilesystemClient, work: Path) -> None:
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "deep.txt").write_text("deep")
    (work / "top.txt").write_text("hello")
    (work / "link").symlink_to(work / "top.txt")

    entry = (await fs.stat(StatRequest(path=str(work / "top.txt")))).entry
    assert entry is not None
    assert (entry.name, entry.type, entry.size) == ("top.txt", FileType.FILE, 5)
    assert entry.permissions.startswith("-rw")
    assert entry.owner == pwd.getpwuid(os.geteuid()).pw_name
    assert entry.modified_time is not None

    link = (await fs.stat(StatRequest(path=str(work / "link")))).entry
    assert link is not None
    assert link.is_symlink
    assert link.symlink_target == str(work / "top.txt")
    assert link.type == FileType.FILE

    def names(resp: ListDirResponse) -> list[str]:
        return [e.path.removeprefix(str(work) + "/") for e in resp.entries]

    for depth in (0, 1):
        assert names(await fs.list_dir(ListDirRequest(path=str(work), depth=depth))) == [
            "a", "link", "top.txt"
        ]  # fmt: skip
    assert names(await fs.list_dir(ListDirRequest(path=str(work), depth=2))) == [
        "a", "a/b", "link", "top.txt"
    ]  # fmt: skip
    assert "a/b/deep.txt" in names(await fs.list_dir(ListDirRequest(path=str(work), depth=3)))

    assert await code_of(fs.stat(StatRequest(path=str(work / "missing")))) == Code.NOT_FOUND
    assert await code_of(fs.list_dir(ListDirRequest(path=str(work / "top.txt")))) == (
        Code.INVALID_ARGUMENT
    )


async def test_json_codec_as_e2b_sdk(envd: EnvdProcess, work: Path) -> None:
    (work / "f.txt").write_text("x")
    async with FilesystemClient(envd.url, codec=proto_json_codec()) as fs:
        resp = await fs.list_dir(ListDirRequest(path=str(work), depth=1))
    assert [e.name for e in resp.entries] == ["f.txt"]
    # The wire form E2B's SDK parses: camelCase names, enum names, RFC 3339 times.
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{envd.url}/filesystem.Filesystem/Stat", json={"path": str(work)})
    body = r.json()["entry"]
    assert body["type"] == "FILE_TYPE_DIRECTORY"
    assert body["permissions"].startswith("d")
    assert body["modifiedTime"].endswith("Z")


async def test_make_dir_move_remove(fs: FilesystemClient, work: Path) -> None:
    made = (await fs.make_dir(MakeDirRequest(path=str(work / "x" / "y")))).entry
    assert made is not None
    assert (made.name, made.type, made.path) == ("y", FileType.DIRECTORY, str(work / "x" / "y"))
    assert (work / "x" / "y").is_dir()
    assert await code_of(fs.make_dir(MakeDirRequest(path=str(work / "x")))) == (Code.ALREADY_EXISTS)

    (work / "x" / "y" / "f.txt").write_text("data")
    moved = (
        await fs.move(MoveRequest(source=str(work / "x"), destination=str(work / "new" / "z")))
    ).entry
    assert moved is not None
    assert (moved.path, moved.type) == (str(work / "new" / "z"), FileType.DIRECTORY)
    assert (work / "new" / "z" / "y" / "f.txt").read_text() == "data"
    assert not (work / "x").exists()
    missing = MoveRequest(source=str(work / "gone"), destination=str(work / "n"))
    assert await code_of(fs.move(missing)) == Code.NOT_FOUND

    await fs.remove(RemoveRequest(path=str(work / "new")))
    assert not (work / "new").exists()
    assert await code_of(fs.remove(RemoveRequest(path=str(work / "new")))) == Code.NOT_FOUND


async def test_watch_dir_stream_sees_a_new_file(fs: FilesystemClient, work: Path) -> None:
    stream = fs.watch_dir(WatchDirRequest(path=str(work), recursive=True))
    first = await asyncio.wait_for(anext(stream), EVENT_TIMEOUT_S)
    assert first.event is not None
    assert first.event.field == "start"

    seen: list[tuple[str, EventType]] = []

    async def wait_for(name: str, kind: EventType) -> None:
        async for msg in stream:
            if msg.event is not None and msg.event.field == "filesystem":
                ev = msg.event.value
                assert not isinstance(ev, (WatchDirResponse.StartEvent, WatchDirResponse.KeepAlive))
                seen.append((ev.name, ev.type))
                if (name, kind) == seen[-1]:
                    return

    (work / "sub").mkdir()
    await asyncio.wait_for(wait_for("sub", EventType.CREATE), EVENT_TIMEOUT_S)
    # The new subdirectory is watched too (the watch is recursive).
    (work / "sub" / "new.txt").write_text("hello")
    await asyncio.wait_for(wait_for("sub/new.txt", EventType.WRITE), EVENT_TIMEOUT_S)
    assert seen[-2:] == [("sub/new.txt", EventType.CREATE), ("sub/new.txt", EventType.WRITE)]
    await stream.aclose()  # type: ignore[attr-defined]  # the client's stream is a generator


async def test_watch_dir_on_missing_dir_or_file(fs: FilesystemClient, work: Path) -> None:
    (work / "f").write_text("x")
    for path, code in ((work / "missing", Code.NOT_FOUND), (work / "f", Code.INVALID_ARGUMENT)):
        with pytest.raises(ConnectError) as info:
            async for _ in fs.watch_dir(WatchDirRequest(path=str(path))):
                pass
        assert info.value.code == code


async def test_polling_watcher(envd: EnvdProcess, fs: FilesystemClient, work: Path) -> None:
    watcher_id = (await fs.create_watcher(CreateWatcherRequest(path=str(work)))).watcher_id
    async with httpx.AsyncClient(base_url=envd.url) as http:
        r = await http.post("/files", params={"path": str(work / "up.txt")}, content=b"x",
                            headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 200
        events = (
            await fs.get_watcher_events(GetWatcherEventsRequest(watcher_id=watcher_id))
        ).events
        # An upload looks like E2B's in-place write: CREATE, CHMOD, WRITE, nothing else.
        assert [(e.name, e.type) for e in events] == [
            ("up.txt", EventType.CREATE), ("up.txt", EventType.CHMOD), ("up.txt", EventType.WRITE)
        ]  # fmt: skip

        r = await http.post("/files", params={"path": str(work / "up.txt")}, content=b"yy",
                            headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        events = (
            await fs.get_watcher_events(GetWatcherEventsRequest(watcher_id=watcher_id))
        ).events
        assert [(e.name, e.type) for e in events] == [("up.txt", EventType.WRITE)]

    (work / "up.txt").unlink()
    events = (await fs.get_watcher_events(GetWatcherEventsRequest(watcher_id=watcher_id))).events
    assert [(e.name, e.type) for e in events] == [("up.txt", EventType.REMOVE)]

    await fs.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))
    gone = fs.get_watcher_events(GetWatcherEventsRequest(watcher_id=watcher_id))
    assert await code_of(gone) == Code.NOT_FOUND


@pytest.fixture
def public(work: Path) -> Path:
    """`work`, world-writable and sticky like /tmp."""
    work.parent.chmod(0o755)
    work.chmod(0o1777)
    return work


@root_only
async def test_user_from_basic_auth_owns_and_is_checked(fs: FilesystemClient, public: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    work = public
    made = (await fs.make_dir(MakeDirRequest(path=str(work / "mine")), headers=NOBODY)).entry
    assert made is not None
    assert made.owner == "nobody"
    assert (work / "mine").stat().st_uid == nobody.pw_uid

    locked = work / "locked"
    locked.mkdir(mode=0o755)
    (locked / "f").write_text("root's")
    denied = [
        fs.make_dir(MakeDirRequest(path=str(locked / "d")), headers=NOBODY),
        fs.remove(RemoveRequest(path=str(locked / "f")), headers=NOBODY),
        fs.move(MoveRequest(source=str(locked / "f"), destination=str(work / "f")), headers=NOBODY),
    ]
    for call in denied:
        assert await code_of(call) == Code.PERMISSION_DENIED
    assert (locked / "f").exists()

    # /tmp-style sticky directory: nobody may not remove root's file in it.
    (work / "roots.txt").write_text("r")
    sticky = fs.remove(RemoveRequest(path=str(work / "roots.txt")), headers=NOBODY)
    assert await code_of(sticky) == Code.PERMISSION_DENIED

    unknown = {"Authorization": "Basic " + base64.b64encode(b"no-such-user:").decode()}
    assert await code_of(fs.stat(StatRequest(path="/"), headers=unknown)) == Code.UNAUTHENTICATED


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs: a second filesystem, so a move has to copy."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "other-fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_move_across_filesystems(fs: FilesystemClient, work: Path, other_fs: Path) -> None:
    src = other_fs / "tree"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "f").write_text("data")
    os.chown(src / "inner" / "f", 65534, 65534)
    (work / "file.txt").write_text("old")
    (other_fs / "file.txt").write_text("new")

    moved = await fs.move(MoveRequest(source=str(src), destination=str(work / "tree")))
    assert moved.entry is not None
    assert moved.entry.type == FileType.DIRECTORY
    assert (work / "tree" / "inner" / "f").read_text() == "data"
    assert (work / "tree" / "inner" / "f").stat().st_uid == 65534
    assert not src.exists()

    await fs.move(
        MoveRequest(source=str(other_fs / "file.txt"), destination=str(work / "file.txt"))
    )
    assert (work / "file.txt").read_text() == "new"
    assert not (other_fs / "file.txt").exists()
