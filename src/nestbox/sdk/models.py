"""What the SDK hands back. The API's own views come from `nestbox.protocol` (one definition
for the server and its clients); the rest are the SDK's: a finished command, stream events,
server-sent events."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from nestbox.protocol.accounts import ApiKeyView, MeView
from nestbox.protocol.builds import BuildEvent, BuildEventType, BuildStatus, BuildView
from nestbox.protocol.capsules import (
    BackgroundView,
    CapsuleStatus,
    CapsuleView,
    ExecResultView,
    ProcessListView,
    ProcessView,
)
from nestbox.protocol.events import EventType, EventView
from nestbox.protocol.files import FileEntryView
from nestbox.protocol.lifetime import ForkView
from nestbox.protocol.stdio import WatchEventView
from nestbox.protocol.templates import TemplateView

__all__ = [
    "ApiKeyView",
    "BackgroundView",
    "BuildEvent",
    "BuildEventType",
    "BuildStatus",
    "BuildView",
    "CapsuleStatus",
    "CapsuleView",
    "CommandResult",
    "EventType",
    "EventView",
    "ExecResultView",
    "FileEntryView",
    "ForkView",
    "MeView",
    "ProcessEvent",
    "ProcessListView",
    "ProcessView",
    "TemplateView",
    "WatchEventView",
]


class CommandResult(BaseModel):
    """A command that ran to its end (or what of it a handle saw)."""

    model_config = ConfigDict(frozen=True)

    stdout: str
    stderr: str
    exit_code: int
    duration_ms: int | None = None
    pid: int | None = None


class ProcessEvent(BaseModel):
    """One frame of a process's output stream: `start` (pid), `stdout`/`stderr` (data),
    `exit` (exit_code) or `error` (data)."""

    model_config = ConfigDict(frozen=True)

    type: Literal["start", "stdout", "stderr", "exit", "error"]
    pid: int | None = None
    data: str = ""
    exit_code: int | None = None
