"""The control plane's own HS256 JWTs and scrypt password hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable

import pytest

from nestbox.controlplane.services import jwt
from nestbox.controlplane.services.passwords import hash_password, verify_password

SECRET = b"test secret"
NOW = 1_800_000_000


def claims(**kw: object) -> dict[str, object]:
    return {"sub": "usr-1", "team_id": "team-1", "exp": NOW + 60, **kw}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_round_trip() -> None:
    token = jwt.encode(claims(name="Ada ✓"), SECRET)
    assert token.count(".") == 2
    assert "=" not in token
    assert jwt.decode(token, SECRET, now=NOW) == claims(name="Ada ✓")


def test_matches_the_standard_construction() -> None:
    """Independently built HS256 JWS (RFC 7515 §3.1): header.payload signed with HMAC-SHA256."""
    token = jwt.encode(claims(), SECRET)
    head, body, sig = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "HS256", "typ": "JWT"}
    expected = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert sig == b64(expected)


def test_expiry() -> None:
    token = jwt.encode(claims(), SECRET)
    jwt.decode(token, SECRET, now=NOW + 59)
    with pytest.raises(jwt.TokenError, match="expired"):
        jwt.decode(token, SECRET, now=NOW + 60)


def test_exp_is_required() -> None:
    with pytest.raises(ValueError, match="exp"):
        jwt.encode({"sub": "x"}, SECRET)
    head = b64(json.dumps({"alg": "HS256"}).encode())
    body = b64(json.dumps({"sub": "x"}).encode())
    sig = b64(hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(jwt.TokenError, match="expiry"):
        jwt.decode(f"{head}.{body}.{sig}", SECRET, now=NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # signature
        lambda t: ".".join([t.split(".")[0], b64(b'{"sub":"admin","exp":9999999999}'),
                            t.split(".")[2]]),  # payload swapped
        lambda t: t + ".extra",
        lambda t: "garbage",
        lambda t: "a.b.c",
        lambda t: "",
    ],
)  # fmt: skip
def test_tampering_is_detected(mutate: Callable[[str], str]) -> None:
    token = jwt.encode(claims(), SECRET)
    with pytest.raises(jwt.TokenError):
        jwt.decode(mutate(token), SECRET, now=NOW)


def test_wrong_secret() -> None:
    with pytest.raises(jwt.TokenError, match="signature"):
        jwt.decode(jwt.encode(claims(), SECRET), b"other", now=NOW)


@pytest.mark.parametrize("alg", ["none", "HS512", "RS256"])
def test_only_hs256_is_accepted(alg: str) -> None:
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = b64(hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest())
    for token in (f"{head}.{body}.{sig}", f"{head}.{body}."):
        with pytest.raises(jwt.TokenError):
            jwt.decode(token, SECRET, now=NOW)


def test_passwords() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert hash_password("correct horse") != stored  # salted
    assert not verify_password("x", "not-a-hash")
    assert not verify_password("x", "bcrypt$1$2$3$4$5")
