"""Secrets the control plane must be able to send but should not keep readable: the agent and
proxy tokens of its hosts (it presents them to the agents, so a hash will not do).

They are sealed with AES-256-GCM under the control plane's secret key, kept apart from the
database in `<data_dir>/secret-key` (32 random bytes as hex, mode 0600, written once through a
temporary file, fsync and a link that never replaces an existing key). It is a key of its own,
not derived from the session (JWT) secret, so rotating that one never loses the hosts' tokens.
A copy of the database alone (a backup, a dump, a read-only SQL injection) then yields no
token. Losing the key file loses the tokens: the hosts must register again. Several control
planes on one database must share the file.

Sealed form: `v1.` + base64url(12-byte random nonce | ciphertext | 16-byte tag), unpadded. The
associated data names the row and column (`hosts/<id>/agent_token`), so a sealed value copied
to another host or column does not open.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nestbox.controlplane.settings import prepare_data_dir, write_private

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

SECRET_KEY_FILE = "secret-key"
KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v1."


class SecretError(Exception):
    """A sealed value does not open (another key, another row, or damaged)."""


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the secret key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, sealed: str, context: str) -> str:
        """:raise SecretError:"""
        if not sealed.startswith(PREFIX):
            raise SecretError("not a sealed value")
        body = sealed.removeprefix(PREFIX)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            opened = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretError("the sealed value does not open with this key") from None
        return opened.decode()


def host_context(host_id: str, column: str) -> str:
    """The associated data of a host's sealed token."""
    return f"hosts/{host_id}/{column}"


def load_secret_key(data_dir: Path) -> bytes:
    """The control plane's secret key from `<data_dir>/secret-key`, made first if missing
    (`settings.write_private`: 0600, temp file, fsync, never replacing one a racing start
    wrote). Blocking file I/O. :raise OSError: :raise ValueError: the file holds no key."""
    path = data_dir / SECRET_KEY_FILE
    if not path.exists():
        prepare_data_dir(data_dir)
        write_private(path, secrets.token_hex(KEY_BYTES) + "\n", exclusive=True)
        log.info("made the control plane's secret key %s", path)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} does not hold a {KEY_BYTES}-byte hex key")
    return key
