"""The SDK's errors: one small hierarchy, mapped from the API's stable error codes
(`protocol.errors.ErrorCode`), never from messages or statuses alone.

    NestboxError                      code, message, status (None when no answer came)
    ├── InvalidRequest                invalid_request (the request itself is wrong)
    ├── Unauthorized                  unauthorized (no, bad or revoked credentials)
    ├── Forbidden                     forbidden
    ├── NotFound                      not_found (also: a destroyed capsule, a missing file)
    ├── Conflict                      conflict, host_has_capsules, team_protected
    │   └── InvalidState              invalid_state (not running, not paused, ...)
    ├── TooLarge                      too_large, not_enough_space
    ├── QuotaExceeded                 quota_exceeded, rate_limited (`retry_after` when given)
    ├── Unavailable                   unavailable, host_unavailable, agent_error (retry later)
    ├── InternalError                 internal_error, or an answer that is not our error body
    ├── NestboxConnectionError        code "connection_error": the API could not be reached
    ├── NestboxTimeout                code "timeout": a per-call or command timeout ran out
    └── CommandExitError              code "command_failed": `run(..., check=True)` saw a
                                      non-zero exit; carries the result
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from nestbox.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from nestbox.sdk.models import CommandResult


class NestboxError(Exception):
    """Any error of the SDK: `code` (a stable string), `message`, `status` (HTTP status)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class InvalidRequest(NestboxError):
    pass


class Unauthorized(NestboxError):
    pass


class Forbidden(NestboxError):
    pass


class NotFound(NestboxError):
    pass


class Conflict(NestboxError):
    pass


class InvalidState(Conflict):
    pass


class TooLarge(NestboxError):
    pass


class QuotaExceeded(NestboxError):
    def __init__(
        self, code: str, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(code, message, status)
        self.retry_after = retry_after


class Unavailable(NestboxError):
    pass


class InternalError(NestboxError):
    pass


class NestboxConnectionError(NestboxError):
    def __init__(self, message: str) -> None:
        super().__init__("connection_error", message)


class NestboxTimeout(NestboxError):
    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class CommandExitError(NestboxError):
    """A command that was asked to succeed (`check=True`) exited non-zero."""

    def __init__(self, result: CommandResult) -> None:
        tail = (result.stderr or result.stdout).strip()[-500:]
        super().__init__("command_failed", f"exit code {result.exit_code}: {tail}")
        self.result = result
        self.exit_code = result.exit_code


BY_CODE: dict[str, type[NestboxError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.HOST_HAS_CAPSULES: Conflict,
    ErrorCode.TEAM_PROTECTED: Conflict,
    ErrorCode.INVALID_STATE: InvalidState,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.NOT_ENOUGH_SPACE: TooLarge,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
    ErrorCode.RATE_LIMITED: QuotaExceeded,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.HOST_UNAVAILABLE: Unavailable,
    ErrorCode.AGENT_ERROR: Unavailable,
    ErrorCode.INTERNAL: InternalError,
}
BY_STATUS: dict[int, str] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    502: ErrorCode.AGENT_ERROR,
    503: ErrorCode.UNAVAILABLE,
}


def error_for(
    code: str, message: str, status: int | None = None, retry_after: float | None = None
) -> NestboxError:
    """The exception for an API error code (unknown codes: the base class)."""
    cls = BY_CODE.get(code, NestboxError)
    if cls is QuotaExceeded:
        return QuotaExceeded(code, message, status, retry_after)
    return cls(code, message, status)


def from_answer(status: int, body: bytes, retry_after: str | None = None) -> NestboxError:
    """The exception for an error answer: its `{"error": {"code", "message"}}` body, else (a
    proxy's page, say) the status alone decides."""
    code, message = BY_STATUS.get(status, ErrorCode.INTERNAL), ""
    try:
        doc = json.loads(body)
        detail = doc["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    after = None
    if retry_after is not None:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    return error_for(code, message, status, after)
