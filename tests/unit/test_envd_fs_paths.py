"""Request users, path resolution, OSError mapping, parent creation and atomic files."""

from __future__ import annotations

import base64
import errno
import os
import pwd
from pathlib import Path
from typing import Any, cast

import pytest

from nestbox.envd.errors import (
    AlreadyExists,
    EnvdError,
    InvalidArgument,
    NotEnoughSpace,
    NotFound,
    PermissionDenied,
    UnknownUser,
    os_error,
)
from nestbox.envd.filesystem.atomic import TEMP_PREFIX, AtomicFile
from nestbox.envd.filesystem.paths import ensure_dirs, requested_user, resolve
from nestbox.envd.filesystem.watch import WatcherRegistry
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import Runtime
from nestbox.envd.users import User, basic_auth_user, lookup_user

ME = pwd.getpwuid(os.geteuid()).pw_name


def runtime(user: str = ME, workdir: str | None = None) -> Runtime:
    none = cast(Any, None)
    rt = Runtime(settings=EnvdSettings(), in_vm=False, processes=none,
                 watchers=WatcherRegistry(), tracker=none, ports=none)  # fmt: skip
    rt.defaults.user = user
    rt.defaults.workdir = workdir
    return rt


def basic(name: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:".encode()).decode()


def test_basic_auth_user() -> None:
    assert basic_auth_user(None) is None
    assert basic_auth_user("Bearer abc") is None
    assert basic_auth_user(basic("alice")) == "alice"
    assert basic_auth_user("basic " + base64.b64encode(b"bob:secret").decode()) == "bob"
    assert basic_auth_user(basic("")) is None
    with pytest.raises(UnknownUser):
        basic_auth_user("Basic !!!not base64")


async def test_requested_user_precedence() -> None:
    rt = runtime()
    assert (await requested_user(rt, authorization=None)).name == ME
    assert (await requested_user(rt, authorization=basic(ME), username="")).name == ME
    with pytest.raises(UnknownUser):
        await requested_user(rt, authorization=basic("no-such-user-xyz"))
    with pytest.raises(UnknownUser):  # the query parameter wins over the header
        await requested_user(rt, authorization=basic(ME), username="no-such-user-xyz")


def test_resolve() -> None:
    user = lookup_user(ME)
    rt = runtime()
    assert resolve(rt, user, "~") == user.home
    assert resolve(rt, user, "~/a/../b") == user.home / "b"
    assert resolve(rt, user, "rel") == user.home / "rel"
    assert resolve(rt, user, "") == user.home
    assert resolve(rt, user, "/x/./y/") == Path("/x/y")
    rt = runtime(workdir="/work/dir")
    assert resolve(rt, user, "rel") == Path("/work/dir/rel")
    assert resolve(rt, user, "") == Path("/work/dir")
    with pytest.raises(InvalidArgument):
        resolve(rt, user, "a\x00b")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOENT, NotFound),
        (errno.EEXIST, AlreadyExists),
        (errno.EACCES, PermissionDenied),
        (errno.EPERM, PermissionDenied),
        (errno.EROFS, PermissionDenied),
        (errno.ENOSPC, NotEnoughSpace),
        (errno.EDQUOT, NotEnoughSpace),
        (errno.ENOTDIR, InvalidArgument),
        (errno.EISDIR, InvalidArgument),
        (errno.ENOTEMPTY, InvalidArgument),
        (errno.EIO, EnvdError),
    ],
)
def test_os_error(code: int, kind: type[EnvdError]) -> None:
    err = os_error(OSError(code, "secret internal text"), "/p")
    assert type(err) is kind
    assert "secret" not in err.message
    assert "/p" in err.message or kind is NotEnoughSpace


def test_ensure_dirs_creates_parents_owned_by_user(tmp_path: Path) -> None:
    user = lookup_user(ME)
    ensure_dirs(tmp_path / "a" / "b" / "c", user)
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    ensure_dirs(tmp_path / "a" / "b", user)  # existing: fine
    (tmp_path / "file").touch()
    with pytest.raises(InvalidArgument):
        ensure_dirs(tmp_path / "file" / "sub", user)


def test_ensure_dirs_chowns_every_new_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    nobody = lookup_user("nobody")
    ensure_dirs(tmp_path / "x" / "y", nobody)
    assert (tmp_path / "x").stat().st_uid == nobody.uid
    assert (tmp_path / "x" / "y").stat().st_uid == nobody.uid
    assert tmp_path.stat().st_uid == 0


def _me() -> User:
    return lookup_user(ME)


def test_atomic_file_commit_and_abort(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    f = AtomicFile(target, _me())
    f.write(b"hello ")
    f.write(memoryview(b"world"))
    assert not target.exists()
    assert [p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir()] == [True]
    f.commit()
    assert target.read_bytes() == b"hello world"
    assert target.stat().st_mode & 0o777 == 0o644
    assert list(tmp_path.iterdir()) == [target]

    target.chmod(0o700)
    f = AtomicFile(target, _me())
    f.write(b"new")
    f.abort()
    f.abort()  # idempotent
    assert target.read_bytes() == b"hello world"
    assert list(tmp_path.iterdir()) == [target]

    f = AtomicFile(target, _me())
    f.write(b"replaced")
    f.commit()
    assert target.read_bytes() == b"replaced"
    assert target.stat().st_mode & 0o777 == 0o700  # a replaced file keeps its mode
    assert list(tmp_path.iterdir()) == [target]
