"""`common.logging` writes every `extra=` field, in key=value text and in JSON lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from nestbox.common.logging import configure, extra_fields


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def emit(json_lines: bool, *args: object, exc: bool = False, **extra: object) -> str:
    """Configure, log one INFO line with `extra`, return what the handler wrote."""
    configure("INFO", json_lines=json_lines)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    log = logging.getLogger("nestbox.test")
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed %s", *args, extra=extra)
    else:
        log.info("done %s", *args, extra=extra)
    return stream.getvalue()


EXTRA: dict[str, Any] = {
    "ms": 12.5,
    "egress": True,
    "leftovers": ["nbx-a-1", "nbh-a-1"],
    "capsule_id": "cl-x",
    "slot": 3,
}


@pytest.mark.usefixtures("root_restored")
def test_key_value_keeps_every_extra_standard_fields_first() -> None:
    line = emit(False, "it", **EXTRA).rstrip("\n")
    fields = "capsule_id=cl-x slot=3 ms=12.5 egress=True leftovers=\"['nbx-a-1', 'nbh-a-1']\""
    assert line.endswith(f"nestbox.test: done it {fields}")


@pytest.mark.usefixtures("root_restored")
def test_json_keeps_every_extra() -> None:
    doc = json.loads(emit(True, "it", **EXTRA, duration_ms=7, level="extra-level"))
    assert doc["msg"] == "done it"
    assert doc["level"] == "INFO"  # an extra never replaces one of the line's own keys ...
    assert doc["extra.level"] == "extra-level"  # ... it is kept beside it
    for key, value in {**EXTRA, "duration_ms": 7}.items():
        assert doc[key] == value, key
    assert list(doc)[4:7] == ["capsule_id", "slot", "duration_ms"]


@pytest.mark.usefixtures("root_restored")
def test_values_with_spaces_are_quoted_and_fields_precede_the_traceback() -> None:
    text = emit(False, "x", exc=True, reason="a b=c", empty="")
    first, *rest = text.splitlines()
    assert first.endswith('failed x reason="a b=c" empty=""')
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


def test_record_attributes_and_uvicorn_colours_are_not_fields() -> None:
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "m %s", ("a",), None)
    record.getMessage()
    record.__dict__.update(color_message="\x1b[1mm\x1b[0m", _private=1, egress=False)
    assert extra_fields(record) == {"egress": False}


@pytest.mark.usefixtures("root_restored")
def test_no_extra_no_trailing_space() -> None:
    assert emit(False, "plain").endswith("nestbox.test: done plain\n")
