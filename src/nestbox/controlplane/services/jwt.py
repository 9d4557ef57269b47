"""A small JSON Web Token implementation: HS256 only (RFC 7519 with an HMAC-SHA256 JWS).

Enough for our own session and host tokens, and nothing more: the header must say HS256 (no
`none`, no algorithm confusion), the signature is compared in constant time, and `exp` is always
required. Claims are a flat JSON object.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenError(Exception):
    """The token is malformed, forged or expired; `str(err)` says which (for logs only)."""


def encode(claims: dict[str, Any], secret: bytes) -> str:
    """Sign `claims` (which must hold an integer `exp`, seconds since the epoch)."""
    if not isinstance(claims.get("exp"), int):
        raise ValueError("claims need an integer exp")
    signing_input = _b64(_json(HEADER)) + "." + _b64(_json(claims))
    return signing_input + "." + _b64(_sign(signing_input, secret))


def decode(token: str, secret: bytes, *, now: float) -> dict[str, Any]:
    """The verified claims of `token`. :raise TokenError:"""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a JWS compact token")
    head, body, signature = parts
    try:
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(body))
        sig = _unb64(signature)
    except (ValueError, binascii.Error) as err:
        raise TokenError("undecodable token") from err
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("unsupported algorithm")
    if not hmac.compare_digest(sig, _sign(f"{head}.{body}", secret)):
        raise TokenError("bad signature")
    if not isinstance(claims, dict):
        raise TokenError("claims are not an object")
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise TokenError("no expiry")
    if now >= exp:
        raise TokenError("expired")
    return claims


def _sign(signing_input: str, secret: bytes) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or any(c not in _ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
