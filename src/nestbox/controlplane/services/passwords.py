"""Password hashing with the standard library's scrypt (RFC 7914).

Stored form: `scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`, so the cost can rise later without
invalidating old hashes. Hashing takes tens of milliseconds on purpose: call these from a worker
thread (`anyio.to_thread.run_sync`), never on the event loop.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1
"""16 MiB of memory per hash (128·n·r bytes); about 50 ms on one core."""
SALT_BYTES, KEY_BYTES = 16, 32
MAX_MEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=KEY_BYTES,
                         maxmem=MAX_MEM)  # fmt: skip
    return "$".join((SCHEME, str(N), str(R), str(P), _b64(salt), _b64(key)))


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches `stored`; False for a wrong password or a malformed hash."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=MAX_MEM,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def dummy_hash() -> str:
    """Checked against when no such user exists, so a login takes as long either way."""
    return hash_password(secrets.token_hex(16))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
