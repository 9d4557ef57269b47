"""The agent's own errors, and `classify()`: the stable wire code of any error the agent raises.

    HostAgentError              root of the errors raised by the manager itself
    ├── BadRequest              an argument is malformed (invalid_request)
    ├── CapsuleExists           the capsule id is taken on this agent (conflict)
    ├── CapsuleFailed           the capsule is in `error`: its VM died or was lost (invalid_state)
    ├── NoGuestImage            no `minimal` template and no image to build it (unavailable)
    ├── StreamInterrupted       the capsule was paused or stopped under a call (unavailable)
    └── AgentNotReady           the agent is starting or stopping (unavailable)

Errors of the layers below keep their own classes (`capsule.CapsuleError`, `envdconn`'s
`EnvdCallError`, `TemplateNotFound`, `VmError`, ...); `classify` maps each to an `ErrorCode`
and a message fit for a client. Anything it does not know is `internal_error` with a generic
message (the cause goes to the log, never to the client).
"""

from __future__ import annotations

from nestbox.hostagent.capsule import (
    CapsuleNotFound,
    GuestUnreachable,
    InvalidState,
)
from nestbox.hostagent.envdconn.errors import EnvdCallError
from nestbox.hostagent.network import NoFreeSlot
from nestbox.hostagent.network.egress import BadEgress
from nestbox.hostagent.storage.templates import TemplateNotFound
from nestbox.hostagent.undo import TeardownError
from nestbox.hostagent.vmm.base import VmError
from nestbox.protocol.errors import ErrorCode


class HostAgentError(Exception):
    """Root of the manager's own errors; `code` is the wire code, `str()` the client message."""

    code = ErrorCode.INTERNAL


class BadRequest(HostAgentError):
    """A request argument is malformed (an id, a size, a missing field)."""

    code = ErrorCode.INVALID_REQUEST


class CapsuleExists(HostAgentError):
    """CreateCapsule named an id this agent already holds."""

    code = ErrorCode.CONFLICT


class CapsuleFailed(HostAgentError):
    """The capsule is in `error` (its VM exited or could not be re-adopted); only destroy
    works on it."""

    code = ErrorCode.INVALID_STATE


class NoGuestImage(HostAgentError):
    """The `minimal` template does not exist and there is no guest image to build it from
    (`nestbox-agent image build` makes one)."""

    code = ErrorCode.UNAVAILABLE


class StreamInterrupted(HostAgentError):
    """The capsule was paused, destroyed or lost while a call into it was running."""

    code = ErrorCode.UNAVAILABLE


class AgentNotReady(HostAgentError):
    """The agent's runtime is not up (start-up recovery runs, or it is shutting down)."""

    code = ErrorCode.UNAVAILABLE


def classify(err: BaseException) -> tuple[ErrorCode, str]:
    """The wire code and the client message of `err`."""
    match err:
        case HostAgentError():
            return err.code, str(err)
        case EnvdCallError():
            return err.code, err.message
        case CapsuleNotFound() | TemplateNotFound():
            return ErrorCode.NOT_FOUND, str(err)
        case InvalidState():
            return ErrorCode.INVALID_STATE, str(err)
        case NoFreeSlot():
            return ErrorCode.UNAVAILABLE, "no free capsule slot on this host"
        case BadEgress():
            return ErrorCode.INVALID_REQUEST, str(err)
        case GuestUnreachable():
            return ErrorCode.UNAVAILABLE, f"capsule {err.capsule_id}: envd did not answer"
        case TeardownError():
            return ErrorCode.INTERNAL, "the capsule's resources could not all be removed"
        case VmError():
            return ErrorCode.UNAVAILABLE, "the capsule's VM failed"
        case TimeoutError():
            return ErrorCode.UNAVAILABLE, "the operation timed out"
    return ErrorCode.INTERNAL, "internal error in the host agent"
