"""User metadata of a capsule: a small map of strings, set at create, returned in every view,
and the filter `GET /v1/capsules?metadata.<key>=<value>` matches on.

Limits: at most `MAX_KEYS` pairs; keys `KEY` (letters, digits and `_ . : / -`, 1-64, starting
with a letter or digit); values at most `MAX_VALUE` characters; `MAX_TOTAL` characters of keys
and values together. The names the system sets (`SYSTEM_KEYS`) are refused.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_KEYS = 20
MAX_VALUE = 512
MAX_TOTAL = 8192
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
SYSTEM_KEYS = frozenset({"agent_version", "accel", "image_version", "envd_version"})
"""Set by the host agent on every start (Wrenn's system metadata)."""
FILTER_PREFIX = "metadata."
"""A query parameter `metadata.<key>=<value>` filters a listing."""


def check_metadata(value: dict[str, str]) -> dict[str, str]:
    """`value` if it keeps the limits of the module docstring. :raise ValueError:"""
    if len(value) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} metadata pairs")
    total = 0
    for key, item in value.items():
        check_key(key)
        if len(item) > MAX_VALUE:
            raise ValueError(f"metadata value of {key!r} is over {MAX_VALUE} characters")
        total += len(key) + len(item)
    if total > MAX_TOTAL:
        raise ValueError(f"metadata is over {MAX_TOTAL} characters in all")
    return value


def check_key(key: str) -> str:
    """:raise ValueError: not a valid user metadata key."""
    if not KEY.fullmatch(key):  # (`$` alone would take a trailing newline)
        raise ValueError(
            f"bad metadata key {key[:80]!r}: 1-64 of letters, digits and _.:/-, "
            "starting with a letter or digit"
        )
    if key in SYSTEM_KEYS:
        raise ValueError(f"metadata key {key!r} is set by the system")
    return key


SCHEMA = {
    "maxProperties": MAX_KEYS,
    "propertyNames": {"pattern": KEY.pattern, "not": {"enum": sorted(SYSTEM_KEYS)}},
    "additionalProperties": {"type": "string", "maxLength": MAX_VALUE},
}
"""What the OpenAPI document states of a metadata map (all but `MAX_TOTAL`, in the description):
a request the document allows must not be refused."""

Metadata = Annotated[
    dict[str, str],
    AfterValidator(check_metadata),
    Field(json_schema_extra=SCHEMA, description=f"at most {MAX_KEYS} string pairs, "
          f"{MAX_TOTAL} characters of keys and values in all"),
]  # fmt: skip
