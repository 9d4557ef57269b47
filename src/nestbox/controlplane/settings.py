"""The control plane's settings: loaded once in `__main__` from `NESTBOX_CP_*` (plus the shared
`NESTBOX_DIR`, `NESTBOX_DATABASE_URL`, `NESTBOX_PROXY_DOMAIN`, `NESTBOX_LOG_LEVEL`) and passed
down through constructors. Tests build `CPSettings(...)` directly.

Also here: the JWT signing secret, generated on first start into `<data_dir>/jwt-secret` (0600)
when `NESTBOX_CP_JWT_SECRET` is unset, so sessions survive restarts.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

JWT_SECRET_FILE = "jwt-secret"
ADMIN_KEY_FILE = "admin-api-key"


class CPSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NESTBOX_CP_", frozen=True, extra="ignore")

    data_dir: Path = Field(
        default=Path("/var/lib/nestbox"),
        validation_alias=AliasChoices("NESTBOX_DIR", "data_dir"),
        description="Nestbox's data directory (cp.db, admin-api-key, jwt-secret)",
    )
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("NESTBOX_DATABASE_URL", "database_url"),
        description="SQLAlchemy URL; empty = SQLite in <data_dir>/cp.db; postgresql:// works",
    )
    proxy_domain: str = Field(
        default="localhost:9725",
        validation_alias=AliasChoices("NESTBOX_PROXY_DOMAIN", "proxy_domain"),
        description="capsule ports are served at {port}-{capsule_id}.<proxy_domain>",
    )
    listen: str = Field(default="127.0.0.1:9725", description="host:port of the public API")
    public_url: str = Field(default="", description="how users reach the API; default from listen")
    jwt_secret: SecretStr | None = Field(
        default=None, description="HS256 key for sessions; default: <data_dir>/jwt-secret"
    )
    jwt_ttl_s: int = Field(default=6 * 3600, gt=0, description="lifetime of a user session JWT")
    signup_enabled: bool = Field(default=True, description="allow POST /v1/auth/signup")
    admin_email: str = Field(default="admin@localhost", description="the first start's admin")
    heartbeat_unreachable_after_s: float = Field(
        default=90.0, gt=0, description="a host with no heartbeat for this long is unreachable"
    )
    reconcile_interval_s: float = Field(
        default=30.0, gt=0, description="how often DB state is compared with the agents'"
    )
    host_monitor_interval_s: float = Field(
        default=10.0, gt=0, description="how often heartbeat ages are checked"
    )
    host_registration_ttl_s: int = Field(
        default=3600, gt=0, description="lifetime of a one-time host registration token"
    )
    log_level: str = Field(
        default="INFO",
        validation_alias=AliasChoices("NESTBOX_CP_LOG_LEVEL", "NESTBOX_LOG_LEVEL", "log_level"),
    )
    log_json: bool = Field(default=False, description="JSON-lines logs instead of key=value")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """`postgresql://` and `postgres://` become `postgresql+asyncpg://`; `sqlite://` becomes
        `sqlite+aiosqlite://`: the control plane only speaks to databases asynchronously."""
        for plain, driver in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return driver + value.removeprefix(plain)
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_listen(value)
        return value

    @property
    def db_url(self) -> str:
        """The effective database URL."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'cp.db'}"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = split_listen(self.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def redacted(self) -> dict[str, Any]:
        """The effective settings for `--print-config`: secrets and DB passwords hidden."""
        doc: dict[str, Any] = json.loads(self.model_dump_json())
        doc["database_url"] = make_url(self.db_url).render_as_string(hide_password=True)
        return doc


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port). :raise ValueError:"""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen must be host:port, not {listen!r}")
    return host.strip("[]"), int(port)


def jwt_secret(settings: CPSettings) -> bytes:
    """The session signing key: the configured one, else `<data_dir>/jwt-secret`, created
    (0600, 32 random bytes) on first use. :raise OSError: the data directory is unusable."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value().encode()
    path = settings.data_dir / JWT_SECRET_FILE
    try:
        return path.read_text().strip().encode()
    except FileNotFoundError:
        pass
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    write_private(path, value + "\n", exclusive=True)
    return path.read_text().strip().encode()


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write `text` to `path` readable by the owner only (0600 from the first byte).
    With `exclusive`, an existing file is left alone (two starts racing keep one secret)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
