"""The OpenAPI document states the metadata rule the handlers enforce (`make fuzz` fails on a
schema-valid request refused): a key the document's `propertyNames` allows is one
`check_metadata` takes, and one it refuses is refused."""

from __future__ import annotations

import re
from typing import Any

import pytest

from nestbox.protocol.capsules import CapsuleCreate
from nestbox.protocol.metadata import MAX_KEYS, MAX_VALUE, SYSTEM_KEYS, check_metadata

KEYS = ["a", "A9", "x" * 64, "x" * 65, "", ".", "-a", "_a", "a.b:c/d-e_f", "a b", "é", "a\n",
        "9", *sorted(SYSTEM_KEYS)]  # fmt: skip


def document_schema() -> dict[str, Any]:
    metadata = CapsuleCreate.model_json_schema()["properties"]["metadata"]
    [schema] = [s for s in metadata["anyOf"] if s.get("type") == "object"]
    assert isinstance(schema, dict)
    return schema


def allowed_by_document(key: str) -> bool:
    names = document_schema()["propertyNames"]
    # JSON Schema's `$` is ECMA's: the end of the string, never before a trailing newline.
    pattern = str(names["pattern"]).removesuffix("$") + r"\Z"
    return re.search(pattern, key) is not None and key not in names["not"]["enum"]


@pytest.mark.parametrize("key", KEYS)
def test_a_key_is_refused_exactly_when_the_document_says(key: str) -> None:
    try:
        check_metadata({key: "v"})
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == allowed_by_document(key), key


def test_the_document_states_the_counts_and_value_length() -> None:
    schema = document_schema()
    assert schema["maxProperties"] == MAX_KEYS
    assert schema["additionalProperties"] == {"type": "string", "maxLength": MAX_VALUE}
    with pytest.raises(ValueError, match="at most"):
        check_metadata({f"k{i}": "" for i in range(MAX_KEYS + 1)})
    with pytest.raises(ValueError, match="over"):
        check_metadata({"k": "v" * (MAX_VALUE + 1)})
