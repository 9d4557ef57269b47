"""A capsule's files: `POST /v1/capsules/{capsule_id}/files/...` (protocol/files.py).

Uploads are `multipart/form-data` with a `path` field and a `file` part, parsed as they arrive
(`multipart.py`). The buffered write stops at 100 MiB with 413 `too_large`; it reads the rest of
an over-long body (up to `DRAIN_LIMIT`) before answering, so that clients which send their
whole body before reading the answer (httpx, hence the SDK) see the 413 instead of a broken
connection. The streamed routes have no limit and hold one chunk at a time. The buffered
routes also share the process's byte budget (`services/files.py`): beyond it, 503 `unavailable`
with `Retry-After` (an upload's rest is drained first, as for 413).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response, StreamingResponse

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.multipart import Part, Reader
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.controlplane.errors import Busy, InvalidRequest, TooLarge
from nestbox.protocol.files import (
    MAX_BUFFERED_FILE,
    MAX_PATH,
    EntryListView,
    EntryView,
    ListDirRequest,
    MoveRequest,
    PathRequest,
    guest_path_problem,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request
    from starlette.types import Receive, Scope, Send

    from nestbox.controlplane.services.files import Held

FILES = CAPSULE + "/files"
DRAIN_LIMIT = 256 * 1024 * 1024
OCTETS = "application/octet-stream"


class HeldResponse(Response):
    """A buffered answer whose bytes go back to the budget once sent (or the send failed)."""

    def __init__(self, content: bytes, held: Held) -> None:
        super().__init__(content, media_type=OCTETS)
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.held.release()


async def read_file(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, PathRequest)
    files = deps.services(request).files
    held = files.budget.hold()
    try:
        content = await files.read(deps.principal(request), capsule_id, req.path, held)
    except BaseException:
        held.release()
        raise
    return HeldResponse(content, held)


async def write_file(request: Request) -> Response:
    principal, capsule_id = deps.principal(request), deps.path_param(request, "capsule_id")
    files = deps.services(request).files
    await files.running(principal, capsule_id)  # 404/409 before reading 100 MiB
    body = request.stream()
    path, data = request.query_params.get("path"), None
    held = files.budget.hold()
    try:
        try:
            async for part in Reader(request.headers.get("content-type", ""), body).parts():
                if part.name == "path":
                    path = await part.text(MAX_PATH)
                elif part.name == "file" and data is None:
                    data = await _collect(part, MAX_BUFFERED_FILE, held)
                else:  # the document's form has these two parts, once each
                    raise InvalidRequest(f"unexpected form part {part.name[:64]!r}")
        except (TooLarge, Busy):
            await _drain(body, DRAIN_LIMIT)
            raise
        if not path or data is None:
            raise InvalidRequest("the form needs a `path` field and a `file` part")
        if (problem := guest_path_problem(path)) is not None:
            raise InvalidRequest(problem)
        await files.write(principal, capsule_id, path, data)
    finally:
        held.release()
    return deps.no_content()


async def stream_read_file(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, PathRequest)
    files = deps.services(request).files
    chunks = await files.open_read(deps.principal(request), capsule_id, req.path)
    return StreamingResponse(chunks, media_type=OCTETS)


async def stream_write_file(request: Request) -> Response:
    """`path` first, then `file` (the SDK's fixed order), or `?path=` and a `file` part."""
    principal, capsule_id = deps.principal(request), deps.path_param(request, "capsule_id")
    files = deps.services(request).files
    await files.running(principal, capsule_id)
    parts = Reader(request.headers.get("content-type", ""), request.stream()).parts()
    path, part = request.query_params.get("path"), await anext(parts, None)
    if part is not None and part.name == "path":
        path, part = await part.text(MAX_PATH), await anext(parts, None)
    if not path or part is None or part.name != "file":
        raise InvalidRequest("the form needs a `path` field first, then a `file` part")
    if (problem := guest_path_problem(path)) is not None:
        raise InvalidRequest(problem)
    await files.write_stream(principal, capsule_id, path, part.data())
    return deps.no_content()


async def list_files(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, ListDirRequest)
    files = deps.services(request).files
    return deps.json(await files.list_dir(deps.principal(request), capsule_id, req.path,
                                          req.depth))  # fmt: skip


async def make_dir(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, PathRequest)
    files = deps.services(request).files
    return deps.json(await files.make_dir(deps.principal(request), capsule_id, req.path))


async def remove_path(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, PathRequest)
    await deps.services(request).files.remove(deps.principal(request), capsule_id, req.path)
    return deps.no_content()


async def stat_path(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, PathRequest)
    files = deps.services(request).files
    return deps.json(await files.stat(deps.principal(request), capsule_id, req.path))


async def move_path(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, MoveRequest)
    files = deps.services(request).files
    moved = await files.move(deps.principal(request), capsule_id, req.source, req.destination)
    return deps.json(moved)


async def _collect(part: Part, limit: int, held: Held) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in part.data():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the file is larger than {limit} bytes; use files/stream/write")
        held.add(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for chunk in body:
        seen += len(chunk)
        if seen > limit:
            return


UPLOAD = {
    "type": "object", "required": ["path", "file"], "additionalProperties": False,
    "properties": {
        "path": {"type": "string", "minLength": 1, "maxLength": MAX_PATH,
                 "pattern": "^[^\\x00]+$"},
        "file": {"type": "string", "format": "binary"},
    },
}  # fmt: skip
"""The upload form: `path` first, then `file` (the order the streamed route needs)."""

router = Router(
    tag="files",
    endpoints=[
        Endpoint("POST", FILES + "/read", read_file, "Read a file (at most 100 MiB)",
                 body=PathRequest, description="Answers the bytes (application/octet-stream)."),
        Endpoint("POST", FILES + "/write", write_file, "Write a file (at most 100 MiB)",
                 status=204, form=UPLOAD,
                 description="multipart/form-data: a `path` field and a `file` part. Parents "
                 "are created; 413 too_large over 100 MiB."),
        Endpoint("POST", FILES + "/stream/read", stream_read_file, "Read a file, streamed",
                 body=PathRequest, description="Any size; the bytes arrive as they are read."),
        Endpoint("POST", FILES + "/stream/write", stream_write_file, "Write a file, streamed",
                 status=204, form=UPLOAD,
                 description="multipart/form-data, `path` first, then `file`; any size, in "
                 "constant memory."),
        Endpoint("POST", FILES + "/list", list_files, "List a directory", body=ListDirRequest,
                 response=EntryListView),
        Endpoint("POST", FILES + "/mkdir", make_dir, "Make a directory (and its parents)",
                 body=PathRequest, response=EntryView,
                 description="409 conflict if the path exists."),
        Endpoint("POST", FILES + "/remove", remove_path, "Remove a file or directory tree",
                 body=PathRequest, status=204),
        Endpoint("POST", FILES + "/stat", stat_path, "Describe a path", body=PathRequest,
                 response=EntryView),
        Endpoint("POST", FILES + "/move", move_path, "Move or rename a path",
                 body=MoveRequest, response=EntryView),
    ],
)  # fmt: skip
