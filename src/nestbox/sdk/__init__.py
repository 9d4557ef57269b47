"""Nestbox's Python SDK: `Nestbox` (blocking) and `AsyncNestbox` (asyncio/anyio), the same
surface in both.

    from nestbox.sdk import Nestbox

    with Nestbox() as nb, nb.capsules.create(template="minimal") as capsule:
        print(capsule.commands.run("uname -a").stdout)
        capsule.files.write("/tmp/hello.txt", "hi")

Configuration: arguments, then `NESTBOX_API_URL` / `NESTBOX_API_KEY`, then the CLI's config
file (`nestbox login`). Errors are `nestbox.sdk.errors.NestboxError` subclasses carrying the
API's code and message. Only `protocol` of the rest of Nestbox is imported: the SDK needs
httpx, websockets, pydantic and anyio, none of the server programs.
"""

from nestbox.sdk._async.client import (
    AsyncBuilds,
    AsyncCapsule,
    AsyncCapsules,
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncKeys,
    AsyncNestbox,
    AsyncPty,
    AsyncPtySession,
    AsyncTemplates,
)
from nestbox.sdk._sync.client import (
    Builds,
    Capsule,
    Capsules,
    CommandHandle,
    Commands,
    Files,
    Keys,
    Nestbox,
    Pty,
    PtySession,
    Templates,
)
from nestbox.sdk.errors import (
    CommandExitError,
    Conflict,
    Forbidden,
    InternalError,
    InvalidRequest,
    InvalidState,
    NestboxConnectionError,
    NestboxError,
    NestboxTimeout,
    NotFound,
    QuotaExceeded,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from nestbox.sdk.models import CommandResult

__all__ = [
    "AsyncBuilds",
    "AsyncCapsule",
    "AsyncCapsules",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncKeys",
    "AsyncNestbox",
    "AsyncPty",
    "AsyncPtySession",
    "AsyncTemplates",
    "Builds",
    "Capsule",
    "Capsules",
    "CommandExitError",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "Conflict",
    "Files",
    "Forbidden",
    "InternalError",
    "InvalidRequest",
    "InvalidState",
    "Keys",
    "Nestbox",
    "NestboxConnectionError",
    "NestboxError",
    "NestboxTimeout",
    "NotFound",
    "Pty",
    "PtySession",
    "QuotaExceeded",
    "Templates",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]
