"""Guest users: look-up, login environment, and what paths a user may touch.

envd runs as root in a capsule and acts for a named user (default: `/init`'s `defaultUser`, else
root). Outside a VM it may run unprivileged; then it can act only as itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import anyio

from nestbox.envd.errors import InvalidArgument, PermissionDenied, UnknownUser

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    shell: str
    groups: tuple[int, ...]

    def login_env(self) -> dict[str, str]:
        """The variables a login shell would set for this user."""
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell or "/bin/sh",
            "PATH": DEFAULT_PATH,
            "LANG": "C.UTF-8",
        }


USER_FILES = (Path("/etc/passwd"), Path("/etc/group"))
CACHE_MAX = 64
_cache: dict[str, tuple[tuple[int, ...], User]] = {}


def _files_version() -> tuple[int, ...] | None:
    """Inode, mtime and size of the user databases (a stat only: no page-cache read)."""
    try:
        stats = [os.stat(p) for p in USER_FILES]
    except OSError:
        return None
    return tuple(v for st in stats for v in (st.st_ino, st.st_mtime_ns, st.st_size))


def lookup_user(name: str) -> User:
    """The guest user called `name`.

    Found users are cached until `/etc/passwd` or `/etc/group` change (any edit replaces the
    file or changes its mtime): every code path is slow right after a snapshot restore under
    TCG, and `/init` (which checks the default user) is what the host waits on.

    :raise UnknownUser: no such user.
    :raise PermissionDenied: envd is not root and `name` is not the user it runs as.
    """
    version = _files_version()
    cached = _cache.get(name)
    if cached is not None and version is not None and cached[0] == version:
        user = cached[1]
    else:
        user = _read_user(name)
        if version is not None:
            if len(_cache) >= CACHE_MAX:
                _cache.clear()
            _cache[name] = (version, user)
    _check_acting_as(user, name)
    return user


def cached_user(name: str) -> User | None:
    """`lookup_user(name)` when the cache answers it (two `stat`s and no NSS look-up, so it may
    run on the event loop); None when a look-up is needed.

    :raise PermissionDenied: envd is not root and `name` is not the user it runs as.
    """
    cached = _cache.get(name)
    if cached is None or cached[0] != _files_version():
        return None
    _check_acting_as(cached[1], name)
    return cached[1]


async def user_named(name: str) -> User:
    """`lookup_user(name)` without blocking the loop: from the cache on the loop, else looked up
    in a worker thread (NSS may read files or ask a directory). The one way a request's user is
    found: a worker-thread hop per request made 50 Starts at once in a TCG guest wait on each
    other (thread start-up, GIL hand-offs) longer than the host waits for a response head.

    :raise UnknownUser, PermissionDenied: see `lookup_user`.
    """
    user = cached_user(name)
    if user is None:
        user = await anyio.to_thread.run_sync(lookup_user, name)
    return user


def basic_auth_user(header: str | None) -> str | None:
    """The user name in `Authorization: Basic base64("user:")` (what E2B's SDK sends); None for
    no header, another scheme or an empty name.

    :raise UnknownUser: the Basic credentials cannot be decoded.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise UnknownUser("malformed Basic Authorization header") from None
    return decoded.partition(":")[0] or None


def _check_acting_as(user: User, name: str) -> None:
    if os.geteuid() != 0 and user.uid != os.geteuid():
        raise PermissionDenied(f"envd is not root and cannot act as user {name!r}")


def _read_user(name: str) -> User:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UnknownUser(f"user {name!r} does not exist") from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return User(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=Path(entry.pw_dir),
        shell=entry.pw_shell,
        groups=groups,
    )


def resolve_path(raw: str, user: User, *, cwd: str | None = None) -> Path:
    """An absolute, normalised path: `~` is the user's home, relative paths start there
    (or at `cwd`). Symlinks are not resolved.

    :raise InvalidArgument: empty path or one containing NUL.
    """
    if not raw or "\x00" in raw:
        raise InvalidArgument("path must be a non-empty string without NUL bytes")
    if raw == "~" or raw.startswith("~/"):
        raw = str(user.home) + raw[1:]
    path = Path(raw)
    if not path.is_absolute():
        path = Path(cwd or user.home) / path
    return Path(os.path.normpath(path))


def may_access(user: User, path: Path, *, write: bool) -> bool:
    """Whether `user` could read (or write) `path` by the mode bits; root may do anything.

    For a path that does not exist yet, the nearest existing ancestor must be writable.
    """
    if user.uid == 0:
        return True
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
        write = True
    try:
        st = probe.stat()
    except OSError:
        return False
    if st.st_uid == user.uid:
        bits = stat.S_IWUSR if write else stat.S_IRUSR
    elif st.st_gid in user.groups:
        bits = stat.S_IWGRP if write else stat.S_IRGRP
    else:
        bits = stat.S_IWOTH if write else stat.S_IROTH
    return bool(st.st_mode & bits)


def check_access(user: User, path: Path, *, write: bool) -> None:
    """:raise PermissionDenied: `user` may not read (or write) `path`."""
    if not may_access(user, path, write=write):
        verb = "write" if write else "read"
        raise PermissionDenied(f"user {user.name!r} may not {verb} {path}")
