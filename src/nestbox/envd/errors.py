"""envd's errors, and how each reaches a client.

    EnvdError                      root; never raised itself
    ├── InvalidArgument            malformed request, bad path, resize of a non-PTY process
    ├── NotFound                   no such file, process, pid, tag or watcher
    ├── AlreadyExists              MakeDir on an existing path, a tag already in use
    ├── PermissionDenied           the user may not touch that path, or run as that user
    ├── UnknownUser                the named user does not exist (HTTP 401, as E2B's envd)
    ├── NotEnoughSpace             the guest disk is full (HTTP 507)
    └── StartFailed                a command that cannot start (missing binary, bad cwd)

Connect handlers turn these into `ConnectError` with the code in `CONNECT_CODE` (both services
through `connect_errors`); HTTP endpoints answer `{"error": {"code", "message"}}` with the status
in `HTTP_STATUS`. A failed system call becomes one of these through `os_error`. Messages are
written for clients: no tracebacks.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

from connectrpc.code import Code
from connectrpc.errors import ConnectError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

log = logging.getLogger(__name__)


class EnvdError(Exception):
    """Root of envd's errors; `message` is safe to show to the client."""

    code = Code.INTERNAL
    http_status = 500
    http_code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_connect(self) -> ConnectError:
        return ConnectError(self.code, self.message)


class InvalidArgument(EnvdError):
    """The request is malformed or names something that cannot be acted on."""

    code = Code.INVALID_ARGUMENT
    http_status = 400
    http_code = "invalid_request"


class NotFound(EnvdError):
    """The file, directory, process or watcher does not exist."""

    code = Code.NOT_FOUND
    http_status = 404
    http_code = "not_found"


class AlreadyExists(EnvdError):
    """The path or tag is already taken."""

    code = Code.ALREADY_EXISTS
    http_status = 409
    http_code = "conflict"


class PermissionDenied(EnvdError):
    """The requesting user may not touch this path or act as this user."""

    code = Code.PERMISSION_DENIED
    http_status = 403
    http_code = "forbidden"


class UnknownUser(EnvdError):
    """The named user does not exist in the guest."""

    code = Code.UNAUTHENTICATED
    http_status = 401
    http_code = "unauthorized"


class NotEnoughSpace(EnvdError):
    """The guest's disk is full."""

    code = Code.RESOURCE_EXHAUSTED
    http_status = 507
    http_code = "not_enough_space"


class StartFailed(EnvdError):
    """The command could not be started (no such executable, bad working directory)."""

    code = Code.FAILED_PRECONDITION
    http_status = 400
    http_code = "invalid_request"


def os_error(err: OSError, path: Path | str) -> EnvdError:
    """The client-facing error for a failed system call on `path` (no exception text leaks)."""
    code = err.errno
    if code == errno.ENOENT:
        return NotFound(f"{path}: no such file or directory")
    if code == errno.EEXIST:
        return AlreadyExists(f"{path} already exists")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{path}: permission denied")
    if code == errno.EROFS:
        return PermissionDenied(f"{path}: read-only file system")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NotEnoughSpace("not enough disk space")
    if code in _INVALID:
        return InvalidArgument(f"{path}: {_INVALID[code]}")
    return EnvdError(f"{path}: {os.strerror(code) if code else 'filesystem error'}")


_INVALID = {
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "is a directory",
    errno.ENOTEMPTY: "directory not empty",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENAMETOOLONG: "file name too long",
    errno.EINVAL: "invalid argument",
    errno.EBUSY: "resource busy",
}


@contextmanager
def connect_errors() -> Iterator[None]:
    """At a Connect service's boundary: envd's errors become their Connect errors, a failed
    system call the one `os_error` gives, anything unexpected `internal` (the cause goes to the
    log)."""
    try:
        yield
    except ConnectError:
        raise
    except EnvdError as err:
        raise err.to_connect() from err
    except OSError as err:
        raise os_error(err, err.filename or "path").to_connect() from err
    except Exception as err:
        log.exception("Connect call failed")
        raise ConnectError(Code.INTERNAL, "internal error") from err
