"""Who may call the agent: the control plane, with one secret for RPCs and another for the
port proxy, each checked against its SHA-256 (the agent never keeps either in clear).

- A registered agent accepts the agent token and the proxy token the control plane got at
  registration (`registration.HostCredentials` keeps their SHA-256s).
- An unregistered agent (development, tests) accepts `NESTBOX_AGENT_SECRET` for RPCs and
  `NESTBOX_AGENT_PROXY_SECRET` for the proxy, else the secrets in `<state_dir>/agent-secret`
  and `<state_dir>/proxy-secret` (0600), generated at the first start.

RPCs present the RPC secret as `Authorization: Bearer <secret>` or `X-Agent-Token: <secret>`.
Proxied requests present the proxy secret only, in `X-Nestbox-Proxy-Token`: their
`Authorization` header belongs to the user's application in the capsule and passes through
untouched. Neither secret authorises the other's requests, so whatever a proxied request can
be made to look like, it never carries an RPC's authority. The proxy strips both headers, so
neither secret reaches a capsule.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.protocol.hosts import AGENT_TOKEN_HEADER, PROXY_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from nestbox.hostagent.registration import HostCredentials
    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

SECRET_FILE = "agent-secret"
PROXY_SECRET_FILE = "proxy-secret"
_AGENT_TOKEN = AGENT_TOKEN_HEADER.lower().encode()
_PROXY_TOKEN = PROXY_TOKEN_HEADER.lower().encode()


@dataclass(frozen=True, slots=True)
class AgentAuth:
    """Checks presented secrets against the SHA-256s of the two accepted ones."""

    sha256_hex: str
    """The RPC secret's."""
    source: str
    """Where the secrets come from, for the start-up log line."""
    proxy_sha256_hex: str | None = None
    """The proxy secret's; None: credentials from before there was one (no proxying)."""

    def __post_init__(self) -> None:
        if self.proxy_sha256_hex is not None and hmac.compare_digest(
            self.proxy_sha256_hex, self.sha256_hex
        ):
            raise ValueError("the proxy secret must differ from the RPC secret")

    def accepts(self, presented: str | None) -> bool:
        """`presented` is the RPC secret."""
        return _matches(presented, self.sha256_hex)

    def accepts_proxy(self, presented: str | None) -> bool:
        """`presented` is the proxy secret."""
        return _matches(presented, self.proxy_sha256_hex)

    def allows_rpc(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """`Authorization: Bearer <secret>` or `X-Agent-Token: <secret>` (the RPC secret)."""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and self.accepts(token.strip()):
                    return True
            elif name == _AGENT_TOKEN and self.accepts(value.decode("latin-1").strip()):
                return True
        return False

    def allows_proxy(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """`X-Nestbox-Proxy-Token: <proxy secret>` only."""
        return any(
            name == _PROXY_TOKEN and self.accepts_proxy(value.decode("latin-1").strip())
            for name, value in headers
        )


def _matches(presented: str | None, sha256: str | None) -> bool:
    if not presented or sha256 is None:
        return False
    return hmac.compare_digest(sha256_hex(presented), sha256)


def from_credentials(creds: HostCredentials) -> AgentAuth:
    if creds.proxy_token_sha256 is None:
        log.warning("the saved credentials of %s hold no proxy token (registered by an older "
                    "agent): the port proxy refuses everything until the agent registers "
                    "again", creds.host_id)  # fmt: skip
    return AgentAuth(
        creds.agent_token_sha256,
        f"the control plane's tokens ({creds.host_id})",
        creds.proxy_token_sha256,
    )


def local_auth(settings: AgentSettings) -> AgentAuth:
    """The secrets of an unregistered agent: each from its setting, else from its file in the
    state directory (created with a fresh random secret, mode 0600, if missing). Blocking
    file I/O. :raise ValueError: both secrets are the same."""
    sources = []
    if settings.secret is not None:
        secret = settings.secret.get_secret_value()
        sources.append("NESTBOX_AGENT_SECRET")
    else:
        path = settings.state_dir / SECRET_FILE
        secret = read_or_create_secret(path)
        sources.append(str(path))
    if settings.proxy_secret is not None:
        proxy = settings.proxy_secret.get_secret_value()
        sources.append("NESTBOX_AGENT_PROXY_SECRET")
    else:
        path = settings.state_dir / PROXY_SECRET_FILE
        proxy = read_or_create_secret(path)
        sources.append(str(path))
    return AgentAuth(sha256_hex(secret), " and ".join(sources), sha256_hex(proxy))


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
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, path)  # never replaces a secret another start wrote meanwhile
    except FileExistsError:
        tmp.unlink()
        return path.read_text().strip()
    tmp.unlink()
    log.info("generated the agent secret %s", path)
    return secret


def sha256_hex(secret: str) -> str:
    """How a secret is kept and compared: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode()).hexdigest()
