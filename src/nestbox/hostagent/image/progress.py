"""The build's progress display: one line per stage, with its outcome and duration.

On a terminal the line shows the stage while it runs and is rewritten in place when it ends;
elsewhere (logs, CI) only the finished line is written.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(slots=True)
class StageReport:
    """What a stage tells the display: `status` ("built", "cached", ...) and a short detail."""

    name: str
    status: str = "done"
    detail: str = ""
    seconds: float = 0.0


class Progress:
    """Writes stage lines to `stream` (usually stderr); `Progress(None)` only records them."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._tty = bool(stream and stream.isatty())
        self.reports: list[StageReport] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[StageReport]:
        report = StageReport(name)
        self._write(f"{name:<7} running...", end="")
        start = time.monotonic()
        try:
            yield report
        except BaseException as exc:  # recorded and shown, then re-raised untouched
            report.status = "failed" if isinstance(exc, Exception) else "stopped"
            raise
        finally:
            report.seconds = time.monotonic() - start
            self.reports.append(report)
            self._write(self.format(report), end="\n", rewrite=True)

    @staticmethod
    def format(report: StageReport) -> str:
        line = f"{report.name:<7} {report.status:<8} {report.seconds:6.1f} s"
        return f"{line}  {report.detail}" if report.detail else line

    def _write(self, text: str, *, end: str, rewrite: bool = False) -> None:
        if self._stream is None or (not self._tty and not end):
            return
        prefix = "\r\x1b[K" if self._tty and rewrite else ""
        self._stream.write(prefix + text + end)
        self._stream.flush()
