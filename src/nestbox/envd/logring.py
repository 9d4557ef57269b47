"""envd's own log lines, the last ones, in memory: what `GET /logs` serves (the host agent's
`GetCapsuleLogs`, E2B's `GET /sandboxes/{id}/logs`).

A `logging.Handler` on the `nestbox.envd` logger while the server runs (`app.EnvdApp`): every
line envd logs (processes started and ended, recoveries, failed uploads and calls) also goes
into a ring bounded both in lines (`LOG_LINES`) and in text (`LOG_BYTES`), the oldest dropped
first, each line cleaned and cut as `protocol.envd.LogEntry` does. It lives in the guest's
memory, so it survives a pause and resume (the memory snapshot holds it) and costs nothing on
the host; a new capsule identity (a clone of a template, a fork copy) starts it empty
(`lifecycle.init`), so no capsule shows another's lines.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Literal

from nestbox.common.logging import extra_fields
from nestbox.protocol.envd import LOG_BYTES, LOG_FIELDS, LOG_LINES, LogEntry

Level = Literal["debug", "info", "warn", "error"]
ENTRY_OVERHEAD = 32
"""Bytes counted per line besides its text (timestamp, level)."""


def level_of(levelno: int) -> Level:
    """E2B's level names."""
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    return "info" if levelno >= logging.INFO else "debug"


def _size(entry: LogEntry) -> int:
    fields = sum(len(k) + len(v) for k, v in entry.fields.items())
    return ENTRY_OVERHEAD + len(entry.message) + fields


class LogRing(logging.Handler):
    """The ring. `emit` may run in any thread (a worker thread's log line): `read` and `clear`
    take the handler's own lock, as `logging` does around `emit`."""

    def __init__(self, max_lines: int = LOG_LINES, max_bytes: int = LOG_BYTES) -> None:
        super().__init__()
        self._entries: deque[tuple[LogEntry, int]] = deque()
        self._bytes = 0
        self.max_lines = max_lines
        self.max_bytes = max_bytes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            extra = list(extra_fields(record).items())[: LOG_FIELDS - 1]
            fields = {"logger": record.name, **{k: str(v) for k, v in extra}}
            entry = LogEntry(
                timestampMs=int(record.created * 1000),
                level=level_of(record.levelno),
                message=record.getMessage(),
                fields=fields,
            )
        except Exception:  # a log line must never break its caller
            self.handleError(record)
            return
        size = _size(entry)
        self._entries.append((entry, size))
        self._bytes += size
        while self._entries and (
            len(self._entries) > self.max_lines or self._bytes > self.max_bytes
        ):
            _, dropped = self._entries.popleft()
            self._bytes -= dropped

    def read(self, start_ms: int = 0, limit: int = LOG_LINES) -> list[LogEntry]:
        """Up to `limit` lines logged at or after `start_ms`, oldest first."""
        with self.lock:  # type: ignore[union-attr] # createLock() always sets it
            found = [e for e, _ in self._entries if e.ts_unix_ms >= start_ms]
        return found[: max(limit, 0)]

    def clear(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._entries.clear()
            self._bytes = 0
