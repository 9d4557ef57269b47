"""Who may call the agent: the control plane's secret, checked on every RPC and proxied request.

- A registered agent accepts only the agent token the control plane got at registration
  (`registration.HostCredentials`, which keeps its SHA-256).
- An unregistered agent (development, tests) accepts `NESTBOX_AGENT_SECRET`, else the secret
  in `<state_dir>/agent-secret` (0600), generated at the first start.

RPCs present it as `Authorization: Bearer <secret>` or `X-Agent-Token: <secret>`. Proxied
requests present it only as `X-Agent-Token`: their `Authorization` header belongs to the
user's application in the capsule and is passed through untouched (the proxy strips
`X-Agent-Token`, so the secret never reaches a capsule).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.protocol.hosts import AGENT_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from nestbox.hostagent.registration import HostCredentials
    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

SECRET_FILE = "agent-secret"
_AGENT_TOKEN = AGENT_TOKEN_HEADER.lower().encode()


@dataclass(frozen=True, slots=True)
class AgentAuth:
    """Checks presented secrets against the SHA-256 of the one accepted secret."""

    sha256_hex: str
    source: str
    """Where the secret comes from, for the start-up log line."""

    def accepts(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(sha256_hex(presented), self.sha256_hex)

    def allows_rpc(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """`Authorization: Bearer <secret>` or `X-Agent-Token: <secret>`."""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and self.accepts(token.strip()):
                    return True
            elif name == _AGENT_TOKEN and self.accepts(value.decode("latin-1").strip()):
                return True
        return False

    def allows_proxy(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """`X-Agent-Token: <secret>` only."""
        return any(
            name == _AGENT_TOKEN and self.accepts(value.decode("latin-1").strip())
            for name, value in headers
        )


def from_credentials(creds: HostCredentials) -> AgentAuth:
    return AgentAuth(creds.agent_token_sha256, f"the control plane's token ({creds.host_id})")


def local_auth(settings: AgentSettings) -> AgentAuth:
    """The secret of an unregistered agent: the setting, else the state directory's file
    (created with a fresh random secret, mode 0600, if missing). Blocking file I/O."""
    if settings.secret is not None:
        secret = settings.secret.get_secret_value()
        return AgentAuth(sha256_hex(secret), "NESTBOX_AGENT_SECRET")
    path = settings.state_dir / SECRET_FILE
    secret = read_or_create_secret(path)
    return AgentAuth(sha256_hex(secret), str(path))


def read_or_create_secret(path: Path) -> str:
    """The secret in `path`; written first (0600, atomically) if the file does not exist."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    try:
        os.link(tmp, path)  # never replaces a secret another start wrote meanwhile
    except FileExistsError:
        tmp.unlink()
        return path.read_text().strip()
    tmp.unlink()
    log.info("generated the agent's RPC secret in %s", path)
    return secret


def sha256_hex(secret: str) -> str:
    """How a secret is kept and compared: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode()).hexdigest()
