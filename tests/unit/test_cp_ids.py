"""Id and API key formats (CONVENTIONS.md: `cl-` + 25 base36, `wrn_` + 32 hex, …)."""

from __future__ import annotations

import re

import pytest

from nestbox.protocol.ids import (
    IdPrefix,
    is_api_key,
    is_id,
    new_api_key,
    new_capsule_id,
    new_id,
    zero_id,
)


@pytest.mark.parametrize("prefix", list(IdPrefix))
def test_ids_have_the_wrenn_shape(prefix: IdPrefix) -> None:
    ids = {new_id(prefix) for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert re.fullmatch(rf"{prefix}-[0-9a-z]{{25}}", value)
        assert is_id(value, prefix)


def test_known_prefixes() -> None:
    assert re.fullmatch(r"cl-[0-9a-z]{25}", new_capsule_id())
    assert new_id(IdPrefix.TEAM).startswith("team-")
    assert new_id(IdPrefix.USER).startswith("usr-")
    assert new_id(IdPrefix.HOST).startswith("host-")
    assert zero_id(IdPrefix.TEAM) == "team-" + "0" * 25


@pytest.mark.parametrize(
    "value",
    ["cl-", "cl-" + "a" * 24, "cl-" + "a" * 26, "cl-" + "A" * 25, "team-" + "a" * 25,
     "cl_" + "a" * 25, "cl-" + "a" * 24 + "-"],
)  # fmt: skip
def test_malformed_ids(value: str) -> None:
    assert not is_id(value, IdPrefix.CAPSULE)


def test_api_keys() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert re.fullmatch(r"wrn_[0-9a-f]{32}", key)
        assert is_api_key(key)
    for bad in ("wrn_" + "0" * 31, "wrn_" + "G" * 32, "wrn_" + "A" * 32, "key_" + "0" * 32, ""):
        assert not is_api_key(bad)
