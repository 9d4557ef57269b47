"""Stable error codes on the wire, shared by every program.

Connect RPCs use Connect's own codes (`not_found`, `invalid_argument`, ...). Plain HTTP endpoints
answer `{"error": {"code": ErrorCode, "message": str}}` with the status from `HTTP_STATUS`.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    """Machine-readable error codes; clients branch on these, never on messages."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID_STATE = "invalid_state"
    TOO_LARGE = "too_large"
    NOT_ENOUGH_SPACE = "not_enough_space"
    UNAVAILABLE = "unavailable"
    HOST_UNAVAILABLE = "host_unavailable"
    HOST_HAS_CAPSULES = "host_has_capsules"
    """A host still runs capsules; the body also lists them in a top-level `capsule_ids`."""
    AGENT_ERROR = "agent_error"
    """A host agent failed an operation the control plane asked of it."""
    QUOTA_EXCEEDED = "quota_exceeded"
    """The team already runs as many capsules as its quota allows."""
    RATE_LIMITED = "rate_limited"
    """Too many requests from this address; the answer's `Retry-After` says when to retry."""
    TEAM_PROTECTED = "team_protected"
    """The team holds a platform admin's API key and cannot be deleted."""
    INTERNAL = "internal_error"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.NOT_ENOUGH_SPACE: 507,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.HOST_UNAVAILABLE: 503,
    ErrorCode.HOST_HAS_CAPSULES: 409,
    ErrorCode.AGENT_ERROR: 502,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TEAM_PROTECTED: 409,
    ErrorCode.INTERNAL: 500,
}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str


class ErrorBody(BaseModel):
    """The JSON body of every non-2xx HTTP answer: `{"error": {"code", "message"}}`."""

    model_config = ConfigDict(frozen=True)

    error: ErrorDetail

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> ErrorBody:
        return cls(error=ErrorDetail(code=code, message=message))
