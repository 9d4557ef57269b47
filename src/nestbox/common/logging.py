"""Logging set-up for the programs' `__main__` and the standard field names.

Only entry points call `configure()`; library code uses `logging.getLogger(__name__)` and puts
context in `extra=`, with the field names below where one fits. Every `extra=` field is written
(key=value text or JSON lines), the standard ones first in `FIELDS` order, then the others in the
order they were given; only the attributes `logging` itself sets on a record, and uvicorn's
`color_message` (the message again, with terminal colours), are left out.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Final

FIELDS: Final = ("capsule_id", "host_id", "template_id", "slot", "pid", "duration_ms", "accel")
"""Standard field names: use these spellings wherever the value fits."""

_RECORD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",  # set by Formatter.format
    "asctime",  # idem
    "taskName",  # Python 3.12+
    "color_message",  # uvicorn: the message again, with ANSI colours
}
_JSON_KEYS: Final = ("ts", "level", "logger", "msg", "exc")


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The `extra=` fields of `record`: the standard ones first, then the rest as given."""
    found = {
        k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")
    }
    ordered: dict[str, object] = {k: found.pop(k) for k in FIELDS if k in found}
    ordered.update(found)
    return ordered


def _text(value: object) -> str:
    """A value for key=value output: quoted (JSON string) when it would not read as one word."""
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=\\' for c in text):
        return json.dumps(text)
    return text


class _KeyValueFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # The line without traceback: `format` appends that after the fields.
        line = super().formatMessage(record)
        extra = " ".join(f"{k}={_text(v)}" for k, v in extra_fields(record).items())
        return f"{line} {extra}" if extra else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            # An extra named like one of ours is kept beside it, never over it.
            doc[f"extra.{key}" if key in _JSON_KEYS else key] = value
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Send every log record to stderr, as key=value text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every request at INFO: keep them for debugging only.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
