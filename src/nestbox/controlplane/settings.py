"""The control plane's settings: loaded once in `__main__` from `NESTBOX_CP_*` (plus the shared
`NESTBOX_DIR`, `NESTBOX_DATABASE_URL`, `NESTBOX_PROXY_DOMAIN`, `NESTBOX_LOG_LEVEL`) and passed
down through constructors. Tests build `CPSettings(...)` directly.

Also here: the data directory (0700) and its secret files (0600, written atomically: a temp
file, fsync, rename, so a crash never leaves an empty or partial secret), and the JWT signing
secret: `NESTBOX_CP_JWT_SECRET` (at least 32 bytes, else the settings do not load), or
`<data_dir>/jwt-secret`, generated on first start so sessions survive restarts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

JWT_SECRET_FILE = "jwt-secret"
ADMIN_KEY_FILE = "admin-api-key"
MIN_JWT_SECRET_BYTES = 32
"""HS256 keys shorter than the hash output (32 bytes) weaken it (RFC 7518 §3.2)."""
DATA_DIR_MODE = 0o700
SOURCE_DASHBOARD = Path(__file__).resolve().parents[3] / "dashboard" / "build"
"""Where `make install` builds the dashboard in a source checkout."""


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
    default_internet_access: bool = Field(
        default=False, description="egress of a capsule whose create does not say "
        "(`allow_internet_access`); private, link-local and host addresses stay blocked",
    )  # fmt: skip
    capsule_max_vcpus: int = Field(
        default=8, ge=1, description="most vCPUs a capsule from a base template may ask for"
    )
    capsule_max_memory_mb: int = Field(
        default=8192, ge=128, description="most memory_mb a capsule from a base template may "
        "ask for (each host also has its own limit)",
    )  # fmt: skip
    team_capsule_quota: int = Field(
        default=20, ge=0, description="capsules a team may hold at once (pending, running, "
        "resuming, ...; paused ones do not count); 0 = no limit",
    )  # fmt: skip
    auth_rate_burst: int = Field(
        default=10, gt=0, description="login, signup and API-key creation: requests per client "
        "address allowed at once (each route has its own bucket)",
    )  # fmt: skip
    auth_rate_per_min: float = Field(
        default=10.0, gt=0, description="... and how many more each minute refills"
    )
    forwarded_allow_ips: str = Field(
        default="", description="proxies whose X-Forwarded-For is trusted for the client "
        "address (comma-separated, uvicorn's syntax); empty = none",
    )  # fmt: skip
    file_buffer_budget_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="bytes all buffered (non-streamed) file "
        "reads and writes of this process may hold at once; beyond it 503 unavailable",
    )  # fmt: skip
    session_recheck_s: float = Field(
        default=3.0, gt=0, description="how often an open WebSocket session re-checks its "
        "credentials (a revoked key or removed member is closed within this)",
    )  # fmt: skip
    stuck_after_s: float = Field(
        default=5.0, ge=0, description="a capsule row in pending/pausing/resuming/snapshotting "
        "this long, with no call of this process working on it, is settled from its agent",
    )  # fmt: skip
    signup_enabled: bool = Field(default=True, description="allow POST /v1/auth/signup")
    dashboard_dir: Path = Field(
        default=SOURCE_DASHBOARD, description="the built dashboard served at / (`make install` "
        "builds dashboard/build); without a build / says how to make one",
    )  # fmt: skip
    admin_email: str = Field(default="admin@localhost", description="the first start's admin")
    heartbeat_unreachable_after_s: float = Field(
        default=75.0, gt=0, description="a host with no heartbeat for this long is unreachable "
        "(its capsules missing); plus one host monitor round, within 90 s of its last heartbeat",
    )  # fmt: skip
    reconcile_interval_s: float = Field(
        default=30.0, gt=0, description="how often DB state is compared with the agents'"
    )
    auto_resume_default: bool = Field(
        default=False, description="`auto_resume` of a capsule created without one: a guest "
        "call (exec, files, PTY) to it while paused resumes it instead of answering 409",
    )  # fmt: skip
    lifetime_interval_s: float = Field(
        default=1.0, gt=0, description="how often capsules whose lifetime (ttl_sec) ended are "
        "paused or destroyed",
    )  # fmt: skip
    host_monitor_interval_s: float = Field(
        default=10.0, gt=0, description="how often heartbeat ages are checked"
    )
    min_idle_timeout_s: int = Field(
        default=60, ge=1, description="positive idle timeouts below this are raised to it (as "
        "the wrenn SDK documents; tests lower it)",
    )  # fmt: skip
    # events, stats, channels (issue 13)
    events_heartbeat_s: float = Field(
        default=15.0, gt=0, description="SSE comment sent on an idle /v1/events/stream"
    )
    stats_interval_s: float = Field(
        default=30.0, gt=0, description="how often each team's reserved capsules are sampled"
    )
    event_retention_days: int = Field(
        default=7, ge=1, description="events, finished deliveries kept this long"
    )
    channel_retry_base_s: float = Field(
        default=10.0, gt=0, description="first retry of a failed delivery; then x3 each time"
    )
    channel_max_attempts: int = Field(
        default=6, ge=1, description="a delivery is given up (failed) after this many attempts"
    )
    channel_timeout_s: float = Field(default=10.0, gt=0, description="one delivery attempt")
    channels_allow_private: bool = Field(
        default=False, description="let channel URLs resolve to loopback or private addresses "
        "(link-local, multicast and reserved stay refused)",
    )  # fmt: skip
    host_registration_ttl_s: int = Field(
        default=3600, gt=0, description="lifetime of a one-time host registration token"
    )
    build_concurrency: int = Field(
        default=2, ge=1, le=64, description="template builds this control plane runs at once"
    )
    build_poll_s: float = Field(
        default=2.0, gt=0, description="how often idle build workers look for queued builds"
    )
    build_stale_after_s: float = Field(
        default=30.0, gt=0, description="a running build whose worker has not checked in for "
        "this long (its control plane stopped) is claimed again and rerun",
    )  # fmt: skip
    build_healthcheck_max_s: float = Field(
        default=600.0, gt=0, description="a build's healthcheck with no --retries gives up "
        "after this long",
    )  # fmt: skip
    build_egress: bool = Field(
        default=True, description="build capsules may reach the internet (apt, pip, git); "
        "private and host addresses stay blocked",
    )  # fmt: skip
    log_level: str = Field(
        default="INFO",
        validation_alias=AliasChoices("NESTBOX_CP_LOG_LEVEL", "NESTBOX_LOG_LEVEL", "log_level"),
    )
    log_json: bool = Field(default=False, description="JSON-lines logs instead of key=value")

    @field_validator("jwt_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(
                f"NESTBOX_CP_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes "
                "(unset it to have one generated)"
            )
        return value

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


def prepare_data_dir(data_dir: Path) -> None:
    """Make `data_dir` (0700), or tighten an existing one that others may read or enter (with a
    log line): it holds the database, the admin key and the session secret."""
    data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode != DATA_DIR_MODE:
        os.chmod(data_dir, DATA_DIR_MODE)
        log.warning("%s was mode %o; set it to %o", data_dir, mode, DATA_DIR_MODE)


def jwt_secret(settings: CPSettings) -> bytes:
    """The session signing key: the configured one, else `<data_dir>/jwt-secret`, created
    (0600, 32 random bytes as hex) on first use. An empty file (left by a crash of an older
    version mid-write) is replaced by a new secret, with a log line; a non-empty one shorter
    than 32 bytes is refused. :raise OSError: the data directory is unusable.
    :raise ValueError: the file holds a too short secret."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value().encode()
    path = settings.data_dir / JWT_SECRET_FILE
    try:
        value = path.read_text().strip().encode()
    except FileNotFoundError:
        value = None
    if value is not None and len(value) >= MIN_JWT_SECRET_BYTES:
        return value
    if value:
        raise ValueError(f"{path} holds fewer than {MIN_JWT_SECRET_BYTES} bytes; remove it to "
                         "have a new secret generated (every session then ends)")  # fmt: skip
    prepare_data_dir(settings.data_dir)
    fresh = secrets.token_hex(32) + "\n"
    if value is None:
        write_private(path, fresh, exclusive=True)  # a racing start may have won: read theirs
    else:
        log.warning("%s is empty; generating a new session secret", path)
        write_private(path, fresh)
    return path.read_text().strip().encode()


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write `text` to `path` readable by the owner only (0600 from the first byte), atomically:
    a temp file beside it is written and fsynced, then renamed over `path` (or, `exclusive`,
    linked to it only if `path` does not exist yet: two starts racing keep one secret), and the
    directory is fsynced. `path` is never seen empty or partial."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
