"""The control plane's errors. Services raise these; one handler (`api/errors.py`) turns each
into `{"error": {"code", "message"}}` with the status `protocol.errors.HTTP_STATUS` gives its
code. `message` is written for the client: never a traceback, a path or a secret.

    ControlPlaneError               (internal_error, 500)
    ├── InvalidRequest              the request is malformed or breaks a rule (400)
    ├── Unauthorized                no, bad or expired credentials (401)
    ├── Forbidden                   known caller, not allowed (403)
    ├── NotFound                    no such resource *visible to the caller* (404)
    ├── Conflict                    it already exists / clashes with another (409)
    ├── InvalidState                the resource's state does not allow it (409)
    ├── TooLarge                    a body over its limit (413)
    ├── QuotaExceeded               the team runs as many capsules as it may (429)
    ├── RateLimited                 too many requests from one address (429, Retry-After)
    ├── Busy                        the process holds as much as it may; retry (503, Retry-After)
    ├── TeamProtected               the team holds a platform admin's key (409)
    ├── HostUnavailable             no host can take it, or its host is gone (503)
    ├── HostHasCapsules             a host to delete still runs capsules (409)
    └── AgentError                  a host agent failed what it was asked (502)

Resources of another team are `NotFound`, never `Forbidden`: a caller must not learn they exist.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from nestbox.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


class ControlPlaneError(Exception):
    """Root of every error the API answers on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def extra(self) -> dict[str, object]:
        """Top-level fields to add next to `error` in the body (none by default)."""
        return {}

    def headers(self) -> dict[str, str]:
        """HTTP headers to add to the answer (none by default)."""
        return {}


class InvalidRequest(ControlPlaneError):
    code = ErrorCode.INVALID_REQUEST


class Unauthorized(ControlPlaneError):
    code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str = "missing or invalid credentials") -> None:
        super().__init__(message)


class Forbidden(ControlPlaneError):
    code = ErrorCode.FORBIDDEN


class NotFound(ControlPlaneError):
    code = ErrorCode.NOT_FOUND

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident} does not exist")
        self.kind, self.ident = kind, ident


class Conflict(ControlPlaneError):
    code = ErrorCode.CONFLICT


class InvalidState(ControlPlaneError):
    """The resource is in `current`; the operation needs one of `required`."""

    code = ErrorCode.INVALID_STATE

    def __init__(self, what: str, current: str, required: Iterable[str]) -> None:
        self.current, self.required = current, tuple(required)
        super().__init__(f"{what} is {current}; this needs {' or '.join(self.required)}")


class TooLarge(ControlPlaneError):
    code = ErrorCode.TOO_LARGE


class QuotaExceeded(ControlPlaneError):
    code = ErrorCode.QUOTA_EXCEEDED


class _RetryLater(ControlPlaneError):
    """An error the client should retry after `retry_after_s` (whole seconds, at least 1)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RateLimited(_RetryLater):
    code = ErrorCode.RATE_LIMITED


class Busy(_RetryLater):
    code = ErrorCode.UNAVAILABLE


class TeamProtected(ControlPlaneError):
    code = ErrorCode.TEAM_PROTECTED


class HostUnavailable(ControlPlaneError):
    code = ErrorCode.HOST_UNAVAILABLE


class HostHasCapsules(ControlPlaneError):
    code = ErrorCode.HOST_HAS_CAPSULES

    def __init__(self, host_id: str, capsule_ids: Sequence[str]) -> None:
        super().__init__(f"host {host_id} still has {len(capsule_ids)} capsule(s)")
        self.capsule_ids = list(capsule_ids)

    def extra(self) -> dict[str, object]:
        # The SDK reads them at the top level, under either name (sdk-request-map §2.2).
        return {"capsule_ids": self.capsule_ids, "sandbox_ids": self.capsule_ids}


class AgentError(ControlPlaneError):
    code = ErrorCode.AGENT_ERROR
