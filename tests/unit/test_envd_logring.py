"""envd's log ring (`envd/logring.py`) and the `LogEntry` model both sides validate with: the
bounds (lines, bytes, message and field sizes) and hostile text (control characters, lone
surrogates, huge values)."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from nestbox.envd.logring import LogRing, level_of
from nestbox.protocol.envd import (
    LOG_FIELD_CHARS,
    LOG_FIELDS,
    LOG_MESSAGE_CHARS,
    LogEntry,
    LogPage,
    printable,
)


@pytest.fixture
def ring() -> tuple[LogRing, logging.Logger]:
    handler = LogRing(max_lines=5, max_bytes=10_000)
    logger = logging.Logger("nestbox.envd.test")  # not the global tree: nothing else sees it
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return handler, logger


def test_lines_kept_in_order_bounded_in_count(ring: tuple[LogRing, logging.Logger]) -> None:
    handler, logger = ring
    for i in range(8):
        logger.info("process %d started", i, extra={"pid": i, "cmd": "/bin/sh"})
    lines = handler.read()
    assert [e.message for e in lines] == [f"process {i} started" for i in range(3, 8)]
    assert lines[0].fields == {"logger": "nestbox.envd.test", "pid": "3", "cmd": "/bin/sh"}
    assert lines[0].level == "info"
    assert [e.message for e in handler.read(limit=2)] == ["process 3 started", "process 4 started"]
    later = handler.read(start_ms=lines[-1].ts_unix_ms + 1)
    assert later == []
    assert handler.read(limit=0) == []
    handler.clear()
    assert handler.read() == []


def test_bounded_in_bytes() -> None:
    handler = LogRing(max_lines=1000, max_bytes=3000)
    logger = logging.Logger("t")
    logger.addHandler(handler)
    for i in range(10):
        logger.warning("%d %s", i, "x" * 1000)
    kept = handler.read()
    assert 1 <= len(kept) <= 3
    assert kept[-1].message.startswith("9 ")
    assert kept[-1].level == "warn"


def test_hostile_text_is_cut_and_escaped(ring: tuple[LogRing, logging.Logger]) -> None:
    handler, logger = ring
    cmd = "\x1b[2J\x00evil\ud800\n" + "y" * 10_000
    logger.error("process 7 (%s) ended", cmd, extra={f"k{i}": cmd for i in range(40)})
    (entry,) = handler.read()
    assert entry.level == "error"
    assert len(entry.message) == LOG_MESSAGE_CHARS
    assert entry.message.startswith("process 7 (\\x1b[2J\\x00evil\ufffd\\x0ay")
    assert len(entry.fields) == LOG_FIELDS
    assert all(len(v) <= LOG_FIELD_CHARS for v in entry.fields.values())
    json.dumps(entry.model_dump(by_alias=True), ensure_ascii=False).encode()  # valid UTF-8


def test_a_broken_record_never_raises(ring: tuple[LogRing, logging.Logger]) -> None:
    handler, logger = ring
    logging.raiseExceptions, old = False, logging.raiseExceptions
    try:
        logger.info("%d", "not a number")  # getMessage() raises inside emit
    finally:
        logging.raiseExceptions = old
    assert handler.read() == []


def test_the_model_cleans_what_a_guest_sends() -> None:
    page = LogPage.model_validate(json.loads(json.dumps({"entries": [
        {"timestampMs": 1, "level": "info", "message": "a\u0085b\u009b\tc" + "z" * 5000,
         "fields": {"\x00k": "\udfff"}, "extra": "ignored"},
    ]})))  # fmt: skip
    (entry,) = page.entries
    assert entry.message.startswith("a\\x85b\\x9b\tc")
    assert len(entry.message) == LOG_MESSAGE_CHARS
    assert entry.fields == {"\\x00k": "\ufffd"}
    for bad in ({"timestampMs": -1, "level": "info", "message": ""},
                {"timestampMs": 1, "level": "fatal", "message": ""},
                {"timestampMs": 2**60, "level": "info", "message": ""}):  # fmt: skip
        with pytest.raises(ValidationError):
            LogEntry.model_validate(bad)
    with pytest.raises(ValidationError):
        LogPage.model_validate({"entries": [{"timestampMs": 1, "level": "info",
                                             "message": ""}] * 1001})  # fmt: skip


def test_printable_and_levels() -> None:
    assert printable("ok\ttab", 100) == "ok\ttab"
    assert printable("\x7f\x1f", 100) == "\\x7f\\x1f"
    assert printable("abcdef", 3) == "abc"
    assert [level_of(n) for n in (5, 10, 20, 30, 40, 50)] == [
        "debug", "debug", "info", "warn", "error", "error",
    ]  # fmt: skip
