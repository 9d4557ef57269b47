"""A capsule's files on the public API (sdk-request-map §2.6). Paths, all `POST` under
`/v1/capsules/{id}/files/`:

    read         PathRequest       -> the bytes (at most 100 MiB, else 413 too_large)
    write        multipart `path` + `file` (at most 100 MiB)            -> 204
    stream/read  PathRequest       -> the bytes, streamed (no limit)
    stream/write multipart `path` first, then `file`, streamed (no limit) -> 204
    list         ListDirRequest    -> EntryListView   (names are bare basenames)
    mkdir        PathRequest       -> EntryView       (409 conflict if it exists)
    remove       PathRequest       -> 204             (recursive)
    stat         PathRequest       -> EntryView
    move         MoveRequest       -> EntryView
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PATH = 4096
MAX_BUFFERED_FILE = 100 * 1024 * 1024
"""`files/read` and `files/write` hold the whole file (Wrenn's cap); the stream routes do not."""


class PathRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=MAX_PATH)


class ListDirRequest(PathRequest):
    depth: int = Field(default=1, ge=0, le=16, description="1 = the directory's own entries")


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=MAX_PATH)
    destination: str = Field(min_length=1, max_length=MAX_PATH)


class FileEntryView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    type: Literal["file", "directory", "symlink"] | None = Field(
        description="null for anything else (a device, a socket)"
    )
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified_at: int = Field(description="Unix seconds")
    symlink_target: str | None = None


class EntryListView(BaseModel):
    model_config = ConfigDict(frozen=True)

    entries: list[FileEntryView]


class EntryView(BaseModel):
    model_config = ConfigDict(frozen=True)

    entry: FileEntryView
