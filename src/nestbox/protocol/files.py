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

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PATH = 4096
GuestPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH, pattern=r"^[^\x00]+$")]
"""A path in the guest as a caller sends it: relative ones are envd's to resolve (under the
workdir or the user's home); a NUL byte could never name a file, so it is refused at the edge."""


def guest_path_problem(path: str | None) -> str | None:
    """Why `path` (from a query string or a form field) is not a `GuestPath`; None when it is."""
    if not path or len(path) > MAX_PATH:
        return f"path is required (at most {MAX_PATH} characters)"
    if "\x00" in path:
        return "path must not contain a NUL byte"
    return None


MAX_BUFFERED_FILE = 100 * 1024 * 1024
"""`files/read` and `files/write` hold the whole file (Wrenn's cap); the stream routes do not."""


class PathRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: GuestPath


class ListDirRequest(PathRequest):
    depth: int = Field(default=1, ge=0, le=16, description="1 = the directory's own entries")


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: GuestPath
    destination: GuestPath


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
