"""envd's errors, and how each reaches a client.

    EnvdError                      root; never raised itself
    ├── InvalidArgument            malformed request, bad path, resize of a non-PTY process
    ├── NotFound                   no such file, process, pid, tag or watcher
    ├── AlreadyExists              MakeDir on an existing path, a tag already in use
    ├── PermissionDenied           the user may not touch that path, or run as that user
    ├── UnknownUser                the named user does not exist (HTTP 401, as E2B's envd)
    ├── NotEnoughSpace             the guest disk is full (HTTP 507)
    └── StartFailed                a command that cannot start (missing binary, bad cwd)

Connect handlers turn these into `ConnectError` with the code in `CONNECT_CODE`; HTTP endpoints
answer `{"error": {"code", "message"}}` with the status in `HTTP_STATUS`. Messages are written for
clients: no tracebacks.
"""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError


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
