"""A process's stdin and a directory watch on the public API.

    POST   /v1/capsules/{id}/processes/{pid or tag}/stdin   StdinWrite -> 204
    DELETE /v1/capsules/{id}/processes/{pid or tag}/stdin                -> 204 (closes it)
    GET    /v1/capsules/{id}/files/watch?path=&recursive=                -> text/event-stream

Only a background process started with `"stdin": true` has a stdin to write. The watch is a
Server-Sent Events stream: a `WatchEventView` per `data:` line, `start` first once the watch
is set, `: keepalive` comments every 15 s; it ends when the capsule stops running.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STDIN = 1024 * 1024
"""Characters of `data` in one write (base64 included)."""


BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""What `base64.b64decode(data, validate=True)` takes: the alphabet, padded to 4 characters."""


class StdinWrite(BaseModel):
    # The document states the rule the service enforces: base64 `data` must decode.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"properties": {"encoding": {"const": "utf-8"}}},
        {"required": ["encoding"],
         "properties": {"encoding": {"const": "base64"}, "data": {"pattern": BASE64}}},
    ]})  # fmt: skip

    data: str = Field(max_length=MAX_STDIN)
    encoding: Literal["utf-8", "base64"] = "utf-8"


class WatchEventView(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal["start", "create", "write", "remove", "rename", "chmod", "unknown"]
    name: str = Field(default="", description="relative to the watched directory")
    path: str = Field(default="", description="absolute, in the capsule")
