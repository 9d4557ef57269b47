"""Who a filesystem request acts for, which path it means, and which directories to create.

Shared by the Connect service and the `/files` endpoints. The user comes from the `username`
query parameter (HTTP only), else from `Authorization: Basic base64("user:")` (E2B's SDK sends it
when the caller passes `user=`), else from `/init`'s default user. Relative paths start at the
default workdir when one is set, else at the user's home (E2B's `ExpandAndResolve`).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from nestbox.envd.errors import InvalidArgument, PermissionDenied, os_error
from nestbox.envd.users import User, basic_auth_user, may_access, resolve_path, user_named

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.envd.state import Runtime


async def requested_user(
    runtime: Runtime, *, authorization: str | None, username: str | None = None
) -> User:
    """The user a request acts for (see the module docstring); NSS only off the loop.

    :raise UnknownUser: no such user, or a malformed `Authorization` header.
    :raise PermissionDenied: envd is not root and the user is someone else.
    """
    return await user_named(username or basic_auth_user(authorization) or runtime.defaults.user)


def resolve(runtime: Runtime, user: User, raw: str) -> Path:
    """The absolute path `raw` means for `user`; empty means the default workdir (or home).

    :raise InvalidArgument: the path contains NUL.
    """
    workdir = runtime.defaults.workdir
    return resolve_path(raw or workdir or "~", user, cwd=workdir)


def chown_to(path: Path | int, user: User) -> None:
    """Give `path` (or an open fd) to `user`. Unprivileged envd acts only as itself: a no-op."""
    if os.geteuid() != 0:
        return
    if isinstance(path, int):
        os.fchown(path, user.uid, user.gid)
    else:
        os.lchown(path, user.uid, user.gid)


def ensure_dirs(directory: Path, user: User) -> None:
    """Create `directory` and its missing parents (0755), each owned by `user`.

    :raise InvalidArgument: a component exists and is not a directory.
    :raise OSError: creating a component failed.
    """
    missing: list[Path] = []
    probe = directory
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidArgument(f"{probe} is not a directory")
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not path.is_dir():  # a concurrent request made a file there
                raise InvalidArgument(f"{path} is not a directory") from None
            continue
        chown_to(path, user)


def check_may_unlink(user: User, path: Path) -> None:
    """Whether `user` may remove or rename `path` out of its directory: the parent must be
    writable, and a sticky parent (like /tmp) also requires owning the parent or the entry.

    :raise PermissionDenied: the user may not.
    :raise NotFound: `path` does not exist.
    """
    if user.uid == 0:
        return
    try:
        parent = os.stat(path.parent)
        entry = os.lstat(path)
    except OSError as err:
        raise os_error(err, path) from err
    sticky = parent.st_mode & stat.S_ISVTX and user.uid not in (parent.st_uid, entry.st_uid)
    if sticky or not may_access(user, path.parent, write=True):
        raise PermissionDenied(f"user {user.name!r} may not remove {path}")
