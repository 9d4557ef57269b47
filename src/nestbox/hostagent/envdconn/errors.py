"""What can go wrong when the agent calls a capsule's envd, as errors with stable codes.

    EnvdCallError              root; `code` is the wire `ErrorCode` the agent answers with
    ├── NotFound               no such file, directory, process, pid or tag (not_found)
    ├── InvalidRequest         envd refused the arguments: bad path, cwd, size... (invalid_request)
    ├── Conflict               the path or tag already exists (conflict)
    ├── Forbidden              the guest user may not do that (forbidden)
    ├── Unauthorized           unknown guest user, or a wrong access token (unauthorized)
    ├── NotEnoughSpace         the guest disk is full (not_enough_space)
    ├── TooLarge               a buffered read went over its byte limit (too_large)
    ├── Unavailable            envd cannot be reached or the connection broke (unavailable)
    │   ├── DeadlineExceeded   the call, or a command, ran out of time
    │   └── TooSlow            envd dropped a stream because we read it too slowly
    └── EnvdInternalError      envd failed in a way it did not explain (internal_error)

Connect errors map by Connect code, `/files` answers by their `{"error": {"code"}}` body (HTTP
status as a fallback), transport failures to `Unavailable`. Cancellation is never turned into an
error: connectrpc wraps a `CancelledError` in `ConnectError(canceled)`; `from_connect` re-raises
the original cancellation so anyio cancel scopes still see their own.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from connectrpc.code import Code

from nestbox.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from connectrpc.errors import ConnectError

TOO_SLOW_MESSAGE = "stream reader too slow"
"""envd's message when it drops a stream that fell too far behind (see envd process service)."""


class EnvdCallError(Exception):
    """Root of the envd client's errors; `message` is safe to show to the agent's caller."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(EnvdCallError):
    """The file, directory, process (pid or tag) does not exist in the capsule."""

    code = ErrorCode.NOT_FOUND


class InvalidRequest(EnvdCallError):
    """envd (or this client, before sending) refused the arguments."""

    code = ErrorCode.INVALID_REQUEST


class Conflict(EnvdCallError):
    """The path or the process tag is already taken."""

    code = ErrorCode.CONFLICT


class Forbidden(EnvdCallError):
    """The guest user may not touch this path or act as that user."""

    code = ErrorCode.FORBIDDEN


class Unauthorized(EnvdCallError):
    """The named guest user does not exist, or envd wants another access token."""

    code = ErrorCode.UNAUTHORIZED


class NotEnoughSpace(EnvdCallError):
    """The guest's disk is full."""

    code = ErrorCode.NOT_ENOUGH_SPACE


class TooLarge(EnvdCallError):
    """A buffered read found more bytes than the caller allowed."""

    code = ErrorCode.TOO_LARGE


class Unavailable(EnvdCallError):
    """envd could not be reached, or the connection to it broke mid-call."""

    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(Unavailable):
    """The call (or the command `exec` ran) did not finish in time."""


class TooSlow(Unavailable):
    """envd dropped a process stream because this side fell too far behind reading it."""


class EnvdInternalError(EnvdCallError):
    """envd failed and did not say why (its log has the cause)."""

    code = ErrorCode.INTERNAL


_BY_CONNECT_CODE: dict[Code, type[EnvdCallError]] = {
    Code.NOT_FOUND: NotFound,
    Code.INVALID_ARGUMENT: InvalidRequest,
    Code.FAILED_PRECONDITION: InvalidRequest,
    Code.OUT_OF_RANGE: InvalidRequest,
    Code.ALREADY_EXISTS: Conflict,
    Code.PERMISSION_DENIED: Forbidden,
    Code.UNAUTHENTICATED: Unauthorized,
    Code.RESOURCE_EXHAUSTED: NotEnoughSpace,
    Code.UNAVAILABLE: Unavailable,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.CANCELED: Unavailable,
    Code.ABORTED: Unavailable,
}

_BY_ERROR_CODE: dict[str, type[EnvdCallError]] = {
    cls.code.value: cls
    for cls in (NotFound, InvalidRequest, Conflict, Forbidden, Unauthorized, NotEnoughSpace)
}

_BY_HTTP_STATUS: dict[int, type[EnvdCallError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    406: InvalidRequest,
    409: Conflict,
    413: TooLarge,
    502: Unavailable,
    503: Unavailable,
    504: DeadlineExceeded,
    507: NotEnoughSpace,
}


def reraise_cancellation(err: BaseException) -> None:
    """If `err` stands for a cancellation of this task, raise that cancellation instead."""
    cause = err.__cause__
    if isinstance(cause, asyncio.CancelledError):
        raise cause


def from_connect(err: ConnectError) -> EnvdCallError:
    """The error for a failed Connect call. :raise CancelledError: the call was cancelled here."""
    reraise_cancellation(err)
    if err.code is Code.RESOURCE_EXHAUSTED and err.message == TOO_SLOW_MESSAGE:
        cls: type[EnvdCallError] = TooSlow
    else:
        cls = _BY_CONNECT_CODE.get(err.code, EnvdInternalError)
    return cls(err.message or f"envd answered {err.code.value}")


def from_http(status: int, body: bytes, what: str) -> EnvdCallError:
    """The error for a non-2xx answer of one of envd's plain HTTP endpoints."""
    code, message = _error_body(body)
    cls = _BY_ERROR_CODE.get(code or "") or _BY_HTTP_STATUS.get(status, EnvdInternalError)
    return cls(message or f"envd {what}: HTTP {status}")


def from_transport(err: Exception, what: str) -> EnvdCallError:
    """The error for a request that never got an answer (refused, reset, timed out)."""
    if isinstance(err, TimeoutError):
        return DeadlineExceeded(f"envd {what}: timed out")
    return Unavailable(f"envd {what}: {type(err).__name__}: {err}"[:300])


def _error_body(body: bytes) -> tuple[str | None, str | None]:
    """`(code, message)` of an `{"error": {"code", "message"}}` body, if it is one."""
    try:
        doc = json.loads(body)
        error = doc["error"]
        code, message = error.get("code"), error.get("message")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None
    return (code if isinstance(code, str) else None), (
        message[:300] if isinstance(message, str) else None
    )
