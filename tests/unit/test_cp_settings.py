"""CPSettings: env names, defaults, URL normalisation, the JWT secret file, redaction."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from nestbox.controlplane.settings import CPSettings, jwt_secret, split_listen


def test_defaults_and_env_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("NESTBOX_DATABASE_URL", "NESTBOX_PROXY_DOMAIN", "NESTBOX_CP_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NESTBOX_DIR", str(tmp_path))
    monkeypatch.setenv("NESTBOX_CP_RECONCILE_INTERVAL_S", "5")
    s = CPSettings()
    assert s.data_dir == tmp_path
    assert s.db_url == f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}"
    assert s.listen == "127.0.0.1:9725"
    assert s.base_url == "http://127.0.0.1:9725"
    assert s.proxy_domain == "localhost:9725"
    assert s.reconcile_interval_s == 5
    assert s.heartbeat_unreachable_after_s == 90
    assert s.host_monitor_interval_s == 10
    monkeypatch.setenv("NESTBOX_DATABASE_URL", "postgresql://u:p@h:5432/d")
    monkeypatch.setenv("NESTBOX_PROXY_DOMAIN", "nest.example:443")
    s = CPSettings()
    assert s.db_url == "postgresql+asyncpg://u:p@h:5432/d"
    assert s.proxy_domain == "nest.example:443"


@pytest.mark.parametrize(
    ("given", "effective"),
    [
        ("postgres://h/d", "postgresql+asyncpg://h/d"),
        ("postgresql+asyncpg://h/d", "postgresql+asyncpg://h/d"),
        ("sqlite:////x/cp.db", "sqlite+aiosqlite:////x/cp.db"),
    ],
)
def test_database_urls_get_async_drivers(given: str, effective: str) -> None:
    assert CPSettings(database_url=given).db_url == effective


def test_listen() -> None:
    assert split_listen("[::1]:9725") == ("::1", 9725)
    assert CPSettings(listen="[::1]:80").base_url == "http://[::1]:80"
    assert CPSettings(listen="0.0.0.0:8000").base_url == "http://127.0.0.1:8000"
    with pytest.raises(ValidationError):
        CPSettings(listen="9725")


def test_jwt_secret_is_made_once_and_private(tmp_path: Path) -> None:
    s = CPSettings(data_dir=tmp_path / "d")
    first = jwt_secret(s)
    assert len(first) == 64
    assert jwt_secret(s) == first
    assert stat.S_IMODE((tmp_path / "d" / "jwt-secret").stat().st_mode) == 0o600
    assert (
        jwt_secret(CPSettings(data_dir=tmp_path / "d", jwt_secret=SecretStr("given"))) == b"given"
    )


def test_redacted() -> None:
    s = CPSettings(database_url="postgresql://u:pw@h/d", jwt_secret=SecretStr("s3cret"))
    doc = s.redacted()
    assert "pw" not in doc["database_url"]
    assert doc["jwt_secret"] != "s3cret"
