"""Typed ids and their one string format (Wrenn's): a prefix, a dash, 25 lowercase base36
characters, e.g. `cl-3k9x…`. API keys are secrets, not ids: `wrn_` + 32 hex characters.

Every program that makes or checks an id goes through `new_id` / `is_id`; nothing else knows the
alphabet or the length.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum
from typing import NewType

BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
ID_LENGTH = 25
"""25 base36 characters hold a 128-bit value (Wrenn renders UUIDs so)."""

CapsuleId = NewType("CapsuleId", str)
TeamId = NewType("TeamId", str)
UserId = NewType("UserId", str)
HostId = NewType("HostId", str)
ApiKeyId = NewType("ApiKeyId", str)
TemplateId = NewType("TemplateId", str)


class IdPrefix(StrEnum):
    CAPSULE = "cl"
    TEAM = "team"
    USER = "usr"
    HOST = "host"
    API_KEY = "key"
    HOST_TOKEN = "htok"
    REFRESH_TOKEN = "hrt"
    TEMPLATE = "tpl"
    CHANNEL = "ch"
    BUILD = "bld"


API_KEY_PREFIX = "wrn_"
API_KEY_RE = re.compile(r"^wrn_[0-9a-f]{32}$")
API_KEY_DISPLAY_CHARS = 10
"""How much of a key is kept in clear for display (`wrn_` + 6 hex), as Wrenn does."""


def new_id(prefix: IdPrefix) -> str:
    """A fresh random id with `prefix`."""
    return f"{prefix}-" + "".join(secrets.choice(BASE36) for _ in range(ID_LENGTH))


def zero_id(prefix: IdPrefix) -> str:
    """The all-zero id of `prefix`: the platform team and its seeded rows."""
    return f"{prefix}-" + "0" * ID_LENGTH


def is_id(value: str, prefix: IdPrefix) -> bool:
    """True if `value` is a well-formed id with `prefix` (says nothing about existence)."""
    body = value.removeprefix(f"{prefix}-")
    return body != value and len(body) == ID_LENGTH and all(c in BASE36 for c in body)


def new_capsule_id() -> CapsuleId:
    return CapsuleId(new_id(IdPrefix.CAPSULE))


def new_api_key() -> str:
    """A fresh API key: `wrn_` + 32 hex characters (16 random bytes)."""
    return API_KEY_PREFIX + secrets.token_hex(16)


def is_api_key(value: str) -> bool:
    return API_KEY_RE.fullmatch(value) is not None
